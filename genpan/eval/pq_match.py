"""Per-image PQ matching on in-memory id maps: the core of `genpan/eval/pq.py` (definition in its docstring).

`pq_image(gt_ids, gt_segments, pred_ids, pred_segments, categories)` validates one image the way the
COCO reference does (plus the GT side), matches segments and returns per-category TP/FP/FN/ΣIoU and
one record per scored segment. Callers that already hold id maps (post-processing, validation during
training) use it directly; `pq_compute` runs it over files.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genpan.coco_panoptic import MAX_SEGMENT_ID, VOID_ID

# Segment record kinds. TP and FN rows carry the GT area, FP rows the predicted area (pq_by_size).
TP, FN, FP = 0, 1, 2
SEGMENT_DTYPE = np.dtype(
    [
        ("image", np.int32),  # index into PQResult.image_ids
        ("category_id", np.int64),
        ("kind", np.int8),  # TP, FN or FP
        ("gt_area", np.int64),  # 0 for FP
        ("pred_area", np.int64),  # 0 for FN
        ("iou", np.float64),  # 0 unless TP
    ]
)


class PQInputError(ValueError):
    """Malformed PQ input (ids, categories, sizes, missing files); the message names the image."""


@dataclass(frozen=True)
class CategoryTable:
    """The categories of the GT JSON, in its order; PQ is accumulated per position in this table."""

    ids: tuple[int, ...]
    names: tuple[str, ...]
    isthing: tuple[bool, ...]

    @classmethod
    def from_coco(cls, categories: Iterable[Mapping[str, Any]], source: str = "GT JSON") -> CategoryTable:
        ids, names, isthing = [], [], []
        if not isinstance(categories, Sequence) or isinstance(categories, str):
            raise PQInputError(f"{source}: 'categories' must be a list, got {type(categories).__name__}")
        for cat in categories:
            try:
                ids.append(int(cat["id"]))
                names.append(str(cat.get("name", cat["id"])))
                isthing.append(int(cat["isthing"]) == 1)  # the reference's test: isthing == 1
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
                raise PQInputError(f"{source}: every category needs integer 'id' and 'isthing' (got {cat!r})") from None
        if len(set(ids)) != len(ids):
            raise PQInputError(f"{source}: duplicate category ids")
        if not ids:
            raise PQInputError(f"{source}: no categories")
        return cls(tuple(ids), tuple(names), tuple(isthing))

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def index(self) -> dict[int, int]:
        """Category id → position; built once per table (cached_property writes past the frozen fields)."""
        return {cat_id: i for i, cat_id in enumerate(self.ids)}


@dataclass
class ImageStats:
    """One image's contribution: per-category arrays aligned with the CategoryTable, plus records."""

    tp: np.ndarray  # (C,) int64
    fp: np.ndarray  # (C,) int64
    fn: np.ndarray  # (C,) int64
    iou: np.ndarray  # (C,) float64, sum of matched IoUs
    segments: np.ndarray  # SEGMENT_DTYPE records, image field 0 (the caller sets it)
    gt_area_mismatches: int = 0  # GT segments whose JSON 'area' differs from the PNG count


@dataclass(frozen=True)
class _Segments:
    ids: np.ndarray  # (K,) int64 segment ids, JSON order
    cat: np.ndarray  # (K,) int64 index into the CategoryTable
    crowd: np.ndarray  # (K,) bool
    json_area: np.ndarray  # (K,) int64, -1 where the JSON has none


def _parse_segments(segments: Sequence[Mapping[str, Any]], cat_index: dict[int, int], where: str) -> _Segments:
    if not isinstance(segments, Sequence) or isinstance(segments, str):
        raise PQInputError(f"{where}: segments_info must be a list, got {type(segments).__name__}")
    # plain lists, one array each at the end: per-element numpy writes cost more than the parsing
    ids, cat, crowd, json_area = [], [], [], []
    for seg in segments:
        try:
            seg_id, cat_id = int(seg["id"]), int(seg["category_id"])
            crowd.append(int(seg.get("iscrowd", 0)) == 1)
            area = int(seg["area"]) if "area" in seg else -1
            if not -(1 << 63) <= area < 1 << 63:
                raise OverflowError  # as writing it into the int64 array would
            json_area.append(area)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            raise PQInputError(f"{where}: every segment needs integer 'id' and 'category_id' (and integer "
                               f"'iscrowd'/'area' if given); got {seg!r}") from None
        if not 0 < seg_id <= MAX_SEGMENT_ID:
            raise PQInputError(f"{where}: segment id {seg_id} outside [1, {MAX_SEGMENT_ID}] (0 is void)")
        if cat_id not in cat_index:
            raise PQInputError(f"{where}: segment {seg_id} has unknown category_id {cat_id}")
        ids.append(seg_id)
        cat.append(cat_index[cat_id])
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise PQInputError(f"{where}: duplicate segment ids {dup} in the JSON")
    return _Segments(np.array(ids, np.int64), np.array(cat, np.int64), np.array(crowd, bool), np.array(json_area, np.int64))


_lut_store = threading.local()


def _lookup_table(size: int) -> np.ndarray:
    """A thread-local id → compact-index table, all −1, at least `size` long (grown by doubling)."""
    lut = getattr(_lut_store, "lut", None)
    if lut is None or lut.size < size:
        lut = np.full(max(size, 2 * (0 if lut is None else lut.size), 1 << 16), -1, np.int32)
        _lut_store.lut = lut
    return lut


def _compact(ids: np.ndarray, seg_ids: np.ndarray, where: str) -> np.ndarray:
    """Pixel ids → 0 (void) or 1 + position of the id in `seg_ids`; unknown ids raise PQInputError."""
    lo, hi = int(ids.min()), int(ids.max())
    top = int(seg_ids.max()) if seg_ids.size else 0
    if lo < 0 or hi > top:
        bad = np.unique(ids[(ids < 0) | (ids > top)])
        raise PQInputError(f"{where}: segment ids {bad[:10].tolist()} are in the PNG but not in the JSON")
    lut = _lookup_table(top + 1)
    lut[VOID_ID] = 0
    lut[seg_ids] = np.arange(1, seg_ids.size + 1, dtype=np.int32)
    try:
        compact = lut[ids]
    finally:
        lut[seg_ids] = -1  # leave the shared table clean for the next image
        lut[VOID_ID] = -1
    if compact.size and int(compact.min()) < 0:
        bad = np.unique(ids[compact < 0])
        raise PQInputError(f"{where}: segment ids {bad[:10].tolist()} are in the PNG but not in the JSON")
    return compact


def pq_image(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Mapping[str, Any]],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping[str, Any]],
    categories: CategoryTable | Sequence[Mapping[str, Any]],
    name: str = "image",
) -> ImageStats:
    """Match one image's prediction against its GT (definition: `genpan/eval/pq.py` docstring).

    `gt_ids` / `pred_ids`: (H, W) integer segment-id maps, 0 = void; `*_segments`: the COCO
    `segments_info` lists (dicts with id, category_id, optional iscrowd and area). `name` prefixes every
    error message; `categories` is a CategoryTable or the COCO category list. Raises PQInputError for a
    PNG id missing from the JSON, a JSON segment missing from the PNG, an unknown category, duplicate
    ids or a size mismatch.
    """
    gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
    for arr, side in ((gt_ids, "ground truth"), (pred_ids, "prediction")):
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise PQInputError(f"{name}: {side} must be a 2-D integer id map, got {arr.dtype} {arr.shape}")
    if gt_ids.shape != pred_ids.shape:
        raise PQInputError(f"{name}: prediction size {pred_ids.shape} differs from ground truth size {gt_ids.shape}")
    if not isinstance(categories, CategoryTable):
        categories = CategoryTable.from_coco(categories)
    cat_index = categories.index
    gt = _parse_segments(gt_segments, cat_index, f"{name} (ground truth)")
    pred = _parse_segments(pred_segments, cat_index, f"{name} (prediction)")
    g = _compact(gt_ids.ravel(), gt.ids, f"{name} (ground truth)")
    p = _compact(pred_ids.ravel(), pred.ids, f"{name} (prediction)")
    return _match(g, p, gt, pred, categories, name)


def _crowd_of_category(gt: _Segments, n_cat: int) -> np.ndarray:
    """1-based GT index of each category's crowd segment, −1 for none. The reference ignores a prediction
    mostly on void + the crowd segment of its category, keeping one crowd segment per category: the last
    in JSON order."""
    crowd_of_cat = np.full(n_cat, -1, np.int64)
    crowd_rows = np.flatnonzero(gt.crowd)
    crowd_of_cat[gt.cat[crowd_rows]] = crowd_rows + 1  # fancy assignment: the last write wins
    return crowd_of_cat


def _image_stats(
    categories: CategoryTable,
    gt: _Segments,
    gt_area: np.ndarray,
    cats: tuple[np.ndarray, np.ndarray, np.ndarray],
    tp_iou: np.ndarray,
    tp_fn_gt_area: np.ndarray,
    tp_pred_area: np.ndarray,
    fp_pred_area: np.ndarray,
) -> ImageStats:
    """Counts and segment records of one image from its matches: `cats` = category index of each TP, FN
    and FP; areas in the same order; `gt_area` the measured area of every GT segment (JSON order)."""
    tp_cat, fn_cat, fp_cat = cats
    n_cat, n_tp, n_fn = len(categories), tp_cat.size, fn_cat.size
    stats = ImageStats(
        tp=np.bincount(tp_cat, minlength=n_cat).astype(np.int64),
        fp=np.bincount(fp_cat, minlength=n_cat).astype(np.int64),
        fn=np.bincount(fn_cat, minlength=n_cat).astype(np.int64),
        iou=np.bincount(tp_cat, weights=tp_iou, minlength=n_cat),
        segments=np.zeros(n_tp + n_fn + fp_cat.size, SEGMENT_DTYPE),
    )
    rows = stats.segments
    rows["kind"] = np.repeat(np.array([TP, FN, FP], np.int8), [n_tp, n_fn, fp_cat.size])
    rows["category_id"] = np.asarray(categories.ids, np.int64)[np.concatenate([tp_cat, fn_cat, fp_cat])]
    rows["gt_area"][: n_tp + n_fn] = tp_fn_gt_area
    rows["pred_area"][:n_tp] = tp_pred_area
    rows["pred_area"][n_tp + n_fn :] = fp_pred_area
    rows["iou"][:n_tp] = tp_iou
    stats.gt_area_mismatches = int(np.count_nonzero((gt.json_area != gt_area) & (gt.json_area >= 0)))
    return stats


def _absent(area: np.ndarray, seg: _Segments, side: str, name: str) -> None:
    absent = seg.ids[area[1:] == 0]
    if absent.size:
        raise PQInputError(f"{name} ({side}): segment ids {absent[:10].tolist()} are in the JSON but not in the PNG")


def _match(g: np.ndarray, p: np.ndarray, gt: _Segments, pred: _Segments, categories: CategoryTable, name: str) -> ImageStats:
    """Matching on the intersection matrix of compact GT index × compact prediction index (index 0 void
    on both sides), counted in one bincount over the combined index g·n_p + p. The matrix has an extra
    last row of zeros, so that row −1 reads "no crowd segment". Segment counts per image are small (COCO:
    at most a few hundred), so the matrix stays small."""
    n_g, n_p = gt.ids.size + 1, pred.ids.size + 1
    combined = g.astype(np.int64) * n_p + p
    inter = np.bincount(combined, minlength=(n_g + 1) * n_p).reshape(n_g + 1, n_p)
    gt_area, pred_area = inter.sum(1)[:n_g], inter.sum(0)
    if gt_area[1:].size and gt_area[1:].min() == 0:
        _absent(gt_area, gt, "ground truth", name)
    if pred_area[1:].size and pred_area[1:].min() == 0:
        _absent(pred_area, pred, "prediction", name)
    segs = inter[1:n_g, 1:]  # GT segment × predicted segment
    pred_void = inter[0, 1:]  # predicted pixels on GT void
    union = (pred_area[1:] - pred_void) + (gt_area[1:, None] - segs)
    iou = segs / union  # union ≥ the GT area ≥ 1
    match = iou > 0.5
    match &= gt.cat[:, None] == pred.cat
    match[gt.crowd] = False
    tp_g, tp_p = np.nonzero(match)  # at most one match per row and column (IoU > 0.5)
    tp_iou = iou[tp_g, tp_p]
    fn_g = np.flatnonzero(~(match.any(1) | gt.crowd))
    crowd_of_cat = _crowd_of_category(gt, len(categories))
    on_crowd = inter[crowd_of_cat[pred.cat], np.arange(1, n_p)]  # row −1: the zero row
    ignored = (pred_void + on_crowd) / pred_area[1:] > 0.5
    fp_p = np.flatnonzero(~(match.any(0) | ignored))

    return _image_stats(categories, gt, gt_area[1:], (gt.cat[tp_g], gt.cat[fn_g], pred.cat[fp_p]), tp_iou,
                        gt_area[1:][np.concatenate([tp_g, fn_g])], pred_area[1:][tp_p], pred_area[1:][fp_p])


def category_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, iou: np.ndarray) -> dict[str, np.ndarray]:
    """Per-category PQ, SQ, RQ (0 where a category has no TP+FP+FN, as the reference reports them)."""
    denom = tp + 0.5 * fp + 0.5 * fn
    counted = (tp + fp + fn) > 0
    safe = np.where(counted, denom, 1.0)
    return {
        "pq": np.where(counted, iou / safe, 0.0),
        "sq": np.where(tp > 0, iou / np.maximum(tp, 1), 0.0),
        "rq": np.where(counted, tp / safe, 0.0),
        "counted": counted,
    }


def average_scores(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, iou: np.ndarray, select: np.ndarray | None = None
) -> dict[str, float]:
    """Mean PQ/SQ/RQ over the selected categories with TP+FP+FN > 0 (0 with n = 0 when there are none)."""
    scores = category_scores(tp, fp, fn, iou)
    keep = scores["counted"] if select is None else scores["counted"] & select
    n = int(keep.sum())
    out = {k: float(scores[k][keep].sum() / n) if n else 0.0 for k in ("pq", "sq", "rq")}
    out.update(n=n, tp=int(tp[keep].sum()), fp=int(fp[keep].sum()), fn=int(fn[keep].sum()))
    return out
