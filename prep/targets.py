"""Per-image training targets, pure functions of a panoptic id map (no I/O).

Conventions shared by prep, train and eval (docs/architecture.md):
- semantic map: uint8 contiguous train id per pixel, 255 = void/ignore; crowd keeps its class.
- instance map: uint16 index per pixel, 0 = no thing instance. Every thing segment, crowd included,
  gets an index (1-based, in segments order); crowd is flagged in the segment table, not in the map.
- centroid (u, v): mean of the segment's pixel centres, normalised to [-1, 1] with the
  `align_corners=False` convention: u = 2·(x + 0.5)/W − 1 (x = column), v = 2·(y + 0.5)/H − 1.
- boundary distance: a pixel is a boundary pixel when a 4-neighbour inside the image has another
  segment id (void is a segment of its own); every pixel stores its Euclidean distance to the nearest
  boundary pixel centre. Crop edges are not boundaries.

`eds_weight` and `pe_encode`/`pe_target` accept numpy arrays or torch tensors, so the trainer, the
Triton kernels' tests and post-processing all use this single definition.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from genpan.coco_panoptic import row_run_starts

IGNORE = 255
NO_INSTANCE = 0
# dist.png stores round(min(d, clip) · scale); the scale is a shard parameter (json params.dist_scale).
# Default: half pixels up to 127.5 px in uint8. The EDS weight exp(-(s·d)²/D²) moves by at most
# 0.043·s/4 for D = 20 over a quarter pixel, and past 127.5 px (·s ≥ 0.5) every weight is wmin for D ≤ 40;
# a 16-bit 1/64 px map cost 2.7× the bytes and 2.4× the decode time at COCO sizes.
DEFAULT_DIST_SCALE = 2
DEFAULT_DIST_CLIP = 127.5  # px; 127.5 · 2 = 255 fits uint8
DIST_SCALES = (1, 2, 4, 8, 16, 32, 64)  # divisors of DIST_SCALE, so every stored value is a whole batch unit
DIST_SCALE = 64  # the loader's batch unit (int16, 1/64 px), and the fixed scale of shards before PREP_VERSION 2


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
    """Distance map → the values stored in dist.png: round(min(d, clip)·scale), uint8 when that fits."""
    check_distance_storage(clip, scale)
    dtype = np.uint8 if clip * scale <= np.iinfo(np.uint8).max else np.uint16
    return np.rint(np.minimum(dist, clip) * scale).astype(dtype)


def decode_distance(stored: Any, scale: int = DEFAULT_DIST_SCALE) -> Any:
    """dist.png values → distance in px (numpy or torch)."""
    if _is_torch(stored):
        return stored.float() / scale
    return np.asarray(stored, dtype=np.float32) / np.float32(scale)


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _xp(x: Any) -> Any:
    return sys.modules["torch"] if _is_torch(x) else np


def eds_weight(dist: Any, D: float = 20.0, wmin: float = 0.0, scale: float = 1.0) -> Any:
    """Edge Distance Sampling weight (paper eq. 5): w = wmin + (1 − wmin)·exp(−(s·d)²/D²).

    `scale` is the resize factor s between the image the distance was measured on and the one the
    loss sees, so D is always in pixels of the loss resolution.
    """
    if D <= 0:
        raise ValueError(f"EDS D must be positive, got {D}")
    if not 0.0 <= wmin <= 1.0:
        raise ValueError(f"EDS wmin must lie in [0, 1], got {wmin}")
    xp = _xp(dist)
    sd = dist * scale
    return wmin + (1.0 - wmin) * xp.exp(-(sd * sd) / (D * D))


def pe_encode(p: Any, num_harmonics: int = 4) -> Any:
    """Spectral positional embedding γ(p) (paper eq. 3), last axis of size 2L.

    γ(p) = (sin(2^l π p), cos(2^l π p)) for l = 0..L−1, interleaved as sin_0, cos_0, sin_1, cos_1, ….
    ‖γ(p)‖² = L for every p, so instance codes lie on a sphere and void (0) sits at its centre.
    """
    xp = _xp(p)
    if xp is np:
        freqs = (2.0 ** np.arange(num_harmonics)) * np.pi
        ang = np.asarray(p, dtype=np.float64)[..., None] * freqs
        return np.stack([np.sin(ang), np.cos(ang)], axis=-1).reshape(*ang.shape[:-1], 2 * num_harmonics)
    freqs = (2.0 ** xp.arange(num_harmonics, dtype=p.dtype, device=p.device)) * np.pi
    ang = p[..., None] * freqs
    return xp.stack([xp.sin(ang), xp.cos(ang)], dim=-1).reshape(*ang.shape[:-1], 2 * num_harmonics)


def pe_target(u: Any, v: Any, valid: Any, num_harmonics: int = 4) -> Any:
    """Instance target per pixel (paper eq. 2-3): concat(γ(u), γ(v)) of size 4L, 0 where not valid."""
    xp = _xp(u)
    if xp is np:
        code = np.concatenate([pe_encode(u, num_harmonics), pe_encode(v, num_harmonics)], axis=-1)
        return code * np.asarray(valid, dtype=code.dtype)[..., None]
    code = xp.cat([pe_encode(u, num_harmonics), pe_encode(v, num_harmonics)], dim=-1)
    return code * valid.to(code.dtype)[..., None]


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
