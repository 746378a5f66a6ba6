"""Random COCO-panoptic ground truth and perturbed predictions, to test and benchmark PQ.

`random_panoptic` draws a GT id map: Voronoi stuff regions, rectangles and ellipses of thing
instances painted over them, optional void patches and one crowd segment per category at most.
`perturb_prediction` turns any GT into a plausible prediction: a global shift, and per thing segment
a drop, wrong class, split, merge with a same-class neighbour or local shift, plus spurious blobs and
filled void. `write_coco_panoptic` writes JSON + PNG folder in the COCO layout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genpan.coco_panoptic import MAX_SEGMENT_ID, id_to_rgb, read_panoptic_png, write_panoptic_png

DEFAULT_CATEGORIES: tuple[dict[str, Any], ...] = (
    *({"id": i, "name": f"thing{i}", "isthing": 1} for i in (1, 2, 3, 5, 8)),
    *({"id": i, "name": f"stuff{i}", "isthing": 0} for i in (20, 21, 23, 30)),
)


@dataclass
class Panoptic:
    ids: np.ndarray  # (H, W) int32 segment ids, 0 = void
    segments: list[dict[str, Any]]  # COCO segments_info


def _distinct_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(MAX_SEGMENT_ID, size=n, replace=False).astype(np.int64) + 1


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def from_labels(
    rng: np.random.Generator, labels: np.ndarray, cats: Sequence[int], crowd: Sequence[bool] | None = None
) -> Panoptic:
    """Label map (0 = void, k ≥ 1 → cats[k-1]) → Panoptic with fresh random ids; empty labels dropped."""
    area = np.bincount(labels.ravel(), minlength=len(cats) + 1)
    present = [k for k in range(1, len(cats) + 1) if area[k] > 0]
    seg_ids = _distinct_ids(rng, len(present))
    table = np.zeros(len(cats) + 1, np.int64)
    table[present] = seg_ids
    segments = [
        {
            "id": int(seg_id),
            "category_id": int(cats[k - 1]),
            "iscrowd": int(bool(crowd[k - 1])) if crowd is not None else 0,
            "area": int(area[k]),
            "bbox": _bbox(labels == k),
        }
        for k, seg_id in zip(present, seg_ids, strict=True)
    ]
    return Panoptic(table[labels].astype(np.int32), segments)


def random_panoptic(
    rng: np.random.Generator,
    height: int,
    width: int,
    categories: Sequence[Mapping[str, Any]] = DEFAULT_CATEGORIES,
    max_things: int = 12,
    void_prob: float = 0.5,
    crowd_prob: float = 0.2,
) -> Panoptic:
    """A random panoptic GT map (see module docstring)."""
    things = [int(c["id"]) for c in categories if c["isthing"]]
    stuff = [int(c["id"]) for c in categories if not c["isthing"]]
    yy, xx = np.mgrid[0:height, 0:width]
    cats: list[int] = []
    crowd: list[bool] = []
    labels = np.zeros((height, width), np.int32)
    if stuff:
        seeds = rng.uniform((0, 0), (height, width), size=(int(rng.integers(1, 5)), 2))
        dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        region = dist.argmin(-1)
        for r in range(seeds.shape[0]):  # separate segments even when two regions share a class
            cats.append(int(rng.choice(stuff)))
            crowd.append(False)
            labels[region == r] = len(cats)
    crowd_cats: set[int] = set()
    for _ in range(int(rng.integers(0, max_things + 1)) if things else 0):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry = rng.uniform(1, max(2.0, height / 4))
        rx = rng.uniform(1, max(2.0, width / 4))
        if rng.random() < 0.5:
            shape = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        else:
            shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        cat = int(rng.choice(things))
        is_crowd = cat not in crowd_cats and rng.random() < crowd_prob
        if is_crowd:
            crowd_cats.add(cat)
        cats.append(cat)
        crowd.append(is_crowd)
        labels[shape] = len(cats)
    if rng.random() < void_prob:
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        labels[y0 : y0 + int(rng.integers(1, height // 3 + 2)), x0 : x0 + int(rng.integers(1, width // 3 + 2))] = 0
    if rng.random() < void_prob:  # COCO-like void seams where two labels meet
        seam = np.zeros_like(labels, bool)
        seam[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        seam[1:, :] |= labels[1:, :] != labels[:-1, :]
        labels[seam & (rng.random(labels.shape) < 0.7)] = 0
    return from_labels(rng, labels, cats, crowd)


def _labels_of(panoptic: Panoptic) -> tuple[np.ndarray, list[int]]:
    """Segment ids → label map 1..K in segments order, and the category per label."""
    seg_ids = np.array([s["id"] for s in panoptic.segments], np.int64)
    order = np.argsort(seg_ids)
    labels = np.zeros(panoptic.ids.shape, np.int32)
    if seg_ids.size:
        pos = np.searchsorted(seg_ids, panoptic.ids, sorter=order).clip(0, seg_ids.size - 1)
        labels = np.where(panoptic.ids > 0, order[pos] + 1, 0).astype(np.int32)
    return labels, [int(s["category_id"]) for s in panoptic.segments]


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    a = np.roll(a, (dy, dx), axis=(0, 1))
    if dy > 0:
        a[:dy] = a[dy : dy + 1]
    elif dy < 0:
        a[dy:] = a[dy - 1 : dy]
    if dx > 0:
        a[:, :dx] = a[:, dx : dx + 1]
    elif dx < 0:
        a[:, dx:] = a[:, dx - 1 : dx]
    return a


def perturb_prediction(
    rng: np.random.Generator,
    gt: Panoptic,
    categories: Sequence[Mapping[str, Any]] = DEFAULT_CATEGORIES,
    strength: float = 1.0,
) -> Panoptic:
    """A prediction made from `gt` by typical errors; `strength` scales how often each happens."""
    labels, cats = _labels_of(gt)
    thing_ids = [int(c["id"]) for c in categories if c["isthing"]]
    all_ids = [int(c["id"]) for c in categories]
    h, w = labels.shape
    p = min(1.0, 0.08 * strength)
    if rng.random() < 0.5 * strength:
        labels = _shift(labels, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
    if rng.random() < 0.5:  # the predictor labels every pixel: void takes its nearest-row neighbour
        void = labels == 0
        filler = _shift(labels, 0, int(rng.choice([-1, 1]) * rng.integers(1, 6)))
        labels = np.where(void, filler, labels)
    thing_labels = [k + 1 for k, c in enumerate(cats) if c in thing_ids]
    for k in thing_labels:
        mask = labels == k
        if not mask.any():
            continue
        op = rng.random()
        if op < p:  # dropped: becomes void
            labels[mask] = 0
        elif op < 2 * p:  # wrong class
            cats[k - 1] = int(rng.choice(all_ids))
        elif op < 3 * p:  # split at the centre column into a new segment
            cols = np.flatnonzero(mask.any(0))
            cut = (cols[0] + cols[-1] + 1) // 2
            right = mask.copy()
            right[:, :cut] = False
            if right.any():
                cats.append(cats[k - 1])
                labels[right] = len(cats)
        elif op < 4 * p:  # merged into another segment of its class
            same = [j for j in thing_labels if j != k and cats[j - 1] == cats[k - 1]]
            if same:
                labels[mask] = int(rng.choice(same))
        elif op < 5 * p:  # shifted on its own
            moved = _shift(mask, int(rng.integers(-6, 7)), int(rng.integers(-6, 7)))
            labels[mask & (labels == k)] = 0
            labels[moved] = k
    for _ in range(int(rng.poisson(strength))):  # spurious detections
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        cats.append(int(rng.choice(thing_ids or all_ids)))
        labels[y0 : y0 + int(rng.integers(2, h // 4 + 3)), x0 : x0 + int(rng.integers(2, w // 4 + 3))] = len(cats)
    return from_labels(rng, labels, cats)


def write_coco_panoptic(
    json_path: str | Path,
    png_dir: str | Path,
    images: Sequence[tuple[str, Panoptic]],
    categories: Sequence[Mapping[str, Any]] = DEFAULT_CATEGORIES,
) -> None:
    """Write `images` [(file stem, Panoptic)] as a COCO panoptic JSON + PNG folder (integer image ids 1, 2, ... as COCO)."""
    png_dir = Path(png_dir)
    png_dir.mkdir(parents=True, exist_ok=True)
    annotations, infos = [], []
    for image_id, (stem, pan) in enumerate(images, start=1):
        write_panoptic_png(png_dir / f"{stem}.png", pan.ids)
        h, w = pan.ids.shape
        infos.append({"id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w})
        annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": pan.segments})
    data = {"images": infos, "annotations": annotations, "categories": [dict(c) for c in categories]}
    Path(json_path).write_text(json.dumps(data), encoding="utf-8")


def make_pair(
    root: str | Path,
    num_images: int,
    seed: int = 0,
    size_range: tuple[int, int] = (48, 96),
    categories: Sequence[Mapping[str, Any]] = DEFAULT_CATEGORIES,
    strength: float = 1.0,
) -> dict[str, Path]:
    """GT + prediction in COCO layout under `root`; returns gt_json, gt_dir, pred_json, pred_dir."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    gt_images, pred_images = [], []
    for i in range(num_images):
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        gt = random_panoptic(rng, h, w, categories)
        gt_images.append((f"img{i:05d}", gt))
        pred_images.append((f"img{i:05d}", perturb_prediction(rng, gt, categories, strength)))
    paths = {
        "gt_json": root / "gt.json",
        "gt_dir": root / "gt",
        "pred_json": root / "pred.json",
        "pred_dir": root / "pred",
    }
    write_coco_panoptic(paths["gt_json"], paths["gt_dir"], gt_images, categories)
    write_coco_panoptic(paths["pred_json"], paths["pred_dir"], pred_images, categories)
    return paths


def resave_with_pil(folder: str | Path) -> None:
    """Rewrite every panoptic PNG of `folder` with PIL's encoder, as COCO's own files were written (same
    pixels; PIL chooses a filter per row, Paeth and Average included, unlike OpenCV's all-Sub rows)."""
    from PIL import Image

    for path in sorted(Path(folder).glob("*.png")):
        Image.fromarray(id_to_rgb(read_panoptic_png(path))).save(path, format="PNG")
