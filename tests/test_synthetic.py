"""The embedded dataset: real COCO panoptic format, deterministic, and as hard as specified
(things down to ~8 px, touching and occluding instances, crowd, void)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from genpan.coco_panoptic import read_panoptic_png
from genpan.prep.readers import iterate, make_reader
from genpan.prep.synthetic import STUFF_CLASSES, THING_CLASSES, generate_split
from genpan.prep.targets import boundary_mask


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    generate_split(root, "train", 40, seed=7, progress=False)
    return root


def test_deterministic(dataset: Path, tmp_path: Path) -> None:
    generate_split(tmp_path, "train", 40, seed=7, progress=False)
    for rel in ["annotations/panoptic_train.json", "train/train_000003.jpg", "annotations/panoptic_train/train_000003.png", "depth_train/train_000003.png"]:
        assert (dataset / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    generate_split(tmp_path / "other", "train", 2, seed=8, progress=False)
    assert (tmp_path / "other/train/train_000000.jpg").read_bytes() != (dataset / "train/train_000000.jpg").read_bytes()


def test_coco_panoptic_format(dataset: Path) -> None:
    data = json.loads((dataset / "annotations/panoptic_train.json").read_text())
    assert {c["id"]: c["isthing"] for c in data["categories"]} == {**{i: 1 for i in THING_CLASSES}, **{i: 0 for i in STUFF_CLASSES}}
    images = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        ids = read_panoptic_png(dataset / "annotations/panoptic_train" / ann["file_name"])
        assert ids.shape == (im["height"], im["width"]) and 128 <= min(ids.shape) and max(ids.shape) <= 256
        jpg = cv2.imread(str(dataset / "train" / im["file_name"]))
        assert jpg.shape[:2] == ids.shape
        seg_ids = {s["id"] for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == seg_ids
        for s in ann["segments_info"]:
            mask = ids == s["id"]
            ys, xs = np.nonzero(mask)
            assert s["area"] == mask.sum()
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert set(s) >= {"id", "category_id", "iscrowd", "area", "bbox"}


def test_difficulty_is_present(dataset: Path) -> None:
    """Sizes down to ~8 px, touching instances, occlusion, crowd, void, ≥3 stuff and ≥4 thing classes."""
    samples = list(iterate(make_reader("synthetic", root=dataset, split="train")))
    thing_areas, stuff_cats, thing_cats = [], set(), set()
    crowd = void = touching = split_by_occlusion = 0
    for s in samples:
        ids = s.pan_ids
        void += int((ids == 0).any())
        things = {seg["id"] for seg in s.segments if seg["category_id"] in THING_CLASSES and not seg["iscrowd"]}
        for seg in s.segments:
            (thing_cats if seg["category_id"] in THING_CLASSES else stuff_cats).add(seg["category_id"])
            crowd += seg["iscrowd"]
            if seg["id"] in things:
                thing_areas.append(seg["area"])
                n_parts, _ = cv2.connectedComponents((ids == seg["id"]).astype(np.uint8), connectivity=8)
                split_by_occlusion += n_parts > 2
        # two different thing instances 4-adjacent somewhere
        a, b = ids[:, 1:], ids[:, :-1]
        pairs = (a != b) & np.isin(a, list(things)) & np.isin(b, list(things))
        touching += int(pairs.any())
        assert boundary_mask(ids).any()
    assert len(stuff_cats) >= 3 and len(thing_cats) >= 4
    assert min(thing_areas) <= 8 * 8 and max(thing_areas) >= 2000
    assert crowd >= 3 and void >= 10 and touching >= 10 and split_by_occlusion >= 1


def test_depth_things_in_front_of_stuff(dataset: Path) -> None:
    """Every thing is nearer than each stuff pixel bordering it (the stuff it stands in front of)."""
    checked = 0
    for s in iterate(make_reader("synthetic", root=dataset, split="train")):
        depth, ids = s.depth_m, s.pan_ids
        assert depth is not None and depth.shape == ids.shape and depth.min() > 0
        stuff = np.isin(ids, [seg["id"] for seg in s.segments if seg["category_id"] in STUFF_CLASSES])
        for seg in s.segments:
            if seg["category_id"] not in THING_CLASSES:
                continue
            mask = (ids == seg["id"]).astype(np.uint8)
            ring = (cv2.dilate(mask, np.ones((3, 3), np.uint8)) > 0) & ~mask.astype(bool) & stuff
            if ring.any():
                assert depth[mask.astype(bool)].max() < depth[ring].min()
                checked += 1
    assert checked > 50


def test_cli(tmp_path: Path) -> None:
    from genpan.prep.synthetic import main

    assert main(["--out", str(tmp_path), "--train", "2", "--val", "1"]) == 0
    assert (tmp_path / "annotations/panoptic_val.json").is_file()
    assert main(["--out", str(tmp_path), "--train", "-1"]) == 2
