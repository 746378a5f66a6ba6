"""Benchmark: our PQ (eval/pq.py) against the COCO reference (panopticapi) on the same predictions.

Writes a GT set and perturbed predictions (merged, split, shifted, dropped, re-classed and spurious
segments; see genpan/eval/pq_synth.py) to a temporary folder, checks that our numbers equal the reference's
to 1e-9, and times both at each process count. The reference picks its process count from
`multiprocessing.cpu_count()` (one chunk of images per CPU, in a Pool); it is called through its
public `pq_compute` with that function patched to return the count wanted. hotcoco (Rust, same API)
runs too when installed, with its own threading. Also timed: decoding every PNG once with OpenCV
(genpan.coco_panoptic) and with PIL, the floor for any exact PQ that reads these files.

    python bench/pq_speed.py --images 300 --min-size 256 --max-size 512
    python bench/pq_speed.py --gt-writer pil     # GT PNGs as COCO's own files are written (PIL)

The generated PNGs are written by OpenCV, as eval/predict.py writes predictions. COCO's ground truth
was written by PIL (per-row adaptive filters): `--gt-writer pil` measures that case.

The last line is `RESULT speedup_vs_panopticapi=<ours vs reference, 1 process>`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np

from genpan.coco_panoptic import read_panoptic_png
from genpan.eval.pq import pq_compute
from genpan.eval.pq_synth import make_pair, resave_with_pil

TOLERANCE = 1e-9


def best_times(runners: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Fastest of `repeats` runs of each runner, interleaved so that all see the same machine load
    (this machine is shared); one warm-up run each also fills the page cache."""
    outputs = {name: run() for name, run in runners.items()}
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            outputs[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


def reference_runner(paths: dict[str, Path], processes: int) -> Callable[[], dict]:
    from panopticapi import evaluation

    def run() -> dict:
        with mock.patch.object(evaluation.multiprocessing, "cpu_count", return_value=processes):
            with contextlib.redirect_stdout(io.StringIO()):  # it prints per-core progress
                return evaluation.pq_compute(
                    str(paths["gt_json"]), str(paths["pred_json"]), str(paths["gt_dir"]), str(paths["pred_dir"])
                )

    return run


def hotcoco_runner(paths: dict[str, Path]) -> Callable[[], dict] | None:
    try:
        from hotcoco import panoptic
    except ImportError:
        return None

    def run() -> dict:
        with contextlib.redirect_stdout(io.StringIO()):
            return panoptic.pq_compute(str(paths["gt_json"]), str(paths["pred_json"]), str(paths["gt_dir"]), str(paths["pred_dir"]))

    return run


def assert_same(ours: dict, ours_per_class: dict, ref: dict, who: str) -> None:
    for kind in ("All", "Things", "Stuff"):
        if ours[kind]["n"] != ref[kind]["n"]:
            raise AssertionError(f"{who}: {kind} n {ours[kind]['n']} != {ref[kind]['n']}")
        for metric in ("pq", "sq", "rq"):
            if abs(ours[kind][metric] - ref[kind][metric]) > TOLERANCE:
                raise AssertionError(f"{who}: {kind} {metric} {ours[kind][metric]!r} != {ref[kind][metric]!r}")
    for cat_id, row in ref["per_class"].items():
        for metric in ("pq", "sq", "rq"):
            if abs(ours_per_class[int(cat_id)][metric] - row[metric]) > TOLERANCE:
                raise AssertionError(f"{who}: category {cat_id} {metric} differs")


def decode_floor(paths: dict[str, Path]) -> tuple[float, float]:
    """Seconds to decode every GT and predicted PNG once: OpenCV via genpan, and PIL."""
    from PIL import Image

    files = sorted(paths["gt_dir"].glob("*.png")) + sorted(paths["pred_dir"].glob("*.png"))
    times, _ = best_times(
        {"cv": lambda: [read_panoptic_png(f) for f in files], "pil": lambda: [np.asarray(Image.open(f)) for f in files]}, 2
    )
    cv_time, pil_time = times["cv"], times["pil"]
    return cv_time, pil_time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="number of GT/prediction image pairs (default 300)")
    parser.add_argument("--min-size", type=int, default=256, help="smallest image side in pixels (default 256)")
    parser.add_argument("--max-size", type=int, default=512, help="largest image side in pixels (default 512)")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts to time (default 1,2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, best kept (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data (default 0)")
    parser.add_argument("--gt-writer", choices=("opencv", "pil"), default="opencv",
                        help="encoder of the GT PNGs: opencv (as predict.py writes) or pil (as COCO's files are)")
    args = parser.parse_args(argv)
    try:
        counts = [int(v) for v in args.processes.split(",")]
        if args.images < 1 or args.min_size < 8 or args.max_size < args.min_size or min(counts) < 1 or args.repeats < 1:
            raise ValueError("need --images ≥ 1, 8 ≤ --min-size ≤ --max-size, --processes ≥ 1, --repeats ≥ 1")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import panopticapi.evaluation  # noqa: F401
    except ImportError:
        print("error: the reference is missing: pip install --no-deps panopticapi-lite", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="pq_speed_") as tmp:
        start = time.perf_counter()
        paths = make_pair(tmp, args.images, args.seed, (args.min_size, args.max_size))
        if args.gt_writer == "pil":
            resave_with_pil(paths["gt_dir"])
        n_segments = sum(len(a["segments_info"]) for a in json.loads(paths["gt_json"].read_text())["annotations"])
        print(f"data: {args.images} images, {args.min_size}–{args.max_size} px, {n_segments} GT segments, GT PNGs by {args.gt_writer} "
              f"(generated in {time.perf_counter() - start:.1f} s)")

        rows = []
        ratios = {}
        for k in counts:
            runners = {
                "ours": lambda k=k: pq_compute(**paths, workers=k, progress=False),
                "panopticapi": reference_runner(paths, k),
            }
            times, outputs = best_times(runners, args.repeats)
            summary, per_class = outputs["ours"].summary(), {r["id"]: r for r in outputs["ours"].per_class()}
            assert_same(summary, per_class, outputs["panopticapi"], "panopticapi")
            ratios[k] = times["panopticapi"] / times["ours"]
            rows += [("ours (eval/pq.py)", k, times["ours"]), ("panopticapi", k, times["panopticapi"])]
        hot = hotcoco_runner(paths)
        if hot is not None:
            times, outputs = best_times({"hotcoco": hot}, args.repeats)
            assert_same(summary, per_class, outputs["hotcoco"], "hotcoco")
            rows.append(("hotcoco (own threads)", "auto", times["hotcoco"]))
        cv_t, pil_t = decode_floor(paths)
        rows += [("decode all PNGs: OpenCV/genpan", 1, cv_t), ("decode all PNGs: PIL", 1, pil_t)]

    print(f"numbers identical to the reference within {TOLERANCE:g}: All PQ {100 * summary['All']['pq']:.4f}, "
          f"Things {100 * summary['Things']['pq']:.4f}, Stuff {100 * summary['Stuff']['pq']:.4f}")
    print(f"{'implementation':34s} {'procs':>5s} {'seconds':>8s} {'ms/img':>7s}")
    for name, k, seconds in rows:
        print(f"{name:34s} {k!s:>5s} {seconds:8.3f} {1000 * seconds / args.images:7.2f}")
    for k, ratio in ratios.items():
        print(f"speedup vs panopticapi at {k} process(es): {ratio:.2f}x")
    print(f"RESULT speedup_vs_panopticapi={ratios[counts[0]]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
