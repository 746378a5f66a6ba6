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
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

IGNORE = 255
NO_INSTANCE = 0
DIST_SCALE = 64  # dist.png stores round(d · 64): 1/64 px resolution, exact for the EDS weights
DEFAULT_DIST_CLIP = 255.0  # px; 255 · 64 fits in uint16


@dataclass(frozen=True)
class SegmentStats:
    """Geometry of one segment measured on its id map."""

    id: int
    area: int
    bbox: tuple[int, int, int, int]  # COCO order: x, y, width, height
    centroid: tuple[float, float]  # (u, v) in [-1, 1]


def semantic_map(pan_ids: np.ndarray, segments: Sequence[dict[str, Any]], cat_to_train: dict[int, int]) -> np.ndarray:
    """Panoptic ids → uint8 train ids; void and categories without a train id become 255."""
    lut_ids, lut_vals = [], []
    for seg in segments:
        lut_ids.append(int(seg["id"]))
        lut_vals.append(cat_to_train.get(int(seg["category_id"]), IGNORE))
    return _map_ids(pan_ids, lut_ids, lut_vals, IGNORE, np.uint8)


def instance_map(pan_ids: np.ndarray, segments: Sequence[dict[str, Any]], thing_categories: set[int]) -> tuple[np.ndarray, list[int]]:
    """Panoptic ids → uint16 instance index map and, per segment, its index (0 for stuff).

    Indices run 1..N over thing segments (crowd included) in the order of `segments`.
    """
    index_of_segment: list[int] = []
    lut_ids, lut_vals = [], []
    n = 0
    for seg in segments:
        if int(seg["category_id"]) in thing_categories:
            n += 1
            lut_ids.append(int(seg["id"]))
            lut_vals.append(n)
            index_of_segment.append(n)
        else:
            index_of_segment.append(NO_INSTANCE)
    if n > np.iinfo(np.uint16).max:
        raise ValueError(f"{n} thing segments do not fit a uint16 instance map")
    return _map_ids(pan_ids, lut_ids, lut_vals, NO_INSTANCE, np.uint16), index_of_segment


def _map_ids(pan_ids: np.ndarray, ids: list[int], vals: list[int], default: int, dtype: type) -> np.ndarray:
    """Vectorised lookup id → value with a default for ids not listed."""
    out = np.full(pan_ids.shape, default, dtype=dtype)
    if not ids:
        return out
    keys = np.asarray(ids, dtype=np.int64)
    order = np.argsort(keys)
    keys, values = keys[order], np.asarray(vals, dtype=dtype)[order]
    flat = pan_ids.reshape(-1).astype(np.int64)
    pos = np.clip(np.searchsorted(keys, flat), 0, len(keys) - 1)
    hit = keys[pos] == flat
    out.reshape(-1)[hit] = values[pos[hit]]
    return out


def segment_stats(pan_ids: np.ndarray, segment_ids: Sequence[int]) -> list[SegmentStats]:
    """Area, bbox and centroid of each listed segment id, in one pass over the map.

    A listed id absent from the map gets area 0, bbox (0, 0, 0, 0) and centroid (0, 0).
    """
    h, w = pan_ids.shape
    uniq, inverse = np.unique(pan_ids.reshape(-1), return_inverse=True)
    ys, xs = np.divmod(np.arange(h * w, dtype=np.int64), w)
    counts = np.bincount(inverse, minlength=len(uniq))
    sum_x = np.bincount(inverse, weights=xs, minlength=len(uniq))
    sum_y = np.bincount(inverse, weights=ys, minlength=len(uniq))
    big = np.iinfo(np.int64).max
    min_x = np.full(len(uniq), big)
    min_y = np.full(len(uniq), big)
    max_x = np.full(len(uniq), -1)
    max_y = np.full(len(uniq), -1)
    np.minimum.at(min_x, inverse, xs)
    np.minimum.at(min_y, inverse, ys)
    np.maximum.at(max_x, inverse, xs)
    np.maximum.at(max_y, inverse, ys)
    where = {int(v): i for i, v in enumerate(uniq)}
    stats = []
    for sid in segment_ids:
        i = where.get(int(sid))
        if i is None:
            stats.append(SegmentStats(int(sid), 0, (0, 0, 0, 0), (0.0, 0.0)))
            continue
        n = int(counts[i])
        cx, cy = sum_x[i] / n, sum_y[i] / n
        stats.append(
            SegmentStats(
                id=int(sid),
                area=n,
                bbox=(int(min_x[i]), int(min_y[i]), int(max_x[i] - min_x[i] + 1), int(max_y[i] - min_y[i] + 1)),
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


def encode_distance(dist: np.ndarray, clip: float = DEFAULT_DIST_CLIP) -> np.ndarray:
    """Distance map → the uint16 stored in dist.png (round(min(d, clip)·DIST_SCALE))."""
    if clip * DIST_SCALE > np.iinfo(np.uint16).max:
        raise ValueError(f"distance clip {clip} px does not fit uint16 at scale {DIST_SCALE}")
    return np.rint(np.minimum(dist, clip) * DIST_SCALE).astype(np.uint16)


def decode_distance(stored: Any) -> Any:
    """uint16 dist.png values → distance in px (numpy or torch)."""
    if _is_torch(stored):
        return stored.float() / DIST_SCALE
    return np.asarray(stored, dtype=np.float32) / np.float32(DIST_SCALE)


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
) -> ImageTargets:
    """All per-image targets of the shard contract from a panoptic id map and its segments_info.

    `train_id_of` maps category id → contiguous train id; `thing_categories` holds the thing ids.
    Area, bbox and centroid are measured on the map (the JSON's own values are not trusted).
    """
    sem = semantic_map(pan_ids, segments, train_id_of)
    ins, ins_index = instance_map(pan_ids, segments, thing_categories)
    stats = segment_stats(pan_ids, [int(s["id"]) for s in segments])
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
