"""Safe loading: no loader runs pickled code, and no user-given name or shard member writes outside its folder."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from torch import nn

from genpan.prep.manifest import MANIFEST_NAME, Manifest, ShardRow, write_manifest
from genpan.prep.readers.base import make_key
from genpan.prep.shards import inside

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file proves that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(path: Path, marker: Path, wrap: str | None = "model") -> Path:
    tensor = {"weight": torch.zeros(2, 2)}
    obj = {wrap: tensor, "config": {"model": {}}, "evil": Payload(marker)} if wrap else {"weight": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def test_the_payload_is_live_without_weights_only(tmp_path: Path) -> None:
    """Control: a plain torch.load(weights_only=False) of the same file does run the code."""
    marker = tmp_path / "ran"
    torch.load(malicious_checkpoint(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_dinov2_teacher_weights_loader_refuses_pickled_code(tmp_path: Path) -> None:
    from genpan.train.model.pretrained import load_dinov2_checkpoint

    marker = tmp_path / "ran"
    path = malicious_checkpoint(tmp_path / "dinov2_vits14_pretrain.pth", marker, wrap=None)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_dinov2_checkpoint(nn.Linear(2, 2), path)
    assert not marker.exists()


def _step_folder(root: Path, marker: Path) -> Path:
    """A trainer checkpoint folder whose checksums match, so only weights_only stands between it and the code."""
    from genpan.train.checkpoint import CHECKSUMS_NAME, SHARED_NAME, rank_file, step_dir_name

    folder = root / step_dir_name(10)
    malicious_checkpoint(folder / SHARED_NAME, marker)
    torch.save({"step": 10}, folder / rank_file(0))
    sums = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in (SHARED_NAME, rank_file(0))}
    (folder / CHECKSUMS_NAME).write_text(json.dumps({"step": 10, "world_size": 1, "sha256": sums}))
    return folder


def test_trainer_resume_loader_refuses_pickled_code(tmp_path: Path) -> None:
    from genpan.train.checkpoint import load_latest

    marker = tmp_path / "ran"
    _step_folder(tmp_path / "checkpoints", marker)
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unsupported"):
        load_latest(tmp_path / "checkpoints", 0, log=lambda m: None)
    assert not marker.exists()


def test_trainer_init_from_loader_refuses_pickled_code(tmp_path: Path) -> None:
    from genpan.train.checkpoint import load_model_weights

    marker = tmp_path / "ran"
    folder = _step_folder(tmp_path / "checkpoints", marker)
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unsupported"):
        load_model_weights(folder)
    assert not marker.exists()


def test_inference_loader_refuses_pickled_code(tmp_path: Path) -> None:
    from genpan.eval.predict import load_checkpoint_for_inference

    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="refusing to load a checkpoint"):
        load_checkpoint_for_inference(malicious_checkpoint(tmp_path / "final.pt", marker))
    assert not marker.exists()


# -- user-given names and paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["../escape", "/tmp/abs", ".hidden", "a/b"])
def test_a_shard_prefix_that_leaves_the_output_is_a_clear_error(tmp_path: Path, prefix: str) -> None:
    cmd = [sys.executable, "tests/faults/run_prep.py", "--", "--config", "prep/configs/synthetic.toml", f"--out={tmp_path / 'out'}",
           f"--data.root={tmp_path / 'data'}", "--synthetic.generate=false", f"--shards.prefix={prefix}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: shards.prefix must be a plain file name part"), result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.rglob("*.tar"))


@pytest.mark.parametrize("name", ["/etc/passwd", "../victim.tar", "sub/../../victim.tar", "link.tar"])
def test_manifest_shard_paths_cannot_leave_the_output(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.tar"
    victim.write_bytes(b"keep me")
    (out / "link.tar").symlink_to(victim)  # a symlink inside that points outside is outside too
    with pytest.raises(ValueError, match="output directory"):
        inside(out, name)


def test_a_run_over_a_hostile_manifest_touches_nothing_outside(tmp_path: Path) -> None:
    from genpan.prep.synthetic import SceneConfig, generate_split

    data, out = tmp_path / "data", tmp_path / "out"
    generate_split(data, "train", 2, seed=0, cfg=SceneConfig(min_size=32, max_size=40), progress=False)
    out.mkdir()
    victim = tmp_path / "victim.tar"
    victim.write_bytes(b"keep me")
    write_manifest(out / MANIFEST_NAME, Manifest(shards=[ShardRow(str(victim), 1, 0, 7, "x", "1", "d")]))
    cmd = [sys.executable, "tests/faults/run_prep.py", "--", "--config", "prep/configs/synthetic.toml", f"--out={out}",
           f"--data.root={data}", "--synthetic.generate=false", "--run.progress=false"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "must be relative to the output directory" in result.stderr, result.stderr
    assert victim.read_bytes() == b"keep me"


@pytest.mark.parametrize("file_name", ["../../etc/evil.jpg", "/abs/evil.jpg", "a/b/c.jpg", "..", "x.y.z.jpg", "caf\udce9.jpg"])
def test_sample_keys_from_hostile_file_names_are_plain(file_name: str) -> None:
    """Shard member names are `{key}.{field}`: a key with no '/' or '.' cannot name a path."""
    key = make_key(Path(file_name).stem if file_name != ".." else file_name)
    assert key and all(c.isalnum() and c.isascii() or c in "_-" for c in key), key


# -- tar members on the reading side ---------------------------------------------------------------------------
def hostile_shard(path: Path, member: str) -> Path:
    import cv2
    import numpy as np

    jpg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in ((member, jpg), ("ok.jpg", jpg), ("ok.json", b'{"categories": []}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("member", ["/tmp/genpan-evil/evil.jpg", "sub/../../evil.jpg"])
def test_predict_rejects_tar_members_that_leave_the_folder(tmp_path: Path, member: str) -> None:
    from genpan.eval.predict import shard_source

    shards = tmp_path / "shards"
    shards.mkdir()
    hostile_shard(shards / "s-0.tar", member)
    with pytest.raises(ValueError, match="member"):
        shard_source(str(shards))


def test_train_loader_rejects_a_hostile_member_key() -> None:
    from genpan.train.data import decode_sample

    for key in ("/tmp/genpan-evil/evil", "sub/../../evil", ""):
        with pytest.raises(ValueError, match="not a plain sample key"):
            decode_sample({"__key__": key, "__url__": "s-0.tar", "jpg": b"", "json": b"{}"})


def test_trainer_cli_refuses_pickled_code_with_one_line(tmp_path: Path, capsys) -> None:
    """`train/main.py --init-from evil.pt` ends with exit 2 and an `error:` line, not a traceback."""
    from test_data import write_synthetic_shards

    from genpan.train.main import main

    marker = tmp_path / "ran"
    evil = malicious_checkpoint(tmp_path / "evil" / "final.pt", marker)
    shards = write_synthetic_shards(tmp_path / "shards", num_images=2, per_shard=2, min_size=56, max_size=56)
    rc = main(["--config", "train/configs/tiny_cpu.toml", f"--data.shards={shards}", f"--run.out={tmp_path / 'run'}",
               "--init-from", str(evil), "--run.threads=1", "--data.num_workers=0"])
    assert rc == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert err.startswith("error: --init-from: refusing to load a checkpoint") and err.count("\n") == 1, err
