"""Panoptic quality (PQ), exactly as the COCO reference (panopticapi `pq_compute`) defines it.

Per image, a ground-truth (GT) segment g and a predicted segment p of the same category match when

    IoU(g, p) = |g ∩ p| / (|p| + |g| − |g ∩ p| − |p ∩ void|)  >  0.5   (strictly),

where void is id 0 of the GT map; predicted pixels on GT void count neither for nor against p. Crowd
GT segments (iscrowd = 1) take no part in matching and are never false negatives. An unmatched
prediction is not a false positive when more than half of its pixels lie in GT void plus the crowd
segment of its own category (the reference keeps one crowd segment per category: the last listed).
Per category c,

    PQ_c = Σ_TP IoU / (TP + FP/2 + FN/2),   SQ_c = Σ_TP IoU / TP,   RQ_c = TP / (TP + FP/2 + FN/2),

and All / Things / Stuff are plain means over the categories (of that kind, by the GT JSON's
`isthing`) with TP + FP + FN > 0. This is the PQ of Kirillov et al. (2019) that the paper reports.

Differences from the reference, all on inputs it mis-handles or rejects: GT segment areas are counted
on the GT PNG (the reference trusts the JSON `area`; `PQResult.gt_area_mismatches` counts
disagreements); the GT PNG/JSON pair is checked as strictly as the prediction's; id 0 in a JSON,
duplicate segment ids, duplicate image ids and size mismatches are errors; a kind with no counted
category reports PQ = SQ = RQ = 0 with n = 0 (the reference divides by zero).

Per image: both PNGs decoded by OpenCV into id maps, one bincount over the combined (GT, prediction)
index gives the intersection matrix (`genpan/eval/pq_match.py`); images in a multiprocessing pool in
chunks, results in input order so the sums do not depend on `workers`.

    python eval/pq.py --gt-json gt.json --gt-dir gt/ --pred-json pred.json --pred-dir pred/ --out report/
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from genpan.coco_panoptic import decode_panoptic_png, load_panoptic_json
from genpan.eval.pq_buckets import COCO_EDGES, SizeBucket, check_edges, pq_by_size, quantile_edges
from genpan.eval.pq_match import (
    SEGMENT_DTYPE,
    CategoryTable,
    ImageStats,
    PQInputError,
    average_scores,
    category_scores,
    pq_image,
)

__all__ = [
    "PQInputError",
    "PQResult",
    "CategoryTable",
    "ImageStats",
    "pq_compute",
    "pq_image",
    "pq_by_size",
    "quantile_edges",
    "format_summary_table",
]

KINDS = (("All", None), ("Things", True), ("Stuff", False))


@dataclass
class PQResult:
    """Accumulated PQ statistics. Arrays are aligned with `categories` (the GT JSON's order)."""

    categories: CategoryTable
    tp: np.ndarray  # (C,) int64
    fp: np.ndarray
    fn: np.ndarray
    iou: np.ndarray  # (C,) float64, sum of matched IoUs
    segments: np.ndarray  # SEGMENT_DTYPE records; "image" indexes image_ids
    image_ids: list[Any]
    gt_area_mismatches: int = 0
    inputs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_images(cls, categories: CategoryTable, image_ids: Sequence[Any], stats: Sequence[ImageStats]) -> PQResult:
        n = len(categories)
        tp, fp, fn = (np.zeros(n, np.int64) for _ in range(3))
        iou = np.zeros(n, np.float64)
        records = []
        mismatches = 0
        for index, s in enumerate(stats):  # in image order: the float sums do not depend on workers
            tp += s.tp
            fp += s.fp
            fn += s.fn
            iou += s.iou
            s.segments["image"] = index
            records.append(s.segments)
            mismatches += s.gt_area_mismatches
        segments = np.concatenate(records) if records else np.zeros(0, SEGMENT_DTYPE)
        return cls(categories, tp, fp, fn, iou, segments, list(image_ids), mismatches)

    def summary(self) -> dict[str, dict[str, float]]:
        """{"All" | "Things" | "Stuff": {pq, sq, rq, n, tp, fp, fn}} as the reference's pq_average."""
        isthing = np.asarray(self.categories.isthing, bool)
        out = {}
        for name, thing in KINDS:
            select = None if thing is None else isthing == thing
            out[name] = average_scores(self.tp, self.fp, self.fn, self.iou, select)
        return out

    def per_class(self) -> list[dict[str, Any]]:
        """One row per category (GT JSON order); `counted` False where TP+FP+FN = 0 (scores then 0)."""
        scores = category_scores(self.tp, self.fp, self.fn, self.iou)
        cats = self.categories
        return [
            {
                "id": cats.ids[i],
                "name": cats.names[i],
                "isthing": cats.isthing[i],
                "pq": float(scores["pq"][i]),
                "sq": float(scores["sq"][i]),
                "rq": float(scores["rq"][i]),
                "tp": int(self.tp[i]),
                "fp": int(self.fp[i]),
                "fn": int(self.fn[i]),
                "counted": bool(scores["counted"][i]),
            }
            for i in range(len(cats))
        ]

    def by_size(self, edges: Sequence[float] = COCO_EDGES, names: Sequence[str] | None = None) -> list[SizeBucket]:
        return pq_by_size(self.segments, self.categories.ids, self.categories.isthing, edges, names)

    def quantile_edges(self, n_buckets: int = 3) -> tuple[float, ...]:
        things = [c for c, t in zip(self.categories.ids, self.categories.isthing, strict=True) if t]
        return quantile_edges(self.segments, things, n_buckets)


# ---------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _ImageTask:
    name: str  # the GT file name, for messages
    gt_png: str
    gt_segments: list[dict[str, Any]]
    pred_png: str
    pred_segments: list[dict[str, Any]]


_worker_categories: CategoryTable | None = None


def _init_worker(categories: CategoryTable) -> None:
    global _worker_categories
    _worker_categories = categories


def _read(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:  # no pathlib, no buffered reader: a few µs per file
        return f.read()


def _score_task(task: _ImageTask) -> ImageStats:
    assert _worker_categories is not None
    try:
        gt_ids = decode_panoptic_png(_read(task.gt_png), task.gt_png)
        pred_ids = decode_panoptic_png(_read(task.pred_png), task.pred_png)
    except FileNotFoundError as exc:
        raise PQInputError(f"{task.name}: PNG not found: {exc.filename}") from None
    except OSError as exc:
        raise PQInputError(f"{task.name}: cannot read {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise PQInputError(str(exc)) from None
    return pq_image(gt_ids, task.gt_segments, pred_ids, task.pred_segments, _worker_categories, task.name)


def _annotations(data: Mapping[str, Any], path: Path) -> dict[Any, dict[str, Any]]:
    by_image: dict[Any, dict[str, Any]] = {}
    if not isinstance(data["annotations"], list):
        raise PQInputError(f"{path}: 'annotations' must be a list, got {type(data['annotations']).__name__}")
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not {"image_id", "file_name", "segments_info"} <= ann.keys():
            raise PQInputError(f"{path}: every annotation needs image_id, file_name and segments_info")
        if not isinstance(ann["image_id"], (int, str)) or isinstance(ann["image_id"], bool):
            raise PQInputError(f"{path}: image_id must be an integer or a string, got {ann['image_id']!r}")
        if not isinstance(ann["segments_info"], list):
            raise PQInputError(f"{path}: segments_info of image {ann['image_id']!r} must be a list")
        if not isinstance(ann["file_name"], str) or not ann["file_name"] or Path(ann["file_name"]).name != ann["file_name"]:
            raise PQInputError(f"{path}: file_name of image {ann['image_id']!r} must be a plain file name, got {ann['file_name']!r}")
        if ann["image_id"] in by_image:
            raise PQInputError(f"{path}: image {ann['image_id']!r} has more than one annotation")
        by_image[ann["image_id"]] = ann
    return by_image


def _default_dir(json_path: Path, folder: str | Path | None) -> Path:
    # panopticapi's convention: the PNG folder is the JSON path without ".json"
    folder = Path(folder) if folder is not None else json_path.with_suffix("")
    if not folder.is_dir():
        raise FileNotFoundError(f"PNG folder not found: {folder}")
    return folder


def _tasks(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> tuple[CategoryTable, list, list]:
    gt_data, pred_data = load_panoptic_json(gt_json), load_panoptic_json(pred_json, required=("annotations",))
    categories = CategoryTable.from_coco(gt_data["categories"], str(gt_json))
    gt_anns, pred_anns = _annotations(gt_data, gt_json), _annotations(pred_data, pred_json)
    tasks, image_ids = [], []
    for image_id, gt_ann in gt_anns.items():
        name = str(gt_ann["file_name"])
        if image_id not in pred_anns:
            raise PQInputError(f"{pred_json}: no prediction for image {image_id!r} ({name})")
        pred_ann = pred_anns[image_id]
        pred_png = pred_dir / str(pred_ann["file_name"])
        if not pred_png.is_file():
            raise PQInputError(f"{name}: prediction PNG not found: {pred_png}")
        tasks.append(
            _ImageTask(name, str(gt_dir / name), gt_ann["segments_info"], str(pred_png), pred_ann["segments_info"])
        )
        image_ids.append(image_id)
    return categories, tasks, image_ids


def pq_compute(
    gt_json: str | Path,
    gt_dir: str | Path | None,
    pred_json: str | Path,
    pred_dir: str | Path | None,
    workers: int = 1,
    progress: bool = True,
) -> PQResult:
    """PQ of a COCO-panoptic prediction (JSON + PNG folder) against GT; folders default to JSON − '.json'.

    Every GT image needs a prediction (extra predicted images are ignored, as in the reference).
    Raises PQInputError (a ValueError) naming the image for malformed input, FileNotFoundError for a
    missing JSON or folder. `workers` > 1 scores images in a process pool.
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    gt_json, pred_json = Path(gt_json), Path(pred_json)
    for path in (gt_json, pred_json):  # name a missing JSON before its default folder
        if not path.is_file():
            raise FileNotFoundError(f"panoptic JSON not found: {path}")
    gt_dir, pred_dir = _default_dir(gt_json, gt_dir), _default_dir(pred_json, pred_dir)
    categories, tasks, image_ids = _tasks(gt_json, gt_dir, pred_json, pred_dir)
    bar = dict(total=len(tasks), desc="PQ", unit="img", disable=not progress, leave=False)
    if workers == 1 or len(tasks) < 2:
        _init_worker(categories)
        stats = [_score_task(t) for t in tqdm(tasks, **bar)]
    else:
        chunk = max(1, min(64, len(tasks) // (4 * workers)))
        with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(categories,)) as pool:
            stats = list(tqdm(pool.imap(_score_task, tasks, chunksize=chunk), **bar))
    result = PQResult.from_images(categories, image_ids, stats)
    result.inputs = {"gt_json": str(gt_json), "gt_dir": str(gt_dir), "pred_json": str(pred_json), "pred_dir": str(pred_dir)}
    return result


def format_summary_table(result: PQResult) -> str:
    """The All/Things/Stuff table in the reference's layout (percentages)."""
    lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}", "-" * 38]
    for name, row in result.summary().items():
        lines.append(f"{name:10s}| {100 * row['pq']:5.1f}  {100 * row['sq']:5.1f}  {100 * row['rq']:5.1f} {row['n']:5d}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def _parse_edges(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated areas in pixels, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eval/pq.py",
        description="Panoptic quality (COCO definition, as panopticapi computes it) of a COCO-panoptic "
        "prediction; writes report.json, report.md, pq_by_class.png and pq_by_size.png.",
    )
    parser.add_argument("--gt-json", required=True, type=Path, help="ground-truth COCO panoptic JSON")
    parser.add_argument("--gt-dir", type=Path, help="folder of ground-truth PNGs (default: --gt-json without .json)")
    parser.add_argument("--pred-json", required=True, type=Path, help="predicted COCO panoptic JSON")
    parser.add_argument("--pred-dir", type=Path, help="folder of predicted PNGs (default: --pred-json without .json)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report (created if missing)")
    parser.add_argument("--workers", type=int, default=1, help="processes scoring images in parallel (default 1)")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument(
        "--size-edges",
        type=_parse_edges,
        default=COCO_EDGES,
        help="area edges (pixels) of the thing-size buckets, comma-separated (default COCO: 1024,9216)",
    )
    sizes.add_argument(
        "--quantile-buckets",
        type=int,
        metavar="K",
        help="instead of fixed edges, K equal-count buckets of the GT thing areas (for small images)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from genpan.eval.report import write_report  # matplotlib only when a report is written

        check_edges(args.size_edges)  # fail before the long part
        result = pq_compute(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, args.workers, not args.no_progress)
        if args.quantile_buckets:
            edges = result.quantile_edges(args.quantile_buckets)
            buckets = result.by_size(edges, names=[f"q{i + 1}" for i in range(len(edges) + 1)])
        else:
            buckets = result.by_size(args.size_edges)
        write_report(args.out, result, size_buckets=buckets)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary_table(result))
    if result.gt_area_mismatches:
        print(f"warning: {result.gt_area_mismatches} GT segments have a JSON 'area' unlike their PNG pixel count "
              "(PQ uses the PNG; panopticapi would use the JSON)", file=sys.stderr)
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
