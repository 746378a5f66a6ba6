"""PQ of thing segments by object size: the measurement behind the paper's Figures 4 and 5.

Definition. Bucket edges e_1 < … < e_{k−1} (pixels) cut areas into k half-open ranges
[0, e_1), [e_1, e_2), …, [e_{k−1}, ∞). Only thing categories count (crowd GT never does).
  - a TP and an FN belong to the bucket of the GT segment's area (the object's true size);
  - an FP belongs to the bucket of the predicted segment's area (it has no GT object);
  - TP, FP, FN come from the ordinary image-level matching: bucketing never changes a match.
Per bucket: PQ/SQ/RQ per thing category as in `genpan/eval/pq.py`, averaged over the thing categories with
TP + FP + FN > 0 in that bucket; `mean_iou` is the mean IoU over the bucket's matched (TP) segments,
pooled over categories (the IoU improvement of Figure 5); `gt_mean_iou` also counts each FN as IoU 0
(the mean IoU of GT objects).

Default edges are COCO's: small < 32², medium < 96², large. `quantile_edges` gives equal-count
buckets of the GT thing areas instead, for data sets of small images where COCO's bins are empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from genpan.eval.pq_match import FN, FP, TP, average_scores

COCO_EDGES = (32**2, 96**2)
COCO_NAMES = ("small", "medium", "large")


@dataclass(frozen=True)
class SizeBucket:
    name: str
    lo: float  # area range [lo, hi) in pixels
    hi: float
    pq: float
    sq: float
    rq: float
    n: int  # thing categories averaged
    tp: int
    fp: int
    fn: int
    mean_iou: float  # over TP segments; 0 when there are none
    gt_mean_iou: float  # over TP + FN (FN as 0)

    def to_dict(self) -> dict:
        """JSON-ready: the open upper end of the last bucket becomes None."""
        out = asdict(self)
        out["hi"] = None if np.isinf(self.hi) else self.hi
        return out


def quantile_edges(segments: np.ndarray, thing_ids: Sequence[int], n_buckets: int = 3) -> tuple[float, ...]:
    """Edges splitting the GT thing-segment areas (TP + FN records) into `n_buckets` equal-count groups."""
    if n_buckets < 1:
        raise ValueError(f"--quantile-buckets must be at least 1, got {n_buckets}")
    is_gt = (segments["kind"] != FP) & np.isin(segments["category_id"], np.asarray(thing_ids, np.int64))
    areas = segments["gt_area"][is_gt]
    if areas.size == 0 or n_buckets == 1:
        return ()
    edges = np.quantile(areas, np.arange(1, n_buckets) / n_buckets)
    return tuple(float(e) for e in np.unique(np.ceil(edges)) if e > areas.min())


def check_edges(edges: Sequence[float]) -> list[float]:
    edges = [float(e) for e in edges]
    if any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=True)) or any(e <= 0 for e in edges):
        raise ValueError(f"size bucket edges must be positive and increasing, got {edges}")
    return edges


def _bucket_names(edges: Sequence[float]) -> list[str]:
    if tuple(edges) == COCO_EDGES:
        return list(COCO_NAMES)
    bounds = [0.0, *edges, float("inf")]
    return [f"[{bounds[i]:g}, {bounds[i + 1]:g})" for i in range(len(edges) + 1)]


def pq_by_size(
    segments: np.ndarray,
    category_ids: Sequence[int],
    isthing: Sequence[bool],
    edges: Sequence[float] = COCO_EDGES,
    names: Sequence[str] | None = None,
) -> list[SizeBucket]:
    """Per-size-bucket PQ of thing categories from PQResult.segments records (definition above)."""
    edges = check_edges(edges)
    names = list(names) if names is not None else _bucket_names(edges)
    if len(names) != len(edges) + 1:
        raise ValueError(f"{len(edges)} edges need {len(edges) + 1} bucket names, got {len(names)}")
    cat_ids = np.asarray(category_ids, np.int64)
    things = cat_ids[np.asarray(isthing, bool)]
    rows = segments[np.isin(segments["category_id"], things)]
    area = np.where(rows["kind"] == FP, rows["pred_area"], rows["gt_area"])
    bucket = np.searchsorted(np.asarray(edges), area, side="right")  # area == edge goes up: [lo, hi)
    order = np.argsort(cat_ids)
    cat_pos = order[np.searchsorted(cat_ids, rows["category_id"], sorter=order)]
    bounds = [0.0, *edges, float("inf")]
    out = []
    for b, name in enumerate(names):
        sel = rows[bucket == b]
        pos = cat_pos[bucket == b]
        count = [np.bincount(pos[sel["kind"] == k], minlength=cat_ids.size) for k in (TP, FP, FN)]
        iou = np.bincount(pos[sel["kind"] == TP], weights=sel["iou"][sel["kind"] == TP], minlength=cat_ids.size)
        avg = average_scores(*count, iou, select=np.isin(cat_ids, things))
        n_tp, n_fn = avg["tp"], avg["fn"]
        out.append(
            SizeBucket(
                name=name,
                lo=bounds[b],
                hi=bounds[b + 1],
                pq=avg["pq"],
                sq=avg["sq"],
                rq=avg["rq"],
                n=avg["n"],
                tp=n_tp,
                fp=avg["fp"],
                fn=n_fn,
                mean_iou=float(iou.sum() / n_tp) if n_tp else 0.0,
                gt_mean_iou=float(iou.sum() / (n_tp + n_fn)) if n_tp + n_fn else 0.0,
            )
        )
    return out
