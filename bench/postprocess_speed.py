"""Post-processing speed: ms per image at 480² output on CPU, against one `amax` pass in the same run.

Inputs are realistic in size and structure: a random panoptic map (stuff bands, ~20 thing instances
that touch and occlude), its ideal outputs (genpan.eval.postprocess.ideal_outputs) with gaussian noise on
the embeddings and the logits, C = 133 classes (COCO panoptic: 80 things, 53 stuff), L = 4.
Floor: one `amax` over the (C, h, w) logits — a single read of the largest input, which any
post-processing must do. Timed on the same inputs: the per-image implementation this one replaced
(tests/postprocess_reference.py, checked to give the same output), `postprocess` with the grouping
decoder and with the soft-vote decoder, and the share of the stuff connected components.

    python bench/postprocess_speed.py [--size 480] [--repeats 10] [--threads 1]

Single-threaded by default: images are post-processed in parallel, one per core, and on a shared
machine a single thread gives the steadiest figure.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import genpan.eval.postprocess as pp
from genpan.eval.postprocess import PostprocessConfig, ideal_outputs, postprocess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postprocess_reference import postprocess as reference_postprocess  # noqa: E402

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


def stuff_components_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median time per call of `fn` spent in OpenCV's connected components (post-processing's only
    per-pixel step that stays on the CPU), by wrapping the function the module calls."""
    spent = [0.0]
    real = pp.cv2

    def timed_cc(*a, **k):
        t0 = time.perf_counter()
        out = real.connectedComponentsWithStats(*a, **k)
        spent[0] += time.perf_counter() - t0
        return out

    pp.cv2 = types.SimpleNamespace(connectedComponentsWithStats=timed_cc, CC_STAT_AREA=real.CC_STAT_AREA)
    try:
        per_call = []
        for _ in range(repeats):
            spent[0] = 0.0
            fn()
            per_call.append(spent[0])
    finally:
        pp.cv2 = real
    return 1000.0 * float(np.median(per_call))


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
    soft = PostprocessConfig(decoder="soft_vote")

    pan_new, segs_new = postprocess(sem, inst, train_to_category, things, cfg)
    pan_old, segs_old = reference_postprocess(sem, inst, train_to_category, things, cfg)
    same = bool(np.array_equal(pan_new, pan_old) and segs_new == segs_old)
    n_gt_things = sum(s["category_id"] < NUM_THINGS for s in segs)
    n_pred_things = sum(s["isthing"] for s in segs_new)
    n_soft_things = sum(s["isthing"] for s in postprocess(sem, inst, train_to_category, things, soft)[1])
    amax_ms = timed(lambda: sem.amax(dim=0), args.repeats, "amax")
    old_ms = timed(lambda: reference_postprocess(sem, inst, train_to_category, things, cfg), args.repeats, "per-image reference")
    new_ms = timed(lambda: postprocess(sem, inst, train_to_category, things, cfg), args.repeats, "postprocess")
    soft_ms = timed(lambda: postprocess(sem, inst, train_to_category, things, soft), args.repeats, "soft vote")
    amax2_ms = timed(lambda: sem.amax(dim=0), args.repeats, "amax")  # again: load drift on a shared machine shows
    cc_ms = stuff_components_ms(lambda: postprocess(sem, inst, train_to_category, things, cfg), args.repeats)
    print(f"output {args.size}x{args.size}, C={len(train_to_category)}, L=4, G={cfg.grid_size}, noise σ={args.noise}, "
          f"torch threads {torch.get_num_threads()}; GT things {n_gt_things}, predicted things {n_pred_things} (soft vote {n_soft_things})")
    print(f"one amax pass over the logits:             {amax_ms:8.1f} ms/image (again after the runs: {amax2_ms:.1f})")
    print(f"per-image reference (the replaced code):   {old_ms:8.1f} ms/image  ratio to amax {old_ms / amax_ms:5.2f}x")
    print(f"postprocess, grouping decoder:             {new_ms:8.1f} ms/image  ratio to amax {new_ms / amax_ms:5.2f}x")
    print(f"postprocess, soft-vote decoder:            {soft_ms:8.1f} ms/image  ratio to amax {soft_ms / amax_ms:5.2f}x")
    print(f"stuff connected components (inside postprocess): {cc_ms:.1f} ms/image = {100 * cc_ms / new_ms:.1f} % of postprocess")
    print(f"same id map and segments as the reference: {same}")
    print(f"RESULT postprocess_over_max={new_ms / amax_ms:.2f}")
    if not same:
        print("error: postprocess and the per-image reference disagree on these inputs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
