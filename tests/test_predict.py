"""Inference: sizes, sliding-window stitching of instance codes, id-map resizing, checkpoint
loading, and the CLI end to end on a folder and with clear errors."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest
import torch

from genpan.config import to_dict
from genpan.eval.postprocess import ideal_outputs, postprocess
from genpan.eval.predict import (
    Backend,
    fit_size,
    load_checkpoint_for_inference,
    main,
    normalise_categories,
    predict_sliding,
    reencode_in_image,
    window_starts,
)
from genpan.labels import pe_target
from genpan.train.model import build_model, tiny_cpu_config

CATEGORIES = [{"id": 1, "name": "disc", "isthing": 1, "train_id": 0}, {"id": 101, "name": "sky", "isthing": 0, "train_id": 1}]


def test_fit_size_keeps_aspect_on_multiples_of_14():
    assert fit_size(480, 640, 112) == (112, 154)  # 640·112/480 = 149.3 → 154 (nearest multiple of 14)
    assert fit_size(100, 100, 112) == (112, 112)
    assert fit_size(30, 3000, 14) == (14, 1400)


def test_window_starts_cover_every_pixel():
    for length, window, stride in [(112, 56, 28), (126, 56, 42), (56, 56, 28), (42, 56, 28)]:
        starts = window_starts(length, window, stride)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + window] = True
            assert s % 14 == 0 and s + min(window, length) <= length
        assert covered.all()


def test_reencode_moves_window_codes_to_image_coordinates():
    """A window's ideal code for a centroid becomes the image-frame code of the same centroid (pe_target)."""
    L, sh, sw, oy, ox, out_h, out_w = 4, 16, 24, 8, 40, 64, 96
    cx, cy = 10.5, 6.5  # centroid in window pixel coordinates (edge convention, as u = 2x/w − 1)
    u_win, v_win = np.full((sh, sw), 2 * cx / sw - 1), np.full((sh, sw), 2 * cy / sh - 1)
    codes = pe_target(u_win, v_win, np.ones((sh, sw), bool), L).transpose(2, 0, 1).astype(np.float32)
    moved = reencode_in_image(codes, oy, ox, out_h, out_w, grid=240)  # window cells of 0.1 px
    u_img, v_img = 2 * (ox + cx) / out_w - 1, 2 * (oy + cy) / out_h - 1
    expected = pe_target(np.array([u_img]), np.array([v_img]), np.array([True]), L)[0]
    assert np.abs(moved - expected[:, None, None]).max() < 0.05  # ≤ half a grid cell of position error
    assert np.abs(reencode_in_image(np.zeros_like(codes), oy, ox, out_h, out_w, 240)).max() == 0  # void stays void


def discs_scene(h: int = 64, w: int = 96) -> tuple[np.ndarray, list[dict]]:
    """Sky with small discs (radius 3, things) at output resolution."""
    pan = np.full((h, w), 1000, np.int32)
    segments = [{"id": 1000, "category_id": 101, "iscrowd": 0}]
    for k, (y, x) in enumerate([(8, 8), (20, 50), (40, 23), (50, 80), (30, 90), (56, 60), (10, 70)]):
        cv2.circle(pan, (x, y), 3, 2000 + k, -1)
        segments.append({"id": 2000 + k, "category_id": 1, "iscrowd": 0})
    return pan, segments


class WindowOracle(Backend):
    """Ideal outputs of the window it is given: the image's R, G channels hold each pixel's column and row."""

    def __init__(self, pan: np.ndarray, segments: list[dict]) -> None:
        self.pan, self.segments = pan, segments

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        sems, insts = [], []
        h, w = batch.shape[2] * 8 // 14, batch.shape[3] * 8 // 14
        for image in batch:
            x0, y0 = (int(round(v * 255)) * 8 // 14 for v in (image[0, 0, 0], image[1, 0, 0]))
            crop = self.pan[y0 : y0 + h, x0 : x0 + w]
            present = [s for s in self.segments if (crop == s["id"]).any()]
            sem, inst = ideal_outputs(crop, present, {1: 0, 101: 1}, {1}, 2)
            sems.append(sem)
            insts.append(inst)
        return {"sem": np.stack(sems), "inst": np.stack(insts)}


def test_sliding_windows_recover_small_instances():
    """Instances smaller than the overlap come out whole and separate when the windows are stitched."""
    pan, segments = discs_scene()
    H, W = 112, 168  # input pixels; output 64 × 96
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    out = predict_sliding(WindowOracle(pan, segments), image, window=56, overlap=0.5, batch=4, grid=80)
    pred, _ = postprocess(out["sem"], out["inst"], [1, 101], {0})
    for seg in segments[1:]:
        ids = np.unique(pred[pan == seg["id"]])
        assert len(ids) == 1 and ids[0] > 0, seg["id"]  # one predicted segment per disc
        assert np.array_equal(pred == ids[0], pan == seg["id"])  # and exactly its pixels


def test_resize_segments_recomputes_stats_and_drops_vanished():
    from genpan.eval.postprocess import resize_id_map as resize_segments

    pan = np.zeros((20, 20), np.int32)
    pan[2:12, 2:12], pan[15, 15] = 1, 2
    segments = [{"id": 1, "category_id": 5, "area": 100}, {"id": 2, "category_id": 6, "area": 1}]
    big, kept = resize_segments(pan, segments, (40, 40))
    assert [s["id"] for s in kept] == [1, 2]
    assert kept[0]["area"] == int((big == 1).sum()) == 400 and kept[0]["bbox"] == [4, 4, 20, 20]
    small, kept = resize_segments(pan, segments, (5, 5))
    assert all(s["area"] == int((small == s["id"]).sum()) > 0 for s in kept)
    assert set(np.unique(small)) <= {0} | {s["id"] for s in kept}


def test_normalise_categories_accepts_rows_and_coco_dicts():
    rows = normalise_categories([[1, "disc", 1, 0], [101, "sky", 0, 1]], "t")
    assert rows == CATEGORIES
    coco = normalise_categories([{"id": 101, "name": "sky", "isthing": 0}, {"id": 1, "name": "disc", "isthing": 1}], "t")
    assert coco == CATEGORIES  # contiguous train ids in category-id order
    with pytest.raises(ValueError, match="category"):
        normalise_categories(["sky"], "t")


def tiny_checkpoint(path, categories=None, depth_head=False):
    torch.manual_seed(0)
    num_classes = len(categories) if categories else 2
    cfg = tiny_cpu_config(num_classes=num_classes, embed_dim=32, depth=1, num_heads=2, decoder_width=16, depth_head=depth_head)
    payload = {"model": build_model(cfg).state_dict(), "config": json.dumps({"model": to_dict(cfg), "data": {"size": [56, 56]}})}
    if categories is not None:
        payload["categories"] = categories
    torch.save(payload, path)
    return path


def test_load_checkpoint_for_inference(tmp_path):
    model, meta = load_checkpoint_for_inference(tiny_checkpoint(tmp_path / "a.pt", CATEGORIES))
    assert meta.input_size == 56 and meta.train_to_category == [1, 101] and meta.thing_train_ids == {0}
    with pytest.raises(ValueError, match="category table"):
        load_checkpoint_for_inference(tiny_checkpoint(tmp_path / "b.pt"))
    with pytest.raises(ValueError, match="trained categories"):
        load_checkpoint_for_inference(tmp_path / "b.pt", CATEGORIES[:1])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint_for_inference(tmp_path / "junk.pt")


def test_cli_on_image_folder_writes_resized_predictions(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "final.pt", CATEGORIES, depth_head=True)
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "a.jpg"), rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "sub" / "b.png"), rng.integers(0, 255, (90, 40, 3), dtype=np.uint8))
    for mode in ("resize", "slide"):
        out = tmp_path / mode
        assert main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out), "--mode", mode,
                     "--size", "28", "--save-raw", "--no-progress"]) == 0
        data = json.loads((out / "panoptic_pred.json").read_text())
        assert [a["image_id"] for a in data["annotations"]] == ["a", "sub_b"]
        from genpan.coco_panoptic import read_panoptic_png

        for ann, size in zip(data["annotations"], [(50, 70), (90, 40)]):
            ids = read_panoptic_png(out / "panoptic_pred" / ann["file_name"])
            assert ids.shape == size  # back at the original resolution
            assert sorted(int(i) for i in np.unique(ids) if i) == sorted(s["id"] for s in ann["segments_info"])
            depth = cv2.imread(str(out / "depth_pred" / ann["file_name"]), cv2.IMREAD_UNCHANGED)
            assert depth.dtype == np.uint16 and depth.shape == size
            assert (out / "raw_pred" / ann["file_name"].replace(".png", ".npz")).is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "{tmp}/missing.pt", "--images", "{tmp}"], "checkpoint not found"),
        (["--checkpoint", "{tmp}/c.pt", "--coco-root", "{tmp}", "--split", "nosuch"], "split 'nosuch' not found"),
        (["--checkpoint", "{tmp}/c.pt", "--images", "{tmp}", "--coco-root", "{tmp}"], "exactly one input"),
        (["--backend", "onnx", "--images", "{tmp}"], "needs --artefact"),
        (["--backend", "export", "--artefact", "{tmp}/m.pt2", "--images", "{tmp}"], "exported model not found"),
        (["--checkpoint", "{tmp}/c.pt", "--images", "{tmp}/nodir"], "image folder not found"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    tiny_checkpoint(tmp_path / "c.pt", CATEGORIES)
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((20, 20, 3), np.uint8))
    argv = [a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_on_shards_reads_images_and_category_table(tmp_path):
    import io
    import tarfile

    ckpt = tiny_checkpoint(tmp_path / "final.pt")  # no table: it comes from the shards' json
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [[c["id"], c["name"], c["isthing"], c["train_id"]] for c in CATEGORIES]
    with tarfile.open(shards / "shard-000.tar", "w") as tar:
        for key, (h, w) in [("img_a", (40, 60)), ("img_b", (30, 30))]:
            ok, jpg = cv2.imencode(".jpg", np.full((h, w, 3), 128, np.uint8))
            for name, data in [(f"{key}.jpg", jpg.tobytes()), (f"{key}.json", json.dumps({"key": key, "categories": rows}).encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(out), "--size", "28", "--no-progress"]) == 0
    data = json.loads((out / "panoptic_pred.json").read_text())
    assert [a["image_id"] for a in data["annotations"]] == ["img_a", "img_b"]
    assert [(i["height"], i["width"]) for i in data["images"]] == [(40, 60), (30, 30)]
    assert {c["id"] for c in data["categories"]} == {1, 101}


def test_inference_loader_verifies_checksums(tmp_path):
    """predict and export read checkpoints through genpan/train/checkpoint.py's read_checkpoint, which checks the sha256 first."""
    from genpan.train.checkpoint import SHARED_NAME, write_with_checksum

    data = tiny_checkpoint(tmp_path / "plain.pt", CATEGORIES).read_bytes()
    final = tmp_path / "final.pt"
    write_with_checksum(final, data)
    assert (tmp_path / "final.pt.sha256").read_text().split() == [hashlib.sha256(data).hexdigest(), "final.pt"]
    load_checkpoint_for_inference(final)
    final.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    with pytest.raises(ValueError, match="does not match final.pt.sha256"):
        load_checkpoint_for_inference(final)
    step = tmp_path / "step-00000001"
    step.mkdir()
    (step / SHARED_NAME).write_bytes(data)
    with pytest.raises(ValueError, match="checksums.json is missing"):
        load_checkpoint_for_inference(step)
    (step / "checksums.json").write_text(json.dumps({"sha256": {SHARED_NAME: "0" * 64}}))
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_checkpoint_for_inference(step / SHARED_NAME)
    (step / "checksums.json").write_text(json.dumps({"sha256": {SHARED_NAME: hashlib.sha256(data).hexdigest()}}))
    load_checkpoint_for_inference(step)


def test_sweep_scores_exactly_what_predict_writes(tmp_path):
    """One id-map resize and the raw outputs at full precision: the sweep's PQ for a config equals
    eval/pq.py's PQ of the files predict writes with that config."""
    from genpan.eval.pq import pq_compute
    from genpan.eval.sweep import main as sweep_main
    from genpan.prep.synthetic import categories, generate_split

    root = tmp_path / "data"
    generate_split(root, "val", 4, seed=3, progress=False)
    cats = [{**c, "train_id": i} for i, c in enumerate(sorted(categories(), key=lambda c: c["id"]))]
    ckpt = tiny_checkpoint(tmp_path / "final.pt", cats)
    # a random model matches nothing: bias it towards the stuff class that covers most of the GT, so the
    # scores have true and false positives to agree on
    gt_json = root / "annotations" / "panoptic_val.json"
    area: dict[int, int] = {}
    for ann in json.loads(gt_json.read_text())["annotations"]:
        for seg in ann["segments_info"]:
            area[seg["category_id"]] = area.get(seg["category_id"], 0) + seg["area"]
    stuff = max((c for c in cats if not c["isthing"]), key=lambda c: area.get(c["id"], 0))
    payload = torch.load(ckpt, weights_only=True)
    payload["model"]["heads.sem.proj.bias"][stuff["train_id"]] += 20.0
    torch.save(payload, ckpt)
    out = tmp_path / "pred"
    assert main(["--checkpoint", str(ckpt), "--coco-root", str(root), "--split", "val", "--out", str(out),
                 "--size", "56", "--save-raw", "--no-progress"]) == 0
    files_pq = pq_compute(gt_json, None, out / "panoptic_val.json", None, progress=False).summary()["All"]["pq"]
    assert sweep_main(["--outputs", str(out / "raw_val"), "--gt-json", str(gt_json), "--out", str(tmp_path / "sweep")]) == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert files_pq > 0 and rows[0]["pq"] == files_pq
