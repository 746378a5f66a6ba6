"""The pipeline on real dataset files nobody on this project made: panopticapi's two COCO val2017 samples
and an NYU Depth V2 frame in the BTS layout (each folder's SOURCE.md under tests/data/ says where it comes
from), and, where GENPAN_CITYSCAPES_SAMPLE names one, a Cityscapes frame with cityscapesScripts' panoptic
conversion of it (Cityscapes' terms forbid redistributing the data, so it is not in the repository; the
layout is in prep/README.md). Every expectation is computed independently from the files with plain
numpy / PIL, or by panopticapi itself."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from shard_fields import stored_plane

from genpan.config import to_dict
from genpan.eval.pq import pq_compute
from genpan.eval.predict import main as predict_main
from genpan.prep.build_shards import DataConfig, PrepConfig, RunConfig, ShardConfig, TeacherConfig, run
from genpan.prep.manifest import MANIFEST_NAME, read_manifest
from genpan.prep.readers import Sample, iterate, make_reader
from genpan.prep.readers.cityscapes import CITYSCAPES_CLASSES
from genpan.train.model import build_model, tiny_cpu_config

COCO = Path(__file__).resolve().parent / "data" / "coco_panoptic"
SPLIT = "val2017"
GT_JSON = COCO / "annotations" / f"panoptic_{SPLIT}.json"
GT_DIR = COCO / "annotations" / f"panoptic_{SPLIT}"
KEYS = ("000000142238", "000000439180")
CITYSCAPES = Path(os.environ.get("GENPAN_CITYSCAPES_SAMPLE") or "/nonexistent/cityscapes-sample")
CS_STEM = "frankfurt_000000_000294"
NYU = Path(__file__).resolve().parent / "data" / "nyu_depth_v2"
needs_cityscapes = pytest.mark.skipif(not CITYSCAPES.is_dir(), reason="set GENPAN_CITYSCAPES_SAMPLE (see prep/README.md)")

evaluation = pytest.importorskip("panopticapi.evaluation", reason="reference not installed: pip install --no-deps panopticapi-lite")


def gt() -> dict[str, Any]:
    return json.loads(GT_JSON.read_text())


def rgb2id(path: Path) -> np.ndarray:
    """The COCO panoptic packing, written out: id = R + 256·G + 256²·B (PIL decode, not OpenCV)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def bbox_of(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def coco_train_ids() -> tuple[dict[int, int], set[int]]:
    cats = sorted(gt()["categories"], key=lambda c: c["id"])
    return {c["id"]: i for i, c in enumerate(cats)}, {c["id"] for c in cats if c["isthing"]}


# -- the JSON agrees with its PNGs (a check on the sample itself, so the tests below mean something) ------
def test_the_sample_json_agrees_with_its_pngs() -> None:
    data = gt()
    assert len(data["categories"]) == 133 and [a["image_id"] for a in data["annotations"]] == [142238, 439180]
    crowd = 0
    for ann in data["annotations"]:
        ids = rgb2id(GT_DIR / ann["file_name"])
        assert sorted(int(i) for i in np.unique(ids) if i) == sorted(s["id"] for s in ann["segments_info"])
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            assert int(mask.sum()) == seg["area"] and bbox_of(mask) == seg["bbox"]
            crowd += seg["iscrowd"]
    assert crowd >= 1  # the samples hold a crowd region: the flag is exercised


# -- the reader ---------------------------------------------------------------------------------------------
def test_coco_reader_decodes_the_real_samples_exactly() -> None:
    reader = make_reader("coco", root=str(COCO), split=SPLIT)
    cats = {c["id"]: c for c in gt()["categories"]}
    assert [(c.id, c.name, c.isthing) for c in reader.categories] == [
        (i, cats[i]["name"], bool(cats[i]["isthing"])) for i in sorted(cats)]
    assert [c.train_id for c in reader.categories] == list(range(133))
    samples = list(iterate(reader))
    assert all(isinstance(s, Sample) for s in samples), [str(s) for s in samples if not isinstance(s, Sample)]
    by_image = {a["image_id"]: a for a in gt()["annotations"]}
    images = {i["id"]: i for i in gt()["images"]}
    assert sorted(s.key for s in samples) == list(KEYS)
    for s in samples:
        image_id = int(s.key)
        ann, info = by_image[image_id], images[image_id]
        photo = COCO / SPLIT / info["file_name"]
        assert s.image_bytes == photo.read_bytes() and s.image_ext == "jpg"  # never re-encoded
        assert (s.height, s.width) == (info["height"], info["width"]) == Image.open(photo).size[::-1]
        np.testing.assert_array_equal(s.pan_ids, rgb2id(GT_DIR / ann["file_name"]))
        assert s.pan_ids.dtype == np.int32 and s.depth_m is None
        by_id = {seg["id"]: seg for seg in s.segments}
        assert len(by_id) == len(ann["segments_info"])
        for ref in ann["segments_info"]:
            got = by_id[ref["id"]]
            assert (got["category_id"], got["iscrowd"], got["area"], got["bbox"]) == (
                ref["category_id"], ref["iscrowd"], ref["area"], ref["bbox"])
            assert int((s.pan_ids == ref["id"]).sum()) == got["area"]
    assert len({s.source_hash for s in samples}) == 2


# -- prep/build_shards.py -----------------------------------------------------------------------------------
def test_build_shards_on_the_real_samples_round_trips(ray_address: str, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    cfg = PrepConfig(
        out=out,
        data=DataConfig(kind="coco", root=COCO, split=SPLIT),
        shards=ShardConfig(samples_per_shard=2, prefix="real"),
        teacher=TeacherConfig(kind="none"),
        run=RunConfig(progress=False, manifest_every_s=0.0),
    )
    report = run(cfg, log=lambda m: None)
    assert report.samples_ok == 2 and report.quarantined == 0
    manifest = read_manifest(out / MANIFEST_NAME)
    assert manifest is not None
    train_id, things = coco_train_ids()
    anns = {f"{a['image_id']:012d}": a for a in gt()["annotations"]}
    seen = []
    for got in wds.WebDataset([str(out / s.shard) for s in manifest.shards], shardshuffle=False):
        key = got["__key__"]
        seen.append(key)
        ann = anns[key]
        ids = rgb2id(GT_DIR / ann["file_name"])
        meta = json.loads(got["json"])
        assert got["jpg"] == (COCO / SPLIT / f"{key}.jpg").read_bytes()
        assert (meta["height"], meta["width"]) == ids.shape and meta["panoptic"] is True
        sem, ins = stored_plane(got, "sem.zst"), stored_plane(got, "ins.zst")
        assert sem.shape == ins.shape == ids.shape
        expected_sem = np.full(ids.shape, 255, np.int64)
        for seg in ann["segments_info"]:
            expected_sem[ids == seg["id"]] = train_id[seg["category_id"]]
        np.testing.assert_array_equal(sem, expected_sem)
        # instance indices: one per thing segment (crowd included), 0 on stuff and void
        stored = {s["id"]: s for s in meta["segments"]}
        assert sorted(stored) == sorted(s["id"] for s in ann["segments_info"])
        expected_ins = np.zeros(ids.shape, np.int64)
        for seg in ann["segments_info"]:
            row = stored[seg["id"]]
            assert (row["category_id"], row["iscrowd"], row["area"], row["bbox"]) == (
                seg["category_id"], seg["iscrowd"], seg["area"], seg["bbox"])
            assert bool(row["isthing"]) == (seg["category_id"] in things)
            if seg["category_id"] in things:
                assert row["ins"] > 0
                expected_ins[ids == seg["id"]] = row["ins"]
            else:
                assert row["ins"] == 0
        thing_ins = [stored[s["id"]]["ins"] for s in ann["segments_info"] if s["category_id"] in things]
        assert len(set(thing_ins)) == len(thing_ins) >= 5
        np.testing.assert_array_equal(ins, expected_ins)
    assert sorted(seen) == list(KEYS)


# -- eval/pq.py against panopticapi ---------------------------------------------------------------------------
def _reference(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its progress
        return evaluation.pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir))


def _assert_same_as_reference(pred_json: Path, pred_dir: Path, gt_json: Path = GT_JSON, gt_dir: Path = GT_DIR) -> dict[str, dict[str, float]]:
    ref = _reference(gt_json, gt_dir, pred_json, pred_dir)
    ours = pq_compute(gt_json, gt_dir, pred_json, pred_dir, progress=False)
    summary = ours.summary()
    for kind in ("All", "Things", "Stuff"):
        assert summary[kind]["n"] == ref[kind]["n"]
        for metric in ("pq", "sq", "rq"):
            assert abs(summary[kind][metric] - ref[kind][metric]) <= 1e-12, (kind, metric)
    per_class = {row["id"]: row for row in ours.per_class()}
    for cat_id, scores in ref["per_class"].items():
        for metric in ("pq", "sq", "rq"):
            assert abs(per_class[cat_id][metric] - scores[metric]) <= 1e-12, (cat_id, metric)
    return summary


def test_pq_of_the_ground_truth_against_itself_is_one_as_in_panopticapi() -> None:
    summary = _assert_same_as_reference(GT_JSON, GT_DIR)
    for kind in ("All", "Things", "Stuff"):
        assert summary[kind]["pq"] == summary[kind]["sq"] == summary[kind]["rq"] == 1.0
    assert summary["All"]["n"] == len({s["category_id"] for a in gt()["annotations"] for s in a["segments_info"]})


def _perturb(ids: np.ndarray, segments: list[dict[str, Any]], things: set[int], rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A plausible wrong prediction: new ids, a dropped segment, a wrong class, a shifted thing, two stuff
    regions merged, a spurious box; crowd regions predicted as ordinary segments."""
    pred = np.zeros_like(ids)
    order = list(range(len(segments)))
    new_ids = rng.choice(np.arange(1, 256**3 - 1), size=len(segments) + 1, replace=False)
    cats: dict[int, int] = {}
    stuff = [i for i in order if segments[i]["category_id"] not in things]
    thing = [i for i in order if segments[i]["category_id"] in things and not segments[i]["iscrowd"]]
    dropped, relabelled, shifted = thing[0], thing[1], thing[2]
    merged_into, merged = stuff[0], stuff[1]
    other_cat = next(c for c in sorted(things) if c != segments[relabelled]["category_id"])
    for i in order:
        seg = segments[i]
        if i == dropped:
            continue
        mask = ids == seg["id"]
        if i == shifted:
            mask = np.roll(mask, (7, -11), axis=(0, 1))
        target = merged_into if i == merged else i
        pred[mask] = new_ids[target]
        cats[int(new_ids[target])] = other_cat if i == relabelled else segments[target]["category_id"]
    h, w = ids.shape
    pred[h // 3 : h // 3 + 40, w // 2 : w // 2 + 60] = new_ids[-1]  # a false positive over whatever was there
    cats[int(new_ids[-1])] = segments[thing[3]]["category_id"]
    present = {int(i) for i in np.unique(pred) if i}
    infos = [{"id": sid, "category_id": cats[sid], "area": int((pred == sid).sum()), "bbox": bbox_of(pred == sid),
              "iscrowd": 0} for sid in sorted(present, key=lambda s: rng.random())]  # any order
    return pred, infos


def _write_perturbed(gt_json: Path, gt_dir: Path, out: Path, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    data = json.loads(gt_json.read_text())
    things = {c["id"] for c in data["categories"] if c["isthing"]}
    pred_dir = out / "pred"
    pred_dir.mkdir()
    annotations = []
    for ann in data["annotations"]:
        pred, infos = _perturb(rgb2id(gt_dir / ann["file_name"]), ann["segments_info"], things, rng)
        rgb = np.stack([pred % 256, pred // 256 % 256, pred // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(pred_dir / ann["file_name"])  # written by PIL, as other systems do
        annotations.append({"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": infos})
    pred_json = out / "pred.json"
    pred_json.write_text(json.dumps({"annotations": annotations}))  # no categories, as many systems write it
    return pred_json, pred_dir


def test_pq_of_a_perturbed_prediction_is_panopticapis(tmp_path: Path) -> None:
    summary = _assert_same_as_reference(*_write_perturbed(GT_JSON, GT_DIR, tmp_path, 17))
    for kind in ("All", "Things", "Stuff"):
        assert 0.3 < summary[kind]["pq"] < 1.0, kind
    assert summary["All"]["tp"] > 0 and summary["All"]["fp"] > 0 and summary["All"]["fn"] > 0


# -- eval/predict.py on the real photos -------------------------------------------------------------------------
def test_predict_on_the_real_photos_writes_full_size_consistent_maps(tmp_path: Path) -> None:
    cats = [{**c, "train_id": i} for i, c in enumerate(sorted(gt()["categories"], key=lambda c: c["id"]))]
    torch.manual_seed(0)
    cfg = tiny_cpu_config(num_classes=len(cats), embed_dim=32, depth=1, num_heads=2, decoder_width=16)
    state = build_model(cfg).state_dict()
    # a random model predicts next to nothing: favour the class covering most of the photos (stuff)
    state["heads.sem.proj.bias"][[c["id"] for c in cats].index(187)] += 20.0  # 187 = sky-other-merged
    ckpt = tmp_path / "final.pt"
    torch.save({"model": state, "categories": cats,
                "config": json.dumps({"model": to_dict(cfg), "data": {"size": [56, 56]}})}, ckpt)
    root = tmp_path / "coco"  # a copy: predict must not write into tests/data
    shutil.copytree(COCO, root)
    out = tmp_path / "pred"
    assert predict_main(["--checkpoint", str(ckpt), "--coco-root", str(root), "--split", SPLIT, "--out", str(out),
                         "--size", "56", "--no-progress"]) == 0
    data = json.loads((out / f"panoptic_{SPLIT}.json").read_text())
    images = {i["id"]: i for i in gt()["images"]}
    assert sorted(a["image_id"] for a in data["annotations"]) == sorted(images)
    known = {c["id"] for c in cats}
    for ann in data["annotations"]:
        info = images[ann["image_id"]]
        ids = rgb2id(out / f"panoptic_{SPLIT}" / ann["file_name"])
        assert ids.shape == (info["height"], info["width"]) == Image.open(COCO / SPLIT / info["file_name"]).size[::-1]
        assert sorted(int(i) for i in np.unique(ids) if i) == sorted(s["id"] for s in ann["segments_info"])
        assert ann["segments_info"], "the biased model predicts at least the sky"
        for seg in ann["segments_info"]:
            assert seg["category_id"] in known
            assert int((ids == seg["id"]).sum()) == seg["area"] and bbox_of(ids == seg["id"]) == seg["bbox"]
    # its output is a prediction panopticapi reads, and both score it the same
    _assert_same_as_reference(out / f"panoptic_{SPLIT}.json", out / f"panoptic_{SPLIT}")
    # a folder of the other real photos: a Cityscapes PNG and an NYU JPEG, each predicted at its own size
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = [NYU / "sync" / "bookstore_0001d" / "rgb_00001.jpg"]
    if CITYSCAPES.is_dir():
        sources.append(CITYSCAPES / "leftImg8bit" / "val" / "frankfurt" / f"{CS_STEM}_leftImg8bit.png")
    for src in sources:
        shutil.copy(src, photos / src.name)
    out = tmp_path / "folder"
    assert predict_main(["--checkpoint", str(ckpt), "--images", str(photos), "--out", str(out), "--size", "56", "--no-progress"]) == 0
    data = json.loads((out / "panoptic_pred.json").read_text())
    by_id = {a["image_id"]: a for a in data["annotations"]}
    assert sorted(by_id) == sorted(src.stem for src in sources)
    for src in sources:
        ann = by_id[src.stem]
        ids = rgb2id(out / "panoptic_pred" / ann["file_name"])
        assert ids.shape == Image.open(src).size[::-1]
        assert sorted(int(i) for i in np.unique(ids) if i) == sorted(seg["id"] for seg in ann["segments_info"])


# -- Cityscapes: createPanopticImgs output, checked against the gtFine instanceIds it was made from ----------------
def _cityscapes_expected() -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
    """Panoptic ids and segments from `*_gtFine_instanceIds.png` by the Cityscapes conventions: a value
    v ≥ 1000 is instance v % 1000 of label v // 1000, a smaller v is label v (a crowd region for classes
    with instances); only the 19 evaluated classes are kept; the segment id is v itself."""
    gt_dir = CITYSCAPES / "gtFine" / "val" / "frankfurt"
    inst = np.asarray(Image.open(gt_dir / f"{CS_STEM}_gtFine_instanceIds.png"), dtype=np.int64)
    labels = np.asarray(Image.open(gt_dir / f"{CS_STEM}_gtFine_labelIds.png"), dtype=np.int64)
    np.testing.assert_array_equal(np.where(inst >= 1000, inst // 1000, inst), labels)  # the two files agree
    evaluated = {label: thing for label, _, _, thing in CITYSCAPES_CLASSES}
    ids = np.zeros_like(inst)
    segments = {}
    for v in np.unique(inst).tolist():
        label = v // 1000 if v >= 1000 else v
        if label not in evaluated:
            continue
        mask = inst == v
        ids[mask] = v
        segments[v] = {"category_id": label, "iscrowd": int(v < 1000 and evaluated[label]), "area": int(mask.sum()),
                       "bbox": bbox_of(mask)}
    return ids, segments


@needs_cityscapes
def test_the_official_conversion_matches_the_instance_ids() -> None:
    ids, segments = _cityscapes_expected()
    data = json.loads((CITYSCAPES / "gtFine" / "cityscapes_panoptic_val.json").read_text())
    (ann,) = data["annotations"]
    np.testing.assert_array_equal(rgb2id(CITYSCAPES / "gtFine" / "cityscapes_panoptic_val" / ann["file_name"]), ids)
    assert {s["id"]: {k: s[k] for k in ("category_id", "iscrowd", "area", "bbox")} for s in ann["segments_info"]} == segments
    assert sum(segments[v]["category_id"] in (24, 26) for v in segments) >= 5  # persons and cars: things to index


@needs_cityscapes
@pytest.mark.parametrize("split", ["val", "val_trainId"])
def test_cityscapes_reader_on_the_official_conversion(split: str) -> None:
    reader = make_reader("cityscapes", root=str(CITYSCAPES), split=split)
    assert sorted(c.train_id for c in reader.categories) == list(range(19)) and sum(c.isthing for c in reader.categories) == 8
    (sample,) = list(iterate(reader))
    assert isinstance(sample, Sample), str(sample)
    photo = CITYSCAPES / "leftImg8bit" / "val" / "frankfurt" / f"{CS_STEM}_leftImg8bit.png"
    assert sample.key == CS_STEM and sample.source_path == str(photo)
    assert sample.image_bytes == photo.read_bytes() and sample.image_ext == "png" and (sample.height, sample.width) == (128, 256)
    ids, segments = _cityscapes_expected()
    np.testing.assert_array_equal(sample.pan_ids, ids)
    label_to_train = {label: train for label, train, _, _ in CITYSCAPES_CLASSES}
    cat = {c.id: c for c in reader.categories}
    got = {s["id"]: s for s in sample.segments}
    assert sorted(got) == sorted(segments)
    for v, want in segments.items():
        seg = got[v]
        assert (seg["iscrowd"], seg["area"], seg["bbox"]) == (want["iscrowd"], want["area"], want["bbox"])
        category = cat[seg["category_id"]]  # label ids, or train ids with --use-train-id: the same class
        assert category.train_id == label_to_train[want["category_id"]]
        assert category.isthing == (want["category_id"] >= 24)


@needs_cityscapes
def test_pq_on_the_cityscapes_conversion_is_panopticapis(tmp_path: Path) -> None:
    """String image ids and label-id categories, as createPanopticImgs writes them."""
    gt_json = CITYSCAPES / "gtFine" / "cityscapes_panoptic_val.json"
    gt_dir = CITYSCAPES / "gtFine" / "cityscapes_panoptic_val"
    itself = _assert_same_as_reference(gt_json, gt_dir, gt_json, gt_dir)
    assert itself["All"]["pq"] == 1.0 and itself["Things"]["n"] == 2  # person and car
    summary = _assert_same_as_reference(*_write_perturbed(gt_json, gt_dir, tmp_path, 5), gt_json, gt_dir)
    assert 0.0 < summary["All"]["pq"] < 1.0 and summary["All"]["fp"] > 0 and summary["All"]["fn"] > 0


# -- NYU Depth V2: a BTS file-list line and the frame it names --------------------------------------------------------
def test_nyu_bts_reader_on_a_real_frame() -> None:
    reader = make_reader("nyu_bts", root=str(NYU / "sync"), filelist=str(NYU / "nyudepthv2_train_files_with_gt.txt"))
    (ref,) = reader.refs()
    assert ref.meta["focal"] == 518.8579 and ref.problem is None
    (sample,) = list(iterate(reader))
    assert isinstance(sample, Sample), str(sample)
    photo = NYU / "sync" / "bookstore_0001d" / "rgb_00001.jpg"
    assert sample.image_bytes == photo.read_bytes() and sample.image_ext == "jpg"
    assert (sample.height, sample.width) == (120, 160) == Image.open(photo).size[::-1]
    depth_mm = np.asarray(Image.open(NYU / "sync" / "bookstore_0001d" / "sync_depth_00001.png"))
    assert depth_mm.dtype == np.uint16 and (depth_mm == 0).mean() > 0.2  # holes, kept as "no measurement"
    assert sample.depth_m is not None and sample.depth_m.dtype == np.float32
    np.testing.assert_array_equal(sample.depth_m == 0, depth_mm == 0)
    np.testing.assert_allclose(sample.depth_m, depth_mm / 1000.0, rtol=1e-6)
    assert sample.pan_ids is None and sample.segments == []


def test_build_shards_on_the_real_cityscapes_and_nyu_frames(ray_address: str, tmp_path: Path) -> None:
    runs = [("nyu", DataConfig(kind="nyu_bts", root=NYU / "sync", split="train",
                               options={"filelist": str(NYU / "nyudepthv2_train_files_with_gt.txt")}))]
    if CITYSCAPES.is_dir():
        runs.append(("cityscapes", DataConfig(kind="cityscapes", root=CITYSCAPES, split="val")))
    for name, data in runs:
        out = tmp_path / name
        cfg = PrepConfig(out=out, data=data, shards=ShardConfig(samples_per_shard=1, prefix=name),
                         teacher=TeacherConfig(kind="ground_truth" if name == "nyu" else "none"),
                         run=RunConfig(progress=False, manifest_every_s=0.0))
        report = run(cfg, log=lambda m: None)
        assert report.samples_ok == 1 and report.quarantined == 0, name
        manifest = read_manifest(out / MANIFEST_NAME)
        assert manifest is not None
        (got,) = list(wds.WebDataset([str(out / s.shard) for s in manifest.shards], shardshuffle=False))
        meta = json.loads(got["json"])
        if name == "nyu":
            assert got["jpg"] == (NYU / "sync" / "bookstore_0001d" / "rgb_00001.jpg").read_bytes()
            depth_mm = np.asarray(Image.open(NYU / "sync" / "bookstore_0001d" / "sync_depth_00001.png"))
            np.testing.assert_array_equal(stored_plane(got, "depth.zst"), depth_mm)  # mm in, mm out
            assert meta["panoptic"] is False and "sem.zst" not in got
            disp = stored_plane(got, "disp.zst")
            assert disp.shape == depth_mm.shape and (disp[depth_mm == 0] == 0).all() and (disp[depth_mm > 0] > 0).all()
        else:
            ids, segments = _cityscapes_expected()
            assert got["png"] == (CITYSCAPES / "leftImg8bit" / "val" / "frankfurt" / f"{CS_STEM}_leftImg8bit.png").read_bytes()
            label_to_train = {label: train for label, train, _, _ in CITYSCAPES_CLASSES}
            expected_sem = np.full(ids.shape, 255, np.int64)
            for v, seg in segments.items():
                expected_sem[ids == v] = label_to_train[seg["category_id"]]
            np.testing.assert_array_equal(stored_plane(got, "sem.zst"), expected_sem)
            ins = stored_plane(got, "ins.zst")
            for row in meta["segments"]:
                mask = ids == row["id"]
                assert (ins[mask] == row["ins"]).all() and (row["ins"] > 0) == (segments[row["id"]]["category_id"] >= 24)
            assert (ins[ids == 0] == 0).all()
