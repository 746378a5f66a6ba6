"""Readers on files written by the tests in each real format, including every bad-input case."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from genpan.coco_panoptic import encode_panoptic_png, read_panoptic_png, write_panoptic_png
from genpan.prep.readers import Sample, SampleError, iterate, make_reader
from genpan.prep.readers.cityscapes import CITYSCAPES_CLASSES
from genpan.prep.readers.image_header import image_info
from genpan.prep.synthetic import generate_split


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    generate_split(root, "val", 6, seed=3, progress=False)
    return root


@pytest.fixture()
def coco(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(pristine, root)
    return root


def _json(root: Path) -> dict:
    return json.loads((root / "annotations/panoptic_val.json").read_text())


def _save_json(root: Path, data: dict) -> None:
    (root / "annotations/panoptic_val.json").write_text(json.dumps(data))


def _load_all(root: Path) -> dict[str, Sample | SampleError]:
    return {r.key: r for r in iterate(make_reader("synthetic", root=root, split="val"))}


def test_coco_reader_reads_every_sample_untouched(coco: Path) -> None:
    out = _load_all(coco)
    assert len(out) == 6 and all(isinstance(s, Sample) for s in out.values())
    s = out["val_000002"]
    assert s.image_bytes == (coco / "val/val_000002.jpg").read_bytes() and s.image_ext == "jpg"
    np.testing.assert_array_equal(s.pan_ids, read_panoptic_png(coco / "annotations/panoptic_val/val_000002.png"))
    depth = cv2.imread(str(coco / "depth_val/val_000002.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_allclose(s.depth_m, depth / 1000.0, rtol=1e-6)
    assert len({x.source_hash for x in out.values()}) == 6


# Each case mutates one sample (val_000001) and names the substring the error must contain.
def _missing_png(root: Path) -> None:
    (root / "annotations/panoptic_val/val_000001.png").unlink()


def _png_id_not_in_json(root: Path) -> None:
    data = _json(root)
    data["annotations"][1]["segments_info"].pop(0)
    _save_json(root, data)


def _json_segment_not_in_png(root: Path) -> None:
    data = _json(root)
    data["annotations"][1]["segments_info"].append({"id": 4242, "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1]})
    _save_json(root, data)


def _unknown_category(root: Path) -> None:
    data = _json(root)
    data["annotations"][1]["segments_info"][0]["category_id"] = 999
    _save_json(root, data)


def _truncated_jpeg(root: Path) -> None:
    p = root / "val/val_000001.jpg"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _garbage_image(root: Path) -> None:
    (root / "val/val_000001.jpg").write_bytes(b"this is not an image")


def _missing_image(root: Path) -> None:
    (root / "val/val_000001.jpg").unlink()


def _png_wrong_size(root: Path) -> None:
    p = root / "annotations/panoptic_val/val_000001.png"
    write_panoptic_png(p, read_panoptic_png(p)[:-8, :])


def _json_size_mismatch(root: Path) -> None:
    data = _json(root)
    data["images"][1]["height"] += 1
    _save_json(root, data)


def _label_16bit(root: Path) -> None:
    p = root / "annotations/panoptic_val/val_000001.png"
    ids = read_panoptic_png(p)
    cv2.imwrite(str(p), (ids % 65536).astype(np.uint16))


def _duplicate_segment_id(root: Path) -> None:
    data = _json(root)
    segs = data["annotations"][1]["segments_info"]
    segs.append(dict(segs[0]))
    _save_json(root, data)


def _depth_wrong_format(root: Path) -> None:
    cv2.imwrite(str(root / "depth_val/val_000001.png"), np.zeros((10, 10), np.uint8))


BAD_CASES = {
    "missing PNG": (_missing_png, "panoptic PNG file missing"),
    "PNG id not in JSON": (_png_id_not_in_json, "not in the JSON"),
    "JSON segment not in PNG": (_json_segment_not_in_png, "not in the PNG"),
    "unknown category": (_unknown_category, "unknown category id 999"),
    "truncated JPEG": (_truncated_jpeg, "truncated JPEG"),
    "garbage image": (_garbage_image, "not a JPEG or PNG"),
    "missing image": (_missing_image, "image file missing"),
    "PNG of the wrong size": (_png_wrong_size, "but the image is"),
    "JSON size mismatch": (_json_size_mismatch, "but the JSON says"),
    "16-bit PNG label": (_label_16bit, "8-bit RGB"),
    "duplicate segment id": (_duplicate_segment_id, "duplicate segment ids"),
    "depth PNG not 16-bit": (_depth_wrong_format, "16-bit"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_error_record_and_the_rest_loads(coco: Path, case: str) -> None:
    mutate, message = BAD_CASES[case]
    mutate(coco)
    out = _load_all(coco)
    bad = out["val_000001"]
    assert isinstance(bad, SampleError), case
    assert message in bad.reason, (case, bad.reason)
    assert "val_000001" in bad.source_path
    assert all(isinstance(s, Sample) for k, s in out.items() if k != "val_000001")


def test_duplicate_image_id_and_orphan_annotation(coco: Path) -> None:
    data = _json(coco)
    data["images"][2]["id"] = data["images"][1]["id"]
    data["annotations"][2]["image_id"] = 12345
    _save_json(coco, data)
    out = list(iterate(make_reader("synthetic", root=coco, split="val")))
    errors = [e for e in out if isinstance(e, SampleError)]
    reasons = " | ".join(e.reason for e in errors)
    assert "duplicate image id" in reasons and "has no entry in 'images'" in reasons
    assert sum(isinstance(s, Sample) for s in out) == 4


def test_empty_segments_all_void_is_valid(coco: Path) -> None:
    data = _json(coco)
    data["annotations"][1]["segments_info"] = []
    _save_json(coco, data)
    p = coco / "annotations/panoptic_val/val_000001.png"
    write_panoptic_png(p, np.zeros_like(read_panoptic_png(p)))
    s = _load_all(coco)["val_000001"]
    assert isinstance(s, Sample) and s.segments == [] and not s.pan_ids.any()


def test_missing_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="panoptic JSON not found"):
        make_reader("coco", json_path=tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        make_reader("coco", json_path=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown reader kind"):
        make_reader("kitti")
    with pytest.raises(ValueError, match="needs option 'root'"):
        make_reader("folder")


def _write_cityscapes(root: Path, split: str, use_train_id: bool, image_suffix: str = "_gtFine_leftImg8bit.png") -> None:
    """A two-image Cityscapes tree in the form createPanopticImgs writes: images[].file_name is
    `{stem}_gtFine_leftImg8bit.png` (not the photo's name), and `--use-train-id` output is named
    `cityscapes_panoptic_{split}_trainId`."""
    out_name = f"cityscapes_panoptic_{split}" + ("_trainId" if use_train_id else "")
    rng = np.random.default_rng(0)
    cats = [{"id": (train if use_train_id else label), "name": name, "isthing": int(thing), "supercategory": "x", "color": [0, 0, 0]}
            for label, train, name, thing in CITYSCAPES_CLASSES]
    images, anns = [], []
    for i, city in enumerate(["aachen", "bremen"]):
        stem = f"{city}_000000_00001{i}"
        img = rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"), img)
        ids = np.zeros((16, 32), np.int32)
        road, car = (0, 13) if use_train_id else (7, 26)
        ids[8:, :] = road
        ids[2:6, 4:12] = car * 1000 + 1
        ids[2:6, 14:20] = car * 1000 + 2
        png_dir = root / "gtFine" / out_name
        png_dir.mkdir(parents=True, exist_ok=True)
        (png_dir / f"{stem}_gtFine_panoptic.png").write_bytes(encode_panoptic_png(ids))
        images.append({"id": stem, "file_name": f"{stem}{image_suffix}", "width": 32, "height": 16})
        segs = [{"id": int(s), "category_id": int(s) if s < 1000 else int(s) // 1000, "iscrowd": 0, "area": int((ids == s).sum()), "bbox": [0, 0, 1, 1]}
                for s in np.unique(ids) if s]
        anns.append({"image_id": stem, "file_name": f"{stem}_gtFine_panoptic.png", "segments_info": segs})
    (root / "gtFine" / f"{out_name}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


@pytest.mark.parametrize("use_train_id,split", [(False, "val"), (True, "val"), (True, "val_trainId")])
@pytest.mark.parametrize("image_suffix", ["_gtFine_leftImg8bit.png", "_leftImg8bit.png"])
def test_cityscapes_reader(tmp_path: Path, use_train_id: bool, split: str, image_suffix: str) -> None:
    _write_cityscapes(tmp_path, "val", use_train_id, image_suffix)
    reader = make_reader("cityscapes", root=tmp_path, split=split)
    cats = {c.id: c for c in reader.categories}
    assert len(cats) == 19 and sum(c.isthing for c in cats.values()) == 8
    assert sorted(c.train_id for c in cats.values()) == list(range(19))
    car = cats[13 if use_train_id else 26]
    assert car.name == "car" and car.train_id == 13 and car.isthing
    out = list(iterate(reader))
    assert [s.key for s in out] == ["aachen_000000_000010", "bremen_000000_000011"]
    assert all(isinstance(s, Sample) and s.image_ext == "png" and s.pan_ids.shape == (16, 32) for s in out), [str(s) for s in out]
    for s in out:  # the photo, found from the stem whatever file_name says
        photo = tmp_path / "leftImg8bit" / "val" / s.key.split("_")[0] / f"{s.key}_leftImg8bit.png"
        assert s.source_path == str(photo) and s.image_bytes == photo.read_bytes()


def test_nyu_bts_reader(tmp_path: Path) -> None:
    scene = tmp_path / "kitchen_0028b"
    scene.mkdir()
    depth_mm = np.full((12, 16), 2500, np.uint16)
    depth_mm[0, 0] = 0  # no measurement
    for i in range(2):
        cv2.imwrite(str(scene / f"rgb_0000{i}.jpg"), np.full((12, 16, 3), 100, np.uint8))
        cv2.imwrite(str(scene / f"sync_depth_0000{i}.png"), depth_mm)
    listing = tmp_path / "train_files.txt"
    listing.write_text(
        "/kitchen_0028b/rgb_00000.jpg /kitchen_0028b/sync_depth_00000.png 518.8579\n"
        "/kitchen_0028b/rgb_00001.jpg None 518.8579\n"
        "/kitchen_0028b/rgb_00009.jpg /kitchen_0028b/sync_depth_00009.png 518.8579\n"
    )
    out = list(iterate(make_reader("nyu_bts", root=tmp_path, filelist=listing)))
    ok, no_depth, missing = out
    assert isinstance(ok, Sample) and ok.key == "kitchen_0028b_rgb_00000" and ok.pan_ids is None
    assert ok.depth_m[0, 0] == 0 and ok.depth_m[1, 1] == pytest.approx(2.5)
    assert isinstance(no_depth, SampleError) and "no depth file" in no_depth.reason
    assert isinstance(missing, SampleError) and "image file missing" in missing.reason


def test_nyu_mat_reader_orientation_split_and_bad_depth(tmp_path: Path) -> None:
    n, h, w = 3, 6, 8
    rgb = np.zeros((n, h, w, 3), np.uint8)
    rgb[:, 0, :, 0] = 255  # top row red
    rgb[:, :, 0, 2] = 200  # left column blue
    depth = np.full((n, h, w), 3.0, np.float32)
    depth[1, 2, 3] = np.nan
    depth[1, 4, 5] = -1.0
    depth[1, 5, 7] = np.inf
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    with h5py.File(mat, "w") as f:  # MATLAB v7.3 stores arrays column-major: h5py sees them transposed
        f["images"] = rgb.transpose(0, 3, 2, 1)
        f["depths"] = depth.transpose(0, 2, 1)
    splits = tmp_path / "splits.mat"
    savemat(splits, {"testNdxs": np.array([[2], [3]]), "trainNdxs": np.array([[1]])})
    out = list(iterate(make_reader("nyu_mat", mat_path=mat, splits_path=splits, split="test")))
    assert [s.key for s in out] == ["nyu_0002", "nyu_0003"]
    s = out[0]
    img = cv2.imdecode(np.frombuffer(s.image_bytes, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(img, rgb[1])
    assert s.depth_m.shape == (h, w) and s.depth_m[2, 3] == 0 and s.depth_m[4, 5] == 0 and s.depth_m[5, 7] == 0
    assert s.depth_m[0, 0] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="outside"):
        savemat(splits, {"testNdxs": np.array([[9]])})
        make_reader("nyu_mat", mat_path=mat, splits_path=splits)
    (tmp_path / "plain.mat").write_bytes(b"MATLAB 5.0 not hdf5")
    with pytest.raises(ValueError, match="not an HDF5"):
        make_reader("nyu_mat", mat_path=tmp_path / "plain.mat")


def test_folder_reader(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "a" / "b" / "x.y.jpg"), np.zeros((4, 6, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "top.png"), np.zeros((5, 7, 3), np.uint8))
    odd = tmp_path / "caf\udce9.jpg".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
    try:
        shutil.copy(tmp_path / "a" / "b" / "x.y.jpg", odd)
    except (UnicodeEncodeError, OSError):  # a filesystem that refuses non-UTF-8 names
        odd = None
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "notes.txt").write_text("ignored")
    out = {s.key: s for s in iterate(make_reader("folder", root=tmp_path))}
    assert isinstance(out["a_b_x_y"], Sample) and (out["a_b_x_y"].height, out["a_b_x_y"].width) == (4, 6)
    assert out["top"].image_ext == "png"
    assert isinstance(out["broken"], SampleError) and "truncated JPEG" in out["broken"].reason
    if odd is not None:
        assert isinstance(out["caf_"], Sample)
    assert all("." not in k for k in out)


def test_image_header_grayscale_cmyk_png() -> None:
    for mode, size in (("L", (9, 5)), ("CMYK", (7, 3)), ("RGB", (4, 4))):
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format="JPEG")
        assert image_info(buf.getvalue()) == (size[1], size[0], "jpg")
        assert image_info(buf.getvalue() + b"\x00\x00") == (size[1], size[0], "jpg")  # trailing padding
    buf = io.BytesIO()
    Image.new("RGB", (11, 3)).save(buf, format="PNG")
    assert image_info(buf.getvalue()) == (3, 11, "png")
    with pytest.raises(ValueError, match="truncated PNG"):
        image_info(buf.getvalue()[:-20])
    with pytest.raises(ValueError, match="empty"):
        image_info(b"")
