"""Per-image training targets, pure functions of a panoptic id map (no I/O).

The conventions (maps, centroids, boundary distance) are those of genpan/labels.py.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from genpan.coco_panoptic import row_run_starts
from genpan.labels import DEFAULT_DIST_CLIP, DEFAULT_DIST_SCALE, DIST_SCALES, IGNORE


@dataclass(frozen=True)
class SegmentStats:
    """Geometry of one segment measured on its id map."""

    id: int
    area: int
    bbox: tuple[int, int, int, int]  # COCO order: x, y, width, height
    centroid: tuple[float, float]  # (u, v) in [-1, 1]


UNLISTED = np.iinfo(np.uint16).max  # dense index of an id that is not listed
_lut_store = threading.local()


def segment_index_map(pan_ids: np.ndarray, segment_ids: Sequence[int]) -> np.ndarray:
    """(H, W) uint16 dense index: k = position+1 of the pixel's id in `segment_ids`, 0 for id 0 (void)
    unless 0 is listed, 65535 for an id that is not listed.

    A per-thread lookup table over all 2^24 COCO ids replaces a sort of every pixel (np.unique): the
    gather touches only as many table entries as there are segments, so it stays in cache.
    """
    if len(segment_ids) >= UNLISTED:
        raise ValueError(f"{len(segment_ids)} segments do not fit a uint16 index map")
    lut = getattr(_lut_store, "lut", None)
    if lut is None:
        lut = _lut_store.lut = np.full(256**3, UNLISTED, dtype=np.uint16)
    ids = np.asarray(segment_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError("segment ids must lie in [0, 256³)")
    try:
        lut[0] = 0
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
        if pan_ids.min(initial=0) < 0 or pan_ids.max(initial=0) >= 256**3:
            raise ValueError("panoptic ids must lie in [0, 256³)")
        return lut[pan_ids]
    finally:
        lut[ids] = UNLISTED
        lut[0] = UNLISTED


def semantic_map(pan_ids: np.ndarray, segments: Sequence[dict[str, Any]], cat_to_train: dict[int, int]) -> np.ndarray:
    """Panoptic ids → uint8 train ids; void, unlisted ids and categories without a train id become 255."""
    dense = segment_index_map(pan_ids, [int(s["id"]) for s in segments])
    return _semantic_from_dense(dense, segments, cat_to_train)


def _semantic_from_dense(dense: np.ndarray, segments: Sequence[dict[str, Any]], cat_to_train: dict[int, int]) -> np.ndarray:
    lut = np.full(UNLISTED + 1, IGNORE, dtype=np.uint8)
    lut[1 : len(segments) + 1] = [cat_to_train.get(int(s["category_id"]), IGNORE) for s in segments]
    return lut[dense]


def instance_map(pan_ids: np.ndarray, segments: Sequence[dict[str, Any]], thing_categories: set[int]) -> tuple[np.ndarray, list[int]]:
    """Panoptic ids → uint16 instance index map and, per segment, its index (0 for stuff).

    Indices run 1..N over thing segments (crowd included) in the order of `segments`.
    """
    dense = segment_index_map(pan_ids, [int(s["id"]) for s in segments])
    return _instance_from_dense(dense, segments, thing_categories)


def _instance_from_dense(dense: np.ndarray, segments: Sequence[dict[str, Any]], thing_categories: set[int]) -> tuple[np.ndarray, list[int]]:
    is_thing = [int(s["category_id"]) in thing_categories for s in segments]
    index_of_segment = list(np.cumsum(is_thing) * np.asarray(is_thing, dtype=int)) if segments else []
    lut = np.zeros(UNLISTED + 1, dtype=np.uint16)
    lut[1 : len(segments) + 1] = index_of_segment
    return lut[dense], [int(i) for i in index_of_segment]


def segment_stats(pan_ids: np.ndarray, segment_ids: Sequence[int]) -> list[SegmentStats]:
    """Area, bbox and centroid of each listed segment id.

    A listed id absent from the map gets area 0, bbox (0, 0, 0, 0) and centroid (0, 0).
    """
    return _stats_from_dense(segment_index_map(pan_ids, segment_ids), segment_ids)


def _stats_from_dense(dense: np.ndarray, segment_ids: Sequence[int]) -> list[SegmentStats]:
    """Everything from the map's horizontal runs: a label map has a few thousand runs where it has
    hundreds of thousands of pixels, so one comparison pass finds them and the rest is per run."""
    h, w = dense.shape
    k = len(segment_ids) + 1
    starts = row_run_starts(dense)  # every row starts a run, so no run crosses a row end
    lengths = np.diff(starts, append=h * w)
    vals = dense.ravel()[starts].astype(np.intp)
    vals[vals == UNLISTED] = 0  # unlisted ids count as void, as the map's other users read them
    run_y, run_x0 = np.divmod(starts, w)
    run_x1 = run_x0 + lengths - 1
    area = np.bincount(vals, weights=lengths, minlength=k).astype(np.int64)
    sum_x = np.bincount(vals, weights=(run_x0 + run_x1) * lengths / 2, minlength=k)  # Σx over a run, exact
    sum_y = np.bincount(vals, weights=run_y * lengths, minlength=k)
    y0, x0 = np.full(k, h, dtype=np.intp), np.full(k, w, dtype=np.intp)
    y1, x1 = np.full(k, -1, dtype=np.intp), np.full(k, -1, dtype=np.intp)
    np.minimum.at(y0, vals, run_y)
    np.maximum.at(y1, vals, run_y)
    np.minimum.at(x0, vals, run_x0)
    np.maximum.at(x1, vals, run_x1)
    stats = []
    for j, sid in enumerate(segment_ids, start=1):
        n = int(area[j])
        if n == 0:
            stats.append(SegmentStats(int(sid), 0, (0, 0, 0, 0), (0.0, 0.0)))
            continue
        cx, cy = sum_x[j] / n, sum_y[j] / n
        stats.append(
            SegmentStats(
                id=int(sid),
                area=n,
                bbox=(int(x0[j]), int(y0[j]), int(x1[j] - x0[j] + 1), int(y1[j] - y0[j] + 1)),
                centroid=(float(2.0 * (cx + 0.5) / w - 1.0), float(2.0 * (cy + 0.5) / h - 1.0)),
            )
        )
    return stats


def boundary_mask(pan_ids: np.ndarray) -> np.ndarray:
    """True where a 4-neighbour inside the image carries a different segment id."""
    mask = np.zeros(pan_ids.shape, dtype=bool)
    dy = pan_ids[1:, :] != pan_ids[:-1, :]
    dx = pan_ids[:, 1:] != pan_ids[:, :-1]
    mask[1:, :] |= dy
    mask[:-1, :] |= dy
    mask[:, 1:] |= dx
    mask[:, :-1] |= dx
    return mask


def boundary_distance(pan_ids: np.ndarray, clip: float = DEFAULT_DIST_CLIP) -> np.ndarray:
    """Euclidean distance (px) of every pixel to the nearest boundary pixel, clipped to `clip`.

    A map with no boundary at all (one segment) is `clip` everywhere.
    """
    boundary = boundary_mask(pan_ids)
    if not boundary.any():
        return np.full(pan_ids.shape, clip, dtype=np.float32)
    # distanceTransform measures the distance to the nearest zero pixel; DIST_MASK_PRECISE is exact.
    src = np.where(boundary, 0, 255).astype(np.uint8)
    dist = cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.minimum(dist, np.float32(clip))


def check_distance_storage(clip: float, scale: int) -> None:
    if scale not in DIST_SCALES:
        raise ValueError(f"distance scale must be one of {DIST_SCALES}, got {scale}")
    if not 0 < clip * scale <= np.iinfo(np.uint16).max:
        raise ValueError(f"distance clip must be in (0, {np.iinfo(np.uint16).max / scale}] px at scale {scale}, got {clip}")


def encode_distance(dist: np.ndarray, clip: float = DEFAULT_DIST_CLIP, scale: int = DEFAULT_DIST_SCALE) -> np.ndarray:
    """Distance map → the values stored in dist.zst: round(min(d, clip)·scale), uint8 when that fits."""
    check_distance_storage(clip, scale)
    dtype = np.uint8 if clip * scale <= np.iinfo(np.uint8).max else np.uint16
    return np.rint(np.minimum(dist, clip) * scale).astype(dtype)


@dataclass
class ImageTargets:
    """Everything the shard contract stores for one image, before encoding."""

    sem: np.ndarray  # (H, W) uint8 train ids, 255 = ignore
    ins: np.ndarray  # (H, W) uint16 instance index, 0 = none
    dist: np.ndarray  # (H, W) float32 px to the nearest boundary, clipped
    segments: list[dict[str, Any]]  # per segment: id, category_id, train_id, isthing, iscrowd, ins, area, bbox, centroid


def build_targets(
    pan_ids: np.ndarray,
    segments: Sequence[dict[str, Any]],
    train_id_of: dict[int, int],
    thing_categories: set[int],
    dist_clip: float = DEFAULT_DIST_CLIP,
    dense: np.ndarray | None = None,
) -> ImageTargets:
    """All per-image targets of the shard contract from a panoptic id map and its segments_info.

    `train_id_of` maps category id → contiguous train id; `thing_categories` holds the thing ids.
    Area, bbox and centroid are measured on the map (the JSON's own values are not trusted).
    `dense` is segment_index_map(pan_ids, segment ids) when the caller already has it.
    """
    seg_ids = [int(s["id"]) for s in segments]
    if dense is None:
        dense = segment_index_map(pan_ids, seg_ids)
    sem = _semantic_from_dense(dense, segments, train_id_of)
    ins, ins_index = _instance_from_dense(dense, segments, thing_categories)
    stats = _stats_from_dense(dense, seg_ids)
    table = []
    for seg, idx, st in zip(segments, ins_index, stats):
        cat = int(seg["category_id"])
        table.append(
            {
                "id": int(seg["id"]),
                "category_id": cat,
                "train_id": int(train_id_of.get(cat, IGNORE)),
                "isthing": cat in thing_categories,
                "iscrowd": bool(seg.get("iscrowd", 0)),
                "ins": int(idx),
                "area": st.area,
                "bbox": list(st.bbox),
                "centroid": [round(st.centroid[0], 7), round(st.centroid[1], 7)],
            }
        )
    return ImageTargets(sem=sem, ins=ins, dist=boundary_distance(pan_ids, dist_clip), segments=table)
