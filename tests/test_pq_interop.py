"""Other systems' prediction files: every variant panopticapi's `pq_compute` accepts is scored as it scores
it, and where the reference refuses a file, `eval/pq.py` refuses it too, with one line naming the image."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from genpan.eval.pq import PQInputError, pq_compute
from genpan.eval.pq_synth import make_pair

evaluation = pytest.importorskip("panopticapi.evaluation", reason="reference not installed: pip install --no-deps panopticapi-lite")


@pytest.fixture()
def pair(tmp_path: Path) -> dict[str, Path]:
    return make_pair(tmp_path, 8, seed=3, size_range=(40, 90))


def _edit_prediction(p: dict[str, Path], edit) -> None:
    data = json.loads(p["pred_json"].read_text())
    edit(data)
    p["pred_json"].write_text(json.dumps(data))


def _reference(p: dict[str, Path]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its progress
        return evaluation.pq_compute(str(p["gt_json"]), str(p["pred_json"]), str(p["gt_dir"]), str(p["pred_dir"]))


def _ours(p: dict[str, Path]):
    return pq_compute(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"], progress=False)


def _assert_identical(p: dict[str, Path]) -> None:
    ref, ours = _reference(p), _ours(p)
    summary = ours.summary()
    for kind in ("All", "Things", "Stuff"):
        assert summary[kind]["n"] == ref[kind]["n"]
        for metric in ("pq", "sq", "rq"):
            assert abs(summary[kind][metric] - ref[kind][metric]) <= 1e-12, (kind, metric)
    assert summary["All"]["tp"] > 0 and summary["All"]["fp"] + summary["All"]["fn"] > 0  # a real comparison


def test_prediction_json_without_categories(pair):
    _edit_prediction(pair, lambda d: d.pop("categories"))
    _assert_identical(pair)


def test_prediction_json_with_only_annotations(pair):
    _edit_prediction(pair, lambda d: [d.pop(k) for k in list(d) if k != "annotations"])
    _assert_identical(pair)


def test_extra_keys_in_annotations_and_segments(pair):
    def edit(data):
        for ann in data["annotations"]:
            ann["score_model"] = "other-system"
            for s in ann["segments_info"]:
                s.update(score=0.9, bbox=[0, 0, 1, 1], area=s.get("area", 1), extra={"x": 1})
    _edit_prediction(pair, edit)
    _assert_identical(pair)


def test_segments_info_in_any_order(pair):
    rng = random.Random(0)
    _edit_prediction(pair, lambda d: [rng.shuffle(a["segments_info"]) for a in d["annotations"]])
    _edit_prediction(pair, lambda d: d["annotations"].reverse())
    _assert_identical(pair)


def test_prediction_pngs_written_by_pil_and_gt_by_opencv(pair):
    from genpan.eval.pq_synth import resave_with_pil

    resave_with_pil(pair["pred_dir"])
    _assert_identical(pair)


def test_prediction_pngs_with_an_alpha_channel(pair):
    from PIL import Image

    for png in pair["pred_dir"].glob("*.png"):
        rgb = np.asarray(Image.open(png).convert("RGB"))
        rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
        Image.fromarray(rgba, "RGBA").save(png)
    _assert_identical(pair)


def test_extra_predicted_images_are_ignored(pair):
    extra = json.loads(pair["pred_json"].read_text())["annotations"][0]
    shutil.copy(pair["pred_dir"] / extra["file_name"], pair["pred_dir"] / "extra.png")
    _edit_prediction(pair, lambda d: d["annotations"].append({**extra, "image_id": "not-in-gt", "file_name": "extra.png"}))
    _assert_identical(pair)


def test_gt_image_without_prediction_is_refused_by_both(pair):
    removed = json.loads(pair["pred_json"].read_text())["annotations"][0]["image_id"]
    _edit_prediction(pair, lambda d: d["annotations"].pop(0))
    with pytest.raises(Exception, match="no prediction"):
        _reference(pair)
    with pytest.raises(PQInputError, match=f"no prediction for image {removed!r}"):
        _ours(pair)


def test_segment_missing_from_the_png_is_refused_by_both(pair):
    def edit(data):
        data["annotations"][0]["segments_info"].append({"id": 16777000, "category_id": data["annotations"][0]["segments_info"][0]["category_id"]})
    _edit_prediction(pair, edit)
    with pytest.raises(Exception, match="(?i)in JSON and not presented in PNG"):
        _reference(pair)
    with pytest.raises(PQInputError, match="in the JSON but not in the PNG"):
        _ours(pair)


def test_unknown_category_is_refused_by_both(pair):
    _edit_prediction(pair, lambda d: d["annotations"][0]["segments_info"][0].update(category_id=99999))
    with pytest.raises(KeyError, match="unknown category_id 99999"):
        _reference(pair)
    with pytest.raises(PQInputError, match="99999"):
        _ours(pair)
