"""Target computation per image against the bare decode of the same PNG + JPEG (COCO-like 512×640).

    python bench/prep_targets.py [--images 40] [--repeats 3]

Both are timed in the same run on the same files; the ratio is what matters (absolute times on a
shared machine mean little). Ends with `RESULT targets_over_decode=<ratio>` (goal ≤ 0.5).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from genpan.coco_panoptic import decode_panoptic_png
from genpan.prep.readers import make_reader
from genpan.prep.synthetic import SceneConfig, generate_split
from genpan.prep.targets import build_targets, encode_distance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40, help="number of 512–640 px synthetic images (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats; the best is kept (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate_split(tmp, "val", args.images, seed=1, cfg=SceneConfig(min_size=512, max_size=640), progress=False)
        reader = make_reader("synthetic", root=tmp, split="val")
        cats = reader.categories
        train_id_of = {c.id: c.train_id for c in cats}
        things = {c.id for c in cats if c.isthing}
        files = []
        for ref in reader.refs():
            files.append((Path(ref.image_path).read_bytes(), Path(ref.label_path).read_bytes(), list(ref.segments)))
        maps = [decode_panoptic_png(lbl) for _, lbl, _ in files]

        def decode_all() -> None:
            for jpg, lbl, _ in files:
                cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
                decode_panoptic_png(lbl)

        def targets_all() -> None:
            for ids, (_, _, segs) in zip(maps, files):
                t = build_targets(ids, segs, train_id_of, things)
                encode_distance(t.dist)

        def best(fn) -> float:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        t_decode, t_targets = best(decode_all), best(targets_all)
    n = len(files)
    print(f"{n} images, 512–640 px")
    print(f"decode JPEG + panoptic PNG : {1000 * t_decode / n:7.2f} ms/image")
    print(f"targets (sem, ins, dist, segment table, dist encode): {1000 * t_targets / n:7.2f} ms/image")
    print(f"RESULT targets_over_decode={t_targets / t_decode:.3f}")


if __name__ == "__main__":
    main()
