"""Benchmark: decode time per PIL-written panoptic PNG (COCO's GT is written so) with genpan/png.py.

    python bench/pil_png_decode.py --images 100 --min-size 256 --max-size 512
    python bench/pil_png_decode.py --baseline /path/to/other/checkout/genpan/png.py   # before/after

Writes synthetic GT with genpan.eval.pq_synth (as bench/pq_speed.py --gt-writer pil does), checks every path
against cv2.imdecode, and times per file, interleaved (this machine is shared): `decode_png_any_order`,
the plain stored-block libpng path (no repeated rows left out), cv2.imdecode on the original bytes and,
with --baseline, that file's `decode_png_any_order`. Each figure: per-file minimum of --repeats runs,
averaged over files; --rounds rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

import genpan.png as png
from genpan.eval.pq_synth import make_pair, resave_with_pil


def plain_stored(data: bytes) -> tuple[np.ndarray, bool]:
    buffer = memoryview(data)
    return png._decode_opencv(png._stored_png(buffer, png._inflate_rows(buffer)[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--min-size", type=int, default=256)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another genpan/png.py to time beside this one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pil_png_") as tmp:
        paths = make_pair(tmp, args.images, 0, (args.min_size, args.max_size))
        resave_with_pil(paths["gt_dir"])
        files = [f.read_bytes() for f in sorted(paths["gt_dir"].glob("*.png"))]
    methods: dict[str, Callable[[bytes], tuple[np.ndarray, bool]]] = {
        "decode_png_any_order": png.decode_png_any_order,
        "stored blocks, no repeats left out": plain_stored,
        "cv2.imdecode": lambda d: (cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_UNCHANGED), True),
    }
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_png", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        methods["baseline decode_png_any_order"] = baseline.decode_png_any_order
    for data in files:
        want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        for name, decode in methods.items():
            array, reversed_colour = decode(data)
            if not np.array_equal(array if reversed_colour else array[..., ::-1], want):
                raise AssertionError(f"{name} differs from cv2.imdecode")
    rows = [png._inflate_rows(memoryview(d))[0] for d in files]
    filters = np.concatenate([r[:, 0] for r in rows])
    repeats = np.mean(np.concatenate([(r[:, 0] == png.UP) & (r[:, 1:].max(axis=1) == 0) for r in rows]))
    shares = ", ".join(f"{name} {np.mean(filters == k):.1%}" for k, name in enumerate(["None", "Sub", "Up", "Average", "Paeth"]))
    print(f"{len(files)} PIL-written PNGs, {args.min_size}-{args.max_size} px; rows: {shares}; Up rows of zeros {repeats:.1%}")
    for round_ in range(args.rounds):
        total = dict.fromkeys(methods, 0.0)
        for data in files:
            best = dict.fromkeys(methods, float("inf"))
            for _ in range(args.repeats):
                for name, decode in methods.items():
                    start = time.perf_counter()
                    decode(data)
                    best[name] = min(best[name], time.perf_counter() - start)
            for name in total:
                total[name] += best[name]
        print(f"round {round_}: " + ", ".join(f"{k} {1000 * v / len(files):.3f}" for k, v in total.items()) + " ms/PNG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
