"""Post-processing speed: ms per image at 480² output on CPU, against a baseline in the same run.

Inputs are realistic in size and structure: a random panoptic map (stuff bands, ~20 thing instances
that touch and occlude), its ideal outputs (genpan.eval.postprocess.ideal_outputs) with gaussian noise on
the embeddings and the logits, C = 133 classes (COCO panoptic: 80 things, 53 stuff), L = 4.
Baseline: the bare semantic argmax plus the embedding decode alone — the per-pixel work any
post-processing must do; the ratio shows what grouping, NMS, voting and stuff filling add.

    python bench/postprocess_speed.py [--size 480] [--repeats 10] [--threads 1]

Single-threaded by default: images are post-processed in parallel, one per core, and on a shared
machine a single thread gives the steadiest figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from genpan.eval.postprocess import PostprocessConfig, decode_embeddings, ideal_outputs, postprocess

NUM_THINGS, NUM_STUFF = 80, 53


def random_scene(rng: np.random.Generator, size: int, n_inst: int) -> tuple[np.ndarray, list[dict]]:
    """Stuff bands of random classes, then `n_inst` ellipses and boxes pasted in turn (later ones occlude)."""
    pan = np.zeros((size, size), np.int32)
    cuts = np.sort(rng.choice(np.arange(size // 8, size - size // 8), 3, replace=False))
    segs = []
    for k, (y0, y1) in enumerate(zip([0, *cuts], [*cuts, size])):
        pan[y0:y1] = k + 1
        segs.append({"id": k + 1, "category_id": NUM_THINGS + int(rng.integers(NUM_STUFF)), "iscrowd": 0})
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_inst):
        sid = 100 + i
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(size / 60, size / 6, 2)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        pan[mask] = sid
        segs.append({"id": sid, "category_id": int(rng.integers(NUM_THINGS)), "iscrowd": 0})
    pan[: size // 40] = 0  # a void strip
    present = set(np.unique(pan).tolist())
    return pan, [s for s in segs if s["id"] in present]


def timed(fn: Callable[[], object], repeats: int, label: str) -> float:
    """Median wall time of `fn` in ms after one warm-up call."""
    fn()
    times = []
    for _ in tqdm(range(repeats), desc=label, unit="run", leave=False):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=480, help="output resolution h = w of the model outputs")
    p.add_argument("--instances", type=int, default=20, help="thing instances pasted into the random map")
    p.add_argument("--noise", type=float, default=0.2, help="std of the gaussian noise on the ideal embeddings")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per method (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: one image per core, as when images run in parallel; 0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random map and noise")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size < 16 or args.repeats < 1 or args.instances < 0 or args.threads < 0:
        print("error: --size must be ≥ 16, --repeats ≥ 1, --instances and --threads ≥ 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    pan, segs = random_scene(rng, args.size, args.instances)
    train_to_category = list(range(NUM_THINGS + NUM_STUFF))  # category id = train id here
    cat_to_train = {c: c for c in train_to_category}
    things = set(range(NUM_THINGS))
    sem, inst = ideal_outputs(pan, segs, cat_to_train, things, len(train_to_category))
    sem = torch.from_numpy(sem + rng.normal(0, 1.0, sem.shape).astype(np.float32))
    inst = torch.from_numpy(inst + rng.normal(0, args.noise, inst.shape).astype(np.float32))
    cfg = PostprocessConfig()

    def baseline() -> object:
        return sem.argmax(dim=0), decode_embeddings(inst, cfg.grid_size)

    def full() -> object:
        return postprocess(sem, inst, train_to_category, things, cfg)

    _, out_segs = full()
    n_gt_things = sum(s["category_id"] < NUM_THINGS for s in segs)
    n_pred_things = sum(s["isthing"] for s in out_segs)
    base_ms = timed(baseline, args.repeats, "baseline")
    full_ms = timed(full, args.repeats, "postprocess")
    print(f"output {args.size}x{args.size}, C={len(train_to_category)}, L=4, G={cfg.grid_size}, noise σ={args.noise}, "
          f"torch threads {torch.get_num_threads()}; GT things {n_gt_things}, predicted things {n_pred_things}")
    print(f"baseline (semantic argmax + embedding decode): {base_ms:8.1f} ms/image")
    print(f"full post-processing:                          {full_ms:8.1f} ms/image")
    print(f"ratio full / baseline: {full_ms / base_ms:.2f}x")
    print(f"RESULT postprocess_ms_per_image={full_ms:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
