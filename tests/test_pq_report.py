"""PQ by object size (genpan/eval/pq_buckets.py) and the report writer (genpan/eval/report.py, genpan/eval/plots.py)."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from genpan.eval.plots import plot_pq_by_size
from genpan.eval.pq import PQResult, pq_compute
from genpan.eval.pq_buckets import COCO_EDGES, pq_by_size
from genpan.eval.pq_match import FN, FP, TP, CategoryTable, pq_image
from genpan.eval.pq_synth import make_pair
from genpan.eval.report import write_report

CATS = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1}, {"id": 10, "name": "s", "isthing": 0}]
TABLE = CategoryTable.from_coco(CATS)


def _hand_result() -> PQResult:
    # GT: a (4 px), a (20 px), stuff s (16 px). Pred: a on 3 of the 4 px; b (12 px) on the stuff; s 4 px.
    gt = np.array([[1] * 4 + [2] * 20 + [8] * 16])
    pred = np.array([[1] * 3 + [0] * 21 + [9] * 12 + [8] * 4])
    segs_gt = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 8, "category_id": 10}]
    segs_pred = [{"id": 1, "category_id": 1}, {"id": 9, "category_id": 2}, {"id": 8, "category_id": 10}]
    return PQResult.from_images(TABLE, ["x"], [pq_image(gt, segs_gt, pred, segs_pred, TABLE)])


def test_size_buckets_by_hand():
    small, large = _hand_result().by_size(edges=(10,))
    # small [0, 10): a matched with IoU 3/4 (GT area 4).
    assert (small.tp, small.fp, small.fn, small.n) == (1, 0, 0, 1)
    assert small.pq == pytest.approx(0.75) and small.mean_iou == pytest.approx(0.75)
    # large [10, ∞): a missed (GT area 20), b a FP by its predicted area 12; stuff never counts.
    assert (large.tp, large.fp, large.fn, large.n) == (0, 1, 1, 2)
    assert (large.pq, large.mean_iou, large.gt_mean_iou) == (0.0, 0.0, 0.0)
    assert (small.name, large.name) == ("[0, 10)", "[10, inf)")


def test_area_on_an_edge_goes_to_the_upper_bucket():
    below, above = _hand_result().by_size(edges=(4,))
    assert (below.tp, above.tp) == (0, 1)  # GT area 4 = edge → [4, ∞)


def _loop_buckets(result: PQResult, edges: tuple[float, ...]) -> list[dict]:
    """Slow reference: walk the records one by one."""
    things = {c for c, t in zip(result.categories.ids, result.categories.isthing, strict=True) if t}
    stats = [defaultdict(lambda: [0, 0, 0, 0.0]) for _ in range(len(edges) + 1)]
    ious = [[] for _ in range(len(edges) + 1)]
    for row in result.segments:
        if int(row["category_id"]) not in things:
            continue
        area = row["pred_area"] if row["kind"] == FP else row["gt_area"]
        b = sum(area >= e for e in edges)
        s = stats[b][int(row["category_id"])]
        s[{TP: 0, FP: 1, FN: 2}[int(row["kind"])]] += 1
        if row["kind"] == TP:
            s[3] += float(row["iou"])
            ious[b].append(float(row["iou"]))
    out = []
    for b in range(len(edges) + 1):
        pqs = [iou / (tp + fp / 2 + fn / 2) for tp, fp, fn, iou in stats[b].values()]
        out.append({"pq": sum(pqs) / len(pqs) if pqs else 0.0, "n": len(pqs),
                    "mean_iou": sum(ious[b]) / len(ious[b]) if ious[b] else 0.0})
    return out


@pytest.fixture(scope="module")
def synthetic_result(tmp_path_factory):
    p = make_pair(tmp_path_factory.mktemp("buckets"), 15, seed=2, size_range=(60, 140))
    return pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False)


@pytest.mark.parametrize("edges", [COCO_EDGES, (50.0, 200.0, 800.0)])
def test_size_buckets_match_a_loop(synthetic_result, edges):
    fast = synthetic_result.by_size(edges)
    slow = _loop_buckets(synthetic_result, edges)
    for f, s in zip(fast, slow, strict=True):
        assert f.pq == pytest.approx(s["pq"], abs=1e-12)
        assert f.n == s["n"] and f.mean_iou == pytest.approx(s["mean_iou"], abs=1e-12)


def test_one_bucket_is_things_pq(synthetic_result):
    (everything,) = synthetic_result.by_size(edges=())
    things = synthetic_result.summary()["Things"]
    assert everything.pq == pytest.approx(things["pq"], abs=1e-12)
    assert (everything.tp, everything.fp, everything.fn, everything.n) == (things["tp"], things["fp"], things["fn"], things["n"])


def test_quantile_buckets_split_gt_objects_evenly(synthetic_result):
    edges = synthetic_result.quantile_edges(3)
    assert len(edges) == 2
    gt_counts = [b.tp + b.fn for b in synthetic_result.by_size(edges)]
    assert max(gt_counts) - min(gt_counts) <= 0.2 * sum(gt_counts)


def test_bad_edges_are_rejected():
    with pytest.raises(ValueError, match="increasing"):
        pq_by_size(np.zeros(0, dtype=[("category_id", np.int64)]), [1], [True], edges=(100, 10))


def test_write_report_with_extra_sections(tmp_path, synthetic_result):
    paths = write_report(
        tmp_path / "r",
        synthetic_result,
        extra_sections={"Depth": "| metric | value |\n|---|---|\n| AbsRel | 0.100 |"},
        metadata={"checkpoint": "step-100/model.pt", "config": {"lr": 5e-4}},
    )
    report = json.loads(paths["json"].read_text())
    assert report["metadata"]["config"] == {"lr": 5e-4}
    assert report["extra_sections"]["Depth"].startswith("| metric")
    assert report["summary"]["Things"]["pq"] == pytest.approx(synthetic_result.summary()["Things"]["pq"], abs=1e-15)
    assert report["by_size"][-1]["hi"] is None  # the open end, JSON-safe
    assert len(report["per_class"]) == len(synthetic_result.categories)
    md = paths["md"].read_text()
    assert "## Depth" in md and "| AbsRel | 0.100 |" in md and "step-100/model.pt" in md
    summary_row = next(line for line in md.splitlines() if line.startswith("| All |"))
    assert f"{100 * synthetic_result.summary()['All']['pq']:.2f}" in summary_row
    for key in ("class_plot", "size_plot"):
        assert paths[key].stat().st_size > 1000


def test_size_plot_compares_runs(tmp_path, synthetic_result):
    buckets = synthetic_result.by_size()
    path = plot_pq_by_size({"baseline": buckets, "with EDS": buckets}, tmp_path / "cmp.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
