"""Fuzz (hypothesis) the COCO panoptic reader and eval/pq.py with random small panoptic maps and JSONs.

Allowed outcomes. Reader: construction and `refs()` may raise ValueError / FileNotFoundError (a whole-file
problem, naming the file); `load(ref)` returns a Sample or a SampleError, never raises. PQ: a result, or a
ValueError (PQInputError) / FileNotFoundError with a message. Anything else is a bug.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genpan.coco_panoptic import id_to_rgb
from genpan.eval.pq import pq_compute
from genpan.prep.readers import Sample, SampleError
from genpan.prep.readers.coco import CocoPanopticReader

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

SEGMENT_IDS = st.sampled_from([0, 1, 2, 3, 7, 4242, 256**3 - 1])
CATEGORY_IDS = st.sampled_from([1, 2, 5, 999])
JUNK = st.one_of(st.none(), st.text(max_size=3), st.floats(allow_nan=True), st.lists(st.integers(), max_size=2), st.integers(-(2**40), 2**40))


@st.composite
def panoptic_maps(draw: Any) -> np.ndarray:
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return np.array(draw(st.lists(SEGMENT_IDS, min_size=h * w, max_size=h * w)), np.int64).reshape(h, w)


@st.composite
def segments(draw: Any, ids: list[int], malformed: bool) -> list[Any]:
    """segments_info for a map: its ids (some dropped, some added), categories known or not; junk when malformed."""
    listed = [i for i in sorted(set(ids)) if i != 0 and draw(st.booleans() if malformed else st.just(True))]
    listed += draw(st.lists(SEGMENT_IDS, max_size=2))
    segs: list[Any] = [{"id": i, "category_id": draw(CATEGORY_IDS), "iscrowd": draw(st.sampled_from([0, 1])), "area": 1, "bbox": [0, 0, 1, 1]}
                       for i in listed]
    if malformed:
        for seg in segs:
            key = draw(st.sampled_from(["id", "category_id", "iscrowd", "area", None]))
            if key is not None:
                if draw(st.booleans()):
                    seg.pop(key)
                else:
                    seg[key] = draw(JUNK)
        segs += draw(st.lists(JUNK, max_size=1))
    return segs


@st.composite
def coco_documents(draw: Any, malformed: bool) -> tuple[dict[str, Any], list[np.ndarray], list[tuple[int, int]]]:
    """(JSON document, label maps, image sizes) for 1-3 images."""
    n = draw(st.integers(1, 3))
    maps = [draw(panoptic_maps()) for _ in range(n)]
    sizes = [m.shape if draw(st.integers(0, 5)) else (m.shape[0] + 1, m.shape[1]) for m in maps]
    images = [{"id": i + 1, "file_name": f"im{i}.jpg", "height": s[0], "width": s[1]} for i, s in enumerate(sizes)]
    anns = [{"image_id": i + 1, "file_name": f"im{i}.png", "segments_info": draw(segments(m.ravel().tolist(), malformed))}
            for i, m in enumerate(maps)]
    cats = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 0}, {"id": 5, "name": "c", "isthing": 1}]
    doc: dict[str, Any] = {"images": images, "annotations": anns, "categories": cats}
    if draw(st.integers(0, 4)) == 0:
        images.append(dict(images[0]))  # duplicate image id
    if malformed:
        for part in (images, anns):
            for item in part:
                key = draw(st.sampled_from([None, *item]))
                if key is not None:
                    if draw(st.booleans()):
                        item.pop(key)
                    else:
                        item[key] = draw(JUNK)
        if draw(st.integers(0, 5)) == 0:
            doc[draw(st.sampled_from(["images", "annotations", "categories"]))] = draw(JUNK)
    return doc, maps, sizes


def write_coco(root: Path, doc: dict[str, Any], maps: list[np.ndarray], sizes: list[tuple[int, int]]) -> Path:
    (root / "annotations" / "panoptic_x").mkdir(parents=True)
    (root / "x").mkdir()
    for i, (m, (h, w)) in enumerate(zip(maps, sizes)):
        cv2.imwrite(str(root / "annotations" / "panoptic_x" / f"im{i}.png"), id_to_rgb(m)[..., ::-1])
        cv2.imwrite(str(root / "x" / f"im{i}.jpg"), np.full((h, w, 3), 90, np.uint8))
    path = root / "annotations" / "panoptic_x.json"
    path.write_text(json.dumps(doc))
    return path


def read_everything(json_path: Path) -> list[Sample | SampleError]:
    try:
        reader = CocoPanopticReader(json_path)
        refs = reader.refs()
    except (ValueError, FileNotFoundError) as exc:
        assert str(exc)
        return []
    out = [reader.load(ref) for ref in refs]
    assert all(isinstance(o, Sample | SampleError) for o in out)
    return out


@FUZZ
@given(case=coco_documents(malformed=False))
def test_reader_on_well_typed_json_only_gives_samples_or_errors(case) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = read_everything(write_coco(Path(tmp), *case))
        for o in out:
            if isinstance(o, Sample):  # a sample that loads is consistent: every pixel id is listed
                listed = {s["id"] for s in o.segments}
                assert set(np.unique(o.pan_ids).tolist()) - {0} <= listed



@FUZZ
@given(case=coco_documents(malformed=True))
def test_reader_on_malformed_json_only_gives_samples_or_errors(case) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        read_everything(write_coco(Path(tmp), *case))


# -- PQ -----------------------------------------------------------------------------------------------------------
def pq_files(root: Path, doc: dict[str, Any], maps: list[np.ndarray], name: str) -> Path:
    folder = root / name
    folder.mkdir()
    for i, m in enumerate(maps):
        cv2.imwrite(str(folder / f"im{i}.png"), id_to_rgb(m)[..., ::-1])
    path = root / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def run_pq(gt: tuple, pred: tuple) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gt_json, pred_json = pq_files(root, gt[0], gt[1], "gt"), pq_files(root, pred[0], pred[1], "pred")
        try:
            result = pq_compute(gt_json, None, pred_json, None, progress=False)
        except (ValueError, FileNotFoundError) as exc:
            assert str(exc)
            return
        for row in result.summary().values():
            assert 0.0 <= row["pq"] <= 1.0 and 0.0 <= row["sq"] <= 1.0 and 0.0 <= row["rq"] <= 1.0


@FUZZ
@given(gt=coco_documents(malformed=False), pred=coco_documents(malformed=False))
def test_pq_on_well_typed_json_gives_a_result_or_a_clear_error(gt, pred) -> None:
    run_pq(gt, pred)


@FUZZ
@given(gt=coco_documents(malformed=True), pred=coco_documents(malformed=True))
def test_pq_on_malformed_json_gives_a_result_or_a_clear_error(gt, pred) -> None:
    run_pq(gt, pred)


# -- the bugs the malformed-JSON fuzzing found, one deterministic case each ------------------------------------------
def _coco_case(tmp_path: Path, mutate) -> list[Sample | SampleError]:
    m = np.array([[1, 1], [0, 2]])
    doc = {"images": [{"id": 1, "file_name": "im0.jpg", "height": 2, "width": 2}],
           "annotations": [{"image_id": 1, "file_name": "im0.png", "segments_info": [
               {"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 2, "iscrowd": 0}]}],
           "categories": [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 0}]}
    mutate(doc)
    return read_everything(write_coco(tmp_path, doc, [m], [(2, 2)]))


def test_the_unmutated_case_loads(tmp_path: Path) -> None:
    (sample,) = _coco_case(tmp_path, lambda doc: None)
    assert isinstance(sample, Sample) and sample.pan_ids.tolist() == [[1, 1], [0, 2]]


READER_BUGS = {
    "height is a string": lambda d: d["images"][0].update(height="2"),  # int("2") passes: control
    "height is empty": lambda d: d["images"][0].update(height=""),
    "segment is not an object": lambda d: d["annotations"][0]["segments_info"].append(7),
    "segments_info is null": lambda d: d["annotations"][0].update(segments_info=None),
    "category_id is null": lambda d: d["annotations"][0]["segments_info"][0].update(category_id=None),
    "image id is a list": lambda d: d["images"][0].update(id=[1]),
    "annotation is a string": lambda d: d["annotations"].append("x"),
    "images is null": lambda d: d.update(images=None),
    "annotation file_name is a number": lambda d: d["annotations"][0].update(file_name=5),
}


@pytest.mark.parametrize("case", [c for c in READER_BUGS if c != "height is a string"])
def test_malformed_reader_json_gives_an_error_naming_the_json(tmp_path: Path, case: str) -> None:
    """Found by the malformed-JSON fuzzer: each wrong JSON type ends as a SampleError (or, for a whole-file
    problem, a ValueError) that names the JSON file — never a bare TypeError from int()/dict()/hash()."""
    m = np.array([[1, 1], [0, 2]])
    doc = {"images": [{"id": 1, "file_name": "im0.jpg", "height": 2, "width": 2}],
           "annotations": [{"image_id": 1, "file_name": "im0.png", "segments_info": [
               {"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 2, "iscrowd": 0}]}],
           "categories": [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 0}]}
    READER_BUGS[case](doc)
    path = write_coco(tmp_path, doc, [m], [(2, 2)])
    try:
        reader = CocoPanopticReader(path)
        out = [reader.load(ref) for ref in reader.refs()]
    except ValueError as exc:
        assert "panoptic_x.json" in str(exc)
        return
    errors = [o for o in out if isinstance(o, SampleError)]
    assert errors and all("panoptic_x.json" in f"{e.source_path} {e.reason}" for e in errors), out


def test_reader_control_a_numeric_string_height_is_accepted(tmp_path: Path) -> None:
    (sample,) = _coco_case(tmp_path, READER_BUGS["height is a string"])
    assert isinstance(sample, Sample)


PQ_BUGS = {
    "segments_info is null": lambda d: d["annotations"][0].update(segments_info=None),
    "image_id is a list": lambda d: d["annotations"][0].update(image_id=[1]),
    "annotations is null": lambda d: d.update(annotations=None),
}


@pytest.mark.parametrize("case", list(PQ_BUGS))
def test_malformed_pq_json_gives_an_error_naming_the_file(tmp_path: Path, case: str) -> None:
    """Found by the malformed-JSON fuzzer: a wrong JSON type is a PQInputError naming the file."""
    m = np.array([[1, 0]])
    good = {"images": [{"id": 1, "file_name": "im0.jpg"}], "categories": [{"id": 1, "name": "a", "isthing": 1}],
            "annotations": [{"image_id": 1, "file_name": "im0.png", "segments_info": [{"id": 1, "category_id": 1}]}]}
    bad = json.loads(json.dumps(good))
    PQ_BUGS[case](bad)
    gt, pred = pq_files(tmp_path, good, [m], "gt"), pq_files(tmp_path, bad, [m], "pred")
    with pytest.raises(ValueError) as info:
        pq_compute(gt, None, pred, None, progress=False)
    assert "pred.json" in str(info.value) or "im0.png" in str(info.value)


# -- the training loader's sample decode (genpan/train/data.py) ----------------------------------------------------
LOADER_JUNK = st.one_of(JUNK, st.dictionaries(st.sampled_from(["ins", "iscrowd", "dist_scale", "dtype", "shape", "sem.zst"]), JUNK, max_size=2))


@st.composite
def damaged_samples(draw: Any) -> dict[str, Any]:
    """A sample as prep writes it (1-6 px a side, disp included) with one or two fields damaged: cut
    short, one byte changed, replaced by junk bytes, or (json) a junk structure."""
    from test_data import _raw_sample

    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    image_kind = draw(st.sampled_from(["png", "jpg"]))
    raw = _raw_sample("k0", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 9, (h, w), dtype=np.uint8),
                      rng.integers(0, 4, (h, w)), rng.integers(0, 256, (h, w), dtype=np.uint8), [False, False, False, True],
                      rng.integers(0, 65536, (h, w)).astype(np.uint16), image_kind)
    meta = json.loads(raw["json"])
    for name in draw(st.lists(st.sampled_from([image_kind, "sem.zst", "ins.zst", "dist.zst", "disp.zst", "json"]), min_size=1, max_size=2)):
        data = raw[name]
        how = draw(st.sampled_from(["cut", "byte", "junk", "structure"] if name == "json" else ["cut", "byte", "junk"]))
        if not data:  # already cut to nothing by the first damage
            how = "junk"
        if how == "cut":
            raw[name] = data[: draw(st.integers(0, len(data) - 1))]
        elif how == "byte":
            pos = draw(st.integers(0, len(data) - 1))
            raw[name] = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1 :]
        elif how == "junk":
            raw[name] = draw(st.binary(max_size=64))
        else:
            # junk in place of the whole json, or in one of its keys with the rest (and the prep version) intact
            key = draw(st.sampled_from(["segments", "params", "planes", "height", "width"]))
            junk = draw(st.one_of(LOADER_JUNK, st.lists(LOADER_JUNK, max_size=2)))
            doc = draw(st.one_of(LOADER_JUNK, st.just({**meta, key: junk})))
            raw[name] = json.dumps(doc).encode()
    return raw


@FUZZ
@given(damaged_samples())
def test_loader_decode_of_damaged_samples_raises_only_value_errors(raw: dict[str, Any]) -> None:
    """decode_sample of a damaged sample gives consistent arrays or a ValueError naming the sample."""
    from genpan.train.data import decode_sample

    try:
        out = decode_sample(raw, "disp")
    except ValueError as exc:
        assert "sample k0" in str(exc)
        return
    assert out["image"].shape[:2] == out["sem"].shape == out["ins"].shape == out["dist"].shape == out["disp"].shape
