"""eval/predict.py over a folder nobody curated: good images of every kind are predicted, each bad file is
named and skipped (listed in skipped.json, exit 3), --strict stops at the first; a killed run, started
again, ends with the JSON an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_predict import CATEGORIES, tiny_checkpoint

from genpan.eval.predict import EXIT_SKIPPED, main

REPO = Path(__file__).resolve().parents[1]


def _messy_folder(root: Path) -> tuple[Path, set[str]]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    cv2.imwrite(str(root / "photo.jpg"), rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "gray.png"), rng.integers(0, 255, (40, 30), dtype=np.uint8))
    cv2.imwrite(str(root / "rgba.png"), rng.integers(0, 255, (30, 50, 4), dtype=np.uint8))
    cv2.imwrite(str(root / "deep.png"), rng.integers(0, 65535, (20, 20, 3), dtype=np.uint16))
    cv2.imwrite(str(root / "tiny.png"), np.zeros((1, 1, 3), np.uint8))
    with open(os.path.join(os.fsencode(root), b"caf\xe9-latin1.jpg"), "wb") as f:  # a name that is not UTF-8
        f.write(cv2.imencode(".jpg", rng.integers(0, 255, (33, 44, 3), dtype=np.uint8))[1].tobytes())
    (root / "notanimage.jpg").write_text("this is a text file")
    whole = cv2.imencode(".jpg", rng.integers(0, 255, (80, 80, 3), dtype=np.uint8))[1].tobytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "empty.png").write_bytes(b"")
    (root / "x.jpg").mkdir()  # a directory with an image's name is not an input
    return root, {"notanimage.jpg", "truncated.jpg", "empty.png"}


def test_bad_files_are_skipped_named_and_listed(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "final.pt", CATEGORIES)
    images, bad = _messy_folder(tmp_path / "photos")
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out), "--size", "28", "--no-progress"])
    assert rc == EXIT_SKIPPED == 3
    err = capsys.readouterr().err
    skipped = json.loads((out / "skipped.json").read_text())
    assert {Path(e["path"]).name for e in skipped} == bad
    for name in bad:
        assert f"skipped: {images / name}" in err
    reasons = {Path(e["path"]).name: e["reason"] for e in skipped}
    assert "truncated JPEG" in reasons["truncated.jpg"] and "empty file" in reasons["empty.png"]
    assert "not a JPEG or PNG" in reasons["notanimage.jpg"]
    data = json.loads((out / "panoptic_pred.json").read_text())
    assert len(data["annotations"]) == 6  # every good image, the 16-bit, 1×1 and non-UTF-8 ones included
    for ann in data["annotations"]:
        assert (out / "panoptic_pred" / ann["file_name"]).is_file()
    assert rc == 3 and main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out), "--size", "28",
                             "--no-progress", "--strict"]) == 2
    assert "--strict stops at the first bad input" in capsys.readouterr().err


def test_rerun_resumes_and_force_redoes(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "final.pt", CATEGORIES)
    images, _ = _messy_folder(tmp_path / "photos")
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out), "--size", "28", "--no-progress"]
    main(args)
    first = (out / "panoptic_pred.json").read_text()
    capsys.readouterr()
    main(args)
    assert "0 predicted, 6 from an earlier run" in capsys.readouterr().out
    assert (out / "panoptic_pred.json").read_text() == first
    main([*args, "--force"])
    assert "6 predicted)" in capsys.readouterr().out and (out / "panoptic_pred.json").read_text() == first
    assert main([*args, "--size", "42"]) == 2  # other settings over the same outputs: refused, one line
    assert "pass --force" in capsys.readouterr().err


def test_killed_run_completes_to_the_uninterrupted_json(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "final.pt", CATEGORIES)
    images = tmp_path / "many"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(60):
        cv2.imwrite(str(images / f"im{i:03d}.jpg"), rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))
    cmd = [sys.executable, "eval/predict.py", "--checkpoint", str(ckpt), "--images", str(images), "--size", "56",
           "--batch-size", "1", "--no-progress", "--threads", "1"]
    whole = tmp_path / "whole"
    subprocess.run([*cmd, "--out", str(whole)], cwd=REPO, check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / ".state_pred"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(state.glob("*.png.json"))) < 5:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(state.glob("*.png.json")))
    if done >= 60:
        pytest.skip("the run finished before it could be killed")
    assert not (killed / "panoptic_pred.json").exists()  # no JSON that disagrees with the PNGs
    resumed = subprocess.run([*cmd, "--out", str(killed)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "from an earlier run" in resumed.stdout
    assert (killed / "panoptic_pred.json").read_text() == (whole / "panoptic_pred.json").read_text()


def test_overlays_and_visualize_draw_every_image(tmp_path):
    """predict --overlays and eval/visualize.py write one picture per predicted image: prediction over the
    photo (and the ground truth beside it when given), a legend under it."""
    from genpan.eval.visualize import main as visualize_main
    from genpan.prep.synthetic import categories, generate_split

    root = tmp_path / "data"
    generate_split(root, "val", 3, seed=2, progress=False)
    cats = [{**c, "train_id": i} for i, c in enumerate(sorted(categories(), key=lambda c: c["id"]))]
    ckpt = tiny_checkpoint(tmp_path / "final.pt", cats)
    out = tmp_path / "pred"
    assert main(["--checkpoint", str(ckpt), "--coco-root", str(root), "--split", "val", "--out", str(out),
                 "--size", "56", "--overlays", "--no-progress"]) == 0
    data = json.loads((out / "panoptic_val.json").read_text())
    for ann, img in zip(data["annotations"], data["images"], strict=True):
        picture = cv2.imread(str(out / "overlay_val" / ann["file_name"]))
        assert picture is not None and picture.shape[1] == img["width"] and picture.shape[0] > img["height"]  # + title, legend
    pictures = tmp_path / "pictures"
    gt = root / "annotations" / "panoptic_val.json"
    assert visualize_main(["--pred-json", str(out / "panoptic_val.json"), "--image-dir", str(root / "val"),
                           "--gt-json", str(gt), "--out", str(pictures), "--no-progress"]) == 0
    for ann, img in zip(data["annotations"], data["images"], strict=True):
        side_by_side = cv2.imread(str(pictures / ann["file_name"]))
        assert side_by_side.shape[1] == 2 * img["width"] + 4  # prediction | ground truth
    assert visualize_main(["--pred-json", str(tmp_path / "none.json"), "--image-dir", str(root), "--out", str(pictures)]) == 2
