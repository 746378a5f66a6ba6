"""PQ (eval/pq.py): hand-worked cases, input validation, the CLI, a property test, and the reference.

Hand cases use a tiny category table: things 1 ("a") and 2 ("b"), stuff 10 ("s"), plus thing 3 and
stuff 11 that never occur. Maps are written out as arrays so every count can be read off the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genpan.eval.pq import PQInputError, PQResult, main, pq_compute
from genpan.eval.pq_match import CategoryTable, pq_image
from genpan.eval.pq_synth import Panoptic as SynthPanoptic
from genpan.eval.pq_synth import make_pair, write_coco_panoptic

REPO = Path(__file__).resolve().parents[1]
CATS = [
    {"id": 1, "name": "a", "isthing": 1},
    {"id": 2, "name": "b", "isthing": 1},
    {"id": 3, "name": "c", "isthing": 1},
    {"id": 10, "name": "s", "isthing": 0},
    {"id": 11, "name": "t", "isthing": 0},
]
TABLE = CategoryTable.from_coco(CATS)


def seg(seg_id: int, cat: int, crowd: int = 0) -> dict:
    return {"id": seg_id, "category_id": cat, "iscrowd": crowd}


def score(gt: np.ndarray, gt_segs: list, pred: np.ndarray, pred_segs: list) -> PQResult:
    stats = pq_image(np.asarray(gt), gt_segs, np.asarray(pred), pred_segs, TABLE, "img.png")
    return PQResult.from_images(TABLE, ["img"], [stats])


def per_cat(result: PQResult) -> dict[int, dict]:
    return {row["id"]: row for row in result.per_class()}


# ------------------------------------------------------------------------------- hand-worked cases


def test_perfect_prediction_with_other_ids():
    gt = np.array([[5, 5, 9, 9], [5, 5, 9, 9]])
    pred = np.array([[70, 70, 3, 3], [70, 70, 3, 3]])
    r = score(gt, [seg(5, 1), seg(9, 10)], pred, [seg(70, 1), seg(3, 10)])
    s = r.summary()
    assert s["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2, "tp": 2, "fp": 0, "fn": 0}
    assert s["Things"]["n"] == 1 and s["Stuff"]["n"] == 1
    assert not per_cat(r)[3]["counted"] and not per_cat(r)[11]["counted"]  # absent: not averaged


def test_one_false_positive():
    # GT: thing a (4 px) on stuff s (12 px). Pred: same, plus a thing b carved out of 2 stuff pixels.
    gt = np.array([[1, 1, 8, 8], [1, 1, 8, 8], [8, 8, 8, 8], [8, 8, 8, 8]])
    pred = gt.copy()
    pred[3, 2:] = 4
    r = score(gt, [seg(1, 1), seg(8, 10)], pred, [seg(1, 1), seg(8, 10), seg(4, 2)])
    c = per_cat(r)
    assert (c[1]["pq"], c[1]["tp"]) == (1.0, 1)
    assert c[10]["pq"] == pytest.approx(10 / 12)  # IoU = 10 / (10 + 12 − 10)
    assert (c[2]["pq"], c[2]["fp"], c[2]["counted"]) == (0.0, 1, True)  # predicted, never in GT: counts
    s = r.summary()
    assert s["All"]["pq"] == pytest.approx((1 + 10 / 12 + 0) / 3)
    assert s["Things"]["pq"] == pytest.approx(0.5) and s["Things"]["rq"] == pytest.approx(0.5)
    assert s["Things"]["sq"] == pytest.approx(0.5)  # mean of SQ_a = 1 and SQ_b = 0 (no TP)


def test_one_false_negative():
    gt = np.array([[1, 1, 8, 8], [1, 1, 8, 8], [8, 8, 8, 8], [8, 8, 8, 8]])
    pred = np.full_like(gt, 8)  # the thing is painted as stuff
    r = score(gt, [seg(1, 1), seg(8, 10)], pred, [seg(8, 10)])
    c = per_cat(r)
    assert (c[1]["pq"], c[1]["fn"], c[1]["fp"]) == (0.0, 1, 0)
    assert c[10]["pq"] == pytest.approx(12 / 16)
    assert r.summary()["All"]["pq"] == pytest.approx((0 + 12 / 16) / 2)
    assert r.summary()["All"]["rq"] == pytest.approx((0 + 1) / 2)


def test_iou_exactly_half_is_not_a_match_and_just_above_is():
    gt = np.array([[1, 1, 1, 1]])
    half = np.array([[2, 2, 0, 0]])  # IoU = 2 / (2 + 4 − 2) = 0.5
    r = score(gt, [seg(1, 1)], half, [seg(2, 1)])
    assert (per_cat(r)[1]["tp"], per_cat(r)[1]["fp"], per_cat(r)[1]["fn"]) == (0, 1, 1)
    assert r.summary()["All"]["pq"] == 0.0
    three = np.array([[2, 2, 2, 0]])  # IoU = 3/4
    r = score(gt, [seg(1, 1)], three, [seg(2, 1)])
    assert r.summary()["All"]["pq"] == pytest.approx(0.75)


def test_crowd_is_never_matched_nor_missed_and_shields_its_own_category():
    # GT: crowd of a (cols 0–3), thing a (cols 4–5), stuff (cols 6–7).
    gt = np.array([[7, 7, 7, 7, 1, 1, 8, 8]] * 2)
    gt_segs = [seg(7, 1, crowd=1), seg(1, 1), seg(8, 10)]
    # Pred: an 'a' exactly on the crowd (ignored), the thing right, the stuff right.
    pred = np.array([[5, 5, 5, 5, 1, 1, 8, 8]] * 2)
    r = score(gt, gt_segs, pred, [seg(5, 1), seg(1, 1), seg(8, 10)])
    assert (per_cat(r)[1]["tp"], per_cat(r)[1]["fp"], per_cat(r)[1]["fn"]) == (1, 0, 0)
    assert r.summary()["All"]["pq"] == 1.0
    # The same pixels predicted as 'b': the crowd belongs to another category, so it is a FP of b.
    r = score(gt, gt_segs, pred, [seg(5, 2), seg(1, 1), seg(8, 10)])
    assert per_cat(r)[2]["fp"] == 1 and per_cat(r)[1]["fn"] == 0
    # A prediction of 'a' only 3/8 inside the crowd (rest on stuff) is a FP: not more than half.
    pred2 = np.array([[9, 9, 9, 8, 1, 1, 9, 9], [8, 8, 8, 8, 1, 1, 9, 9]])  # 9: 3 crowd px + 4 stuff px
    r = score(gt, gt_segs, pred2, [seg(9, 1), seg(1, 1), seg(8, 10)])
    assert per_cat(r)[1]["fp"] == 1  # 3 crowd px of 7 ≤ half


def test_reference_quirk_only_last_crowd_of_a_category_shields():
    # Two crowd segments of 'a'; the reference remembers only the last listed (id 6).
    gt = np.array([[7, 7, 6, 6, 8, 8]])
    gt_segs = [seg(7, 1, crowd=1), seg(6, 1, crowd=1), seg(8, 10)]
    on_first = np.array([[5, 5, 8, 8, 8, 8]])
    r = score(gt, gt_segs, on_first, [seg(5, 1), seg(8, 10)])
    assert per_cat(r)[1]["fp"] == 1
    on_last = np.array([[8, 8, 5, 5, 8, 8]])
    r = score(gt, gt_segs, on_last, [seg(5, 1), seg(8, 10)])
    assert per_cat(r)[1]["fp"] == 0


def test_void_is_ignored_in_iou_and_for_false_positives():
    # GT: thing a = 4 px, the rest void (0).
    gt = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
    # Pred a covers the thing and 4 void px: IoU = 4 / (8 + 4 − 4 − 4) = 1.
    # Pred b: 3 of 5 px on void → ignored. (Its other 2 px are in the GT thing.)
    pred = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
    r = score(gt, [seg(1, 1)], pred, [seg(1, 1)])
    assert per_cat(r)[1]["pq"] == 1.0
    pred = np.array([[1, 1, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0]])  # a: IoU 2/4 = 0.5, no match; b: 3/5 void
    r = score(gt, [seg(1, 1)], pred, [seg(1, 1), seg(2, 2)])
    c = per_cat(r)
    assert (c[1]["tp"], c[1]["fn"], c[1]["fp"]) == (0, 1, 1)
    assert (c[2]["fp"], c[2]["counted"]) == (0, False)
    pred = np.array([[2, 2, 2, 1, 2, 2, 2, 0, 0, 0, 0, 0]])  # b: exactly half (3 of 6) on void → FP
    r = score(gt, [seg(1, 1)], pred, [seg(1, 1), seg(2, 2)])
    assert per_cat(r)[2]["fp"] == 1


def test_things_and_stuff_means_mixed():
    # Things: a matched with IoU 3/4, b missed. Stuff: s matched with IoU 4/6.
    gt = np.array([[1, 1, 1, 1, 2, 2, 8, 8, 8, 8, 8, 8]])
    pred = np.array([[1, 1, 1, 9, 9, 9, 9, 8, 8, 8, 8, 9]])
    r = score(gt, [seg(1, 1), seg(2, 2), seg(8, 10)], pred, [seg(1, 1), seg(9, 10), seg(8, 10)])
    c = per_cat(r)
    assert c[1]["pq"] == pytest.approx(3 / 4)
    assert (c[2]["pq"], c[2]["fn"]) == (0.0, 1)
    # s: GT 6 px; pred 8 has 4 px (all in s): IoU 4/6; pred 9 (5 px, 3 in s) is an unmatched stuff FP.
    assert c[10]["pq"] == pytest.approx((4 / 6) / (1 + 0.5))
    s = r.summary()
    assert s["Things"]["pq"] == pytest.approx((3 / 4 + 0) / 2)
    assert s["Stuff"]["pq"] == pytest.approx((4 / 6) / 1.5)
    assert s["All"]["pq"] == pytest.approx((3 / 4 + 0 + (4 / 6) / 1.5) / 3)


def test_no_counted_category_gives_zero_with_n_zero():
    gt = np.zeros((2, 2), int)
    r = score(gt, [], gt, [])
    assert r.summary()["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0, "tp": 0, "fp": 0, "fn": 0}


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("pred", "pred_segs", "message"),
    [
        (np.array([[1, 4]]), [seg(1, 1)], r"img.png \(prediction\): segment ids \[4\] are in the PNG but not in the JSON"),
        (np.array([[1, 1]]), [seg(1, 1), seg(3, 2)], r"img.png \(prediction\): segment ids \[3\] are in the JSON but not"),
        (np.array([[1, 1]]), [seg(1, 99)], r"img.png \(prediction\): segment 1 has unknown category_id 99"),
        (np.array([[1, 1, 1]]), [seg(1, 1)], r"img.png: prediction size \(1, 3\) differs from ground truth size \(1, 2\)"),
        (np.array([[1, 1]]), [seg(1, 1), seg(1, 2)], r"img.png \(prediction\): duplicate segment ids \[1\]"),
        (np.array([[0, 0]]), [seg(0, 1)], r"img.png \(prediction\): segment id 0 outside"),
    ],
)
def test_prediction_validation_errors_name_the_image(pred, pred_segs, message):
    with pytest.raises(PQInputError, match=message):
        score(np.array([[1, 1]]), [seg(1, 1)], pred, pred_segs)


def test_ground_truth_is_validated_too():
    with pytest.raises(PQInputError, match=r"ground truth\): segment ids \[2\] are in the PNG"):
        score(np.array([[1, 2]]), [seg(1, 1)], np.array([[1, 1]]), [seg(1, 1)])
    with pytest.raises(PQInputError, match=r"ground truth\): segment ids \[5\] are in the JSON"):
        score(np.array([[1, 1]]), [seg(1, 1), seg(5, 1)], np.array([[1, 1]]), [seg(1, 1)])
    assert issubclass(PQInputError, ValueError)


def _tiny_files(root: Path, pred_ids: np.ndarray | None = None, pred_segs: list | None = None) -> dict[str, Path]:
    gt = SynthPanoptic(np.array([[1, 1], [8, 8]], np.int32), [seg(1, 1), seg(8, 10)])
    pred = SynthPanoptic(gt.ids if pred_ids is None else pred_ids, gt.segments if pred_segs is None else pred_segs)
    paths = {"gt_json": root / "gt.json", "gt_dir": root / "gt", "pred_json": root / "pred.json", "pred_dir": root / "pred"}
    write_coco_panoptic(paths["gt_json"], paths["gt_dir"], [("a", gt), ("b", gt)], CATS)
    write_coco_panoptic(paths["pred_json"], paths["pred_dir"], [("a", pred), ("b", gt)], CATS)
    return paths


def test_file_level_errors(tmp_path):
    p = _tiny_files(tmp_path)
    assert pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False).summary()["All"]["pq"] == 1.0
    (p["pred_dir"] / "b.png").unlink()
    with pytest.raises(PQInputError, match=r"b.png: prediction PNG not found"):
        pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False)
    data = json.loads(p["pred_json"].read_text())
    data["annotations"] = data["annotations"][:1]
    p["pred_json"].write_text(json.dumps(data))
    with pytest.raises(PQInputError, match=r"pred.json: no prediction for image 2 \(b.png\)"):
        pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False)
    p["pred_json"].write_text("{not json")
    with pytest.raises(ValueError, match=r"pred.json: not valid JSON"):
        pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False)
    with pytest.raises(FileNotFoundError, match=r"PNG folder not found: .*nowhere"):
        pq_compute(p["gt_json"], tmp_path / "nowhere", p["pred_json"], p["pred_dir"], progress=False)


def test_file_level_size_mismatch_and_unknown_category(tmp_path):
    p = _tiny_files(tmp_path, pred_ids=np.ones((2, 3), np.int32), pred_segs=[seg(1, 1)])
    with pytest.raises(PQInputError, match=r"a.png: prediction size \(2, 3\) differs"):
        pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False)
    p = _tiny_files(tmp_path / "cat", pred_ids=np.ones((2, 2), np.int32), pred_segs=[seg(1, 42)])
    with pytest.raises(PQInputError, match=r"a.png \(prediction\): segment 1 has unknown category_id 42"):
        pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False)


# ----------------------------------------------------------------------------------------- the CLI


def _cli_args(p: dict[str, Path], out: Path) -> list[str]:
    return ["--gt-json", str(p["gt_json"]), "--gt-dir", str(p["gt_dir"]), "--pred-json", str(p["pred_json"]),
            "--pred-dir", str(p["pred_dir"]), "--out", str(out), "--no-progress"]


def test_cli_end_to_end_writes_the_report(tmp_path):
    p = make_pair(tmp_path / "data", 6, seed=3)
    out = tmp_path / "report"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*_cli_args(p, out), "--workers", "2"]) == 0
    expected = pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False).summary()
    assert f"All       | {100 * expected['All']['pq']:5.1f}" in buf.getvalue()
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["All"]["pq"] == pytest.approx(expected["All"]["pq"], abs=1e-15)
    assert report["inputs"]["gt_json"] == str(p["gt_json"])
    assert [b["name"] for b in report["by_size"]] == ["small", "medium", "large"]
    md = (out / "report.md").read_text()
    assert "## All / Things / Stuff" in md and "## Per class" in md and "## PQ by object size" in md
    for png in ("pq_by_class.png", "pq_by_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_quantile_buckets(tmp_path):
    p = make_pair(tmp_path / "data", 6, seed=4)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*_cli_args(p, tmp_path / "out"), "--quantile-buckets", "2"]) == 0
    buckets = json.loads((tmp_path / "out" / "report.json").read_text())["by_size"]
    assert [b["name"] for b in buckets] == ["q1", "q2"] and buckets[0]["hi"] == buckets[1]["lo"]


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    p = _tiny_files(tmp_path, pred_ids=np.array([[1, 1], [8, 3]], np.int32))
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval" / "pq.py"), *_cli_args(p, tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: a.png (prediction): segment ids [3] are in the PNG but not in the JSON"
    ]
    assert not (tmp_path / "out" / "report.json").exists()


def test_cli_bad_option_exits_2(tmp_path, capsys):
    p = _tiny_files(tmp_path)
    assert main([*_cli_args(p, tmp_path / "out"), "--workers", "0"]) == 2
    assert "error: --workers must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------------ property: GT against itself


@st.composite
def panoptic_maps(draw):
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    n = draw(st.integers(1, 6))
    labels = np.array(draw(st.lists(st.integers(0, n), min_size=h * w, max_size=h * w))).reshape(h, w)
    present = sorted(set(labels.ravel().tolist()) - {0})
    ids = draw(st.lists(st.integers(1, 2**24 - 1), min_size=len(present), max_size=len(present), unique=True))
    cats = [draw(st.sampled_from([1, 2, 3, 10, 11])) for _ in present]
    crowded: set[int] = set()
    segs = []
    for seg_id, cat in zip(ids, cats, strict=True):
        crowd = int(TABLE.isthing[TABLE.index[cat]] and cat not in crowded and draw(st.booleans()))
        if crowd:  # COCO keeps at most one crowd segment per category
            crowded.add(cat)
        segs.append(seg(seg_id, cat, crowd))
    table = np.zeros(n + 1, np.int64)
    table[present] = ids
    return table[labels], segs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(panoptic_maps(), st.integers(0, 2**31))
def test_ground_truth_against_itself_scores_one(gt, seed):
    ids, segs = gt
    # Renumber the prediction so matching cannot lean on equal ids.
    rng = np.random.default_rng(seed)
    new = {s["id"]: int(v) for s, v in zip(segs, rng.choice(2**24 - 1, len(segs), replace=False) + 1, strict=True)}
    pred_ids = np.vectorize(lambda v: new.get(int(v), 0))(ids) if segs else ids
    pred_segs = [{"id": new[s["id"]], "category_id": s["category_id"]} for s in segs]
    r = score(ids, segs, pred_ids, pred_segs)
    assert (r.fp == 0).all() and (r.fn == 0).all()
    assert r.tp.sum() == sum(1 for s in segs if not s["iscrowd"])
    for row in r.per_class():
        assert row["pq"] == (1.0 if row["counted"] else 0.0)
    if r.tp.sum():
        assert r.summary()["All"]["pq"] == 1.0


# ------------------------------------------------------------------------------ workers, reference


def test_workers_do_not_change_a_single_bit(tmp_path):
    p = make_pair(tmp_path, 12, seed=5)
    one = pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], workers=1, progress=False)
    two = pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], workers=2, progress=False)
    assert one.summary() == two.summary()
    assert np.array_equal(one.segments, two.segments)


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pq_ref"), 20, seed=11, size_range=(40, 120))


def _assert_same_as_reference(ours: PQResult, ref: dict) -> None:
    summary = ours.summary()
    for kind in ("All", "Things", "Stuff"):
        assert summary[kind]["n"] == ref[kind]["n"]
        for metric in ("pq", "sq", "rq"):
            assert abs(summary[kind][metric] - ref[kind][metric]) <= 1e-9, (kind, metric)
    per_class = {row["id"]: row for row in ours.per_class()}
    for cat_id, row in ref["per_class"].items():
        for metric in ("pq", "sq", "rq"):
            assert abs(per_class[int(cat_id)][metric] - row[metric]) <= 1e-9, (cat_id, metric)


def test_matches_panopticapi_on_random_images(random_pair):
    evaluation = pytest.importorskip(
        "panopticapi.evaluation", reason="reference not installed: pip install --no-deps panopticapi-lite"
    )
    p = random_pair
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its progress
        ref = evaluation.pq_compute(str(p["gt_json"]), str(p["pred_json"]), str(p["gt_dir"]), str(p["pred_dir"]))
    ours = pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False)
    assert ours.summary()["All"]["tp"] > 0 and ours.summary()["All"]["fp"] > 0 and ours.summary()["All"]["fn"] > 0
    _assert_same_as_reference(ours, ref)


def test_matches_hotcoco_on_random_images(random_pair):
    panoptic = pytest.importorskip("hotcoco.panoptic", reason="hotcoco not installed: pip install hotcoco")
    p = random_pair
    with contextlib.redirect_stdout(io.StringIO()):
        ref = panoptic.pq_compute(str(p["gt_json"]), str(p["pred_json"]), str(p["gt_dir"]), str(p["pred_dir"]))
    ours = pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False)
    _assert_same_as_reference(ours, ref)


def test_reference_quirks_on_one_image(tmp_path):
    """Two crowds of one category, a prediction on void, the reference's GT areas: all as panopticapi."""
    evaluation = pytest.importorskip("panopticapi.evaluation", reason="reference not installed")
    gt = np.array([[7, 7, 6, 6, 8, 8, 0, 0]] * 3, np.int32)
    gt_segs = [seg(7, 1, 1), seg(6, 1, 1), seg(8, 10)]
    for s in gt_segs:
        s["area"] = int((gt == s["id"]).sum())
    pred = np.array([[5, 5, 4, 4, 8, 8, 3, 3]] * 3, np.int32)
    pred_segs = [seg(5, 1), seg(4, 1), seg(8, 10), seg(3, 2)]
    p = {"gt_json": tmp_path / "gt.json", "gt_dir": tmp_path / "gt", "pred_json": tmp_path / "p.json", "pred_dir": tmp_path / "p"}
    write_coco_panoptic(p["gt_json"], p["gt_dir"], [("x", SynthPanoptic(gt, gt_segs))], CATS)
    write_coco_panoptic(p["pred_json"], p["pred_dir"], [("x", SynthPanoptic(pred, pred_segs))], CATS)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = evaluation.pq_compute(str(p["gt_json"]), str(p["pred_json"]), str(p["gt_dir"]), str(p["pred_dir"]))
    ours = pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False)
    assert per_cat(ours)[1]["fp"] == 1  # the prediction on the first crowd
    _assert_same_as_reference(ours, ref)


def test_png_folders_default_to_the_json_path_without_suffix(tmp_path):
    p = _tiny_files(tmp_path)  # writes gt.json + gt/, pred.json + pred/
    assert pq_compute(p["gt_json"], None, p["pred_json"], None, progress=False).summary()["All"]["pq"] == 1.0


def test_pil_and_opencv_written_pngs_decode_and_score_alike(tmp_path):
    """OpenCV decodes PIL-written PNGs (COCO's GT) to the ids PIL itself reads, and the scores do not
    depend on which library wrote the files."""
    from PIL import Image

    from genpan.coco_panoptic import read_panoptic_png
    from genpan.eval.pq_synth import resave_with_pil

    paths = make_pair(tmp_path, 12, seed=5, size_range=(1, 40))
    before = pq_compute(paths["gt_json"], paths["gt_dir"], paths["pred_json"], paths["pred_dir"], progress=False)
    resave_with_pil(paths["gt_dir"])
    for png in sorted(paths["gt_dir"].glob("*.png")):
        rgb = np.asarray(Image.open(png), dtype=np.int64)  # panopticapi's reading: PIL + rgb2id
        np.testing.assert_array_equal(read_panoptic_png(png), rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2])
    after = pq_compute(paths["gt_json"], paths["gt_dir"], paths["pred_json"], paths["pred_dir"], progress=False)
    for field in ("tp", "fp", "fn", "iou"):
        np.testing.assert_array_equal(getattr(before, field), getattr(after, field))
    assert before.segments.tobytes() == after.segments.tobytes()
