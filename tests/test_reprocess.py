"""The cron job and the CLIs: messages, exit codes, dry runs, the lock refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from genpan.jobs import reprocess
from genpan.prep import build_shards
from genpan.prep.build_shards import output_lock
from genpan.prep.manifest import MANIFEST_NAME, read_manifest
from genpan.prep.synthetic import SceneConfig, generate_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    generate_split(root, "train", 12, seed=5, cfg=SceneConfig(min_size=48, max_size=96), progress=False)
    return root


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "prep" / "configs" / "synthetic.toml"), f"--data.root={data}", f"--out={out}",
            "--shards.samples_per_shard=4", "--run.progress=false", *extra]


def test_cron_run_says_nothing_changed_and_writes_nothing(ray_address: str, data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert build_shards.main(args(data, out)) == 0
    assert f"to {out}" in capsys.readouterr().out  # says where the output went
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    assert reprocess.main(args(data, out)) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()} == before
    # A removed image: the dry run names the shard and writes nothing; the real run rebuilds it.
    manifest = read_manifest(out / MANIFEST_NAME)
    assert manifest is not None
    victim = manifest.samples[5]
    json_path = data / "annotations" / "panoptic_train.json"
    text = json_path.read_text()
    d = json.loads(text)
    image = next(i for i in d["images"] if i["file_name"].startswith(victim.key))
    d["images"] = [i for i in d["images"] if i is not image]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] != image["id"]]
    json_path.write_text(json.dumps(d))
    assert reprocess.main(args(data, out, "--dry-run")) == 0
    dry = capsys.readouterr().out
    assert "1 removed" in dry and "would rebuild" in dry
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()} == before
    assert reprocess.main(args(data, out)) == 0
    assert "1 removed" in capsys.readouterr().out
    after = read_manifest(out / MANIFEST_NAME)
    assert after is not None and victim.key not in {r.key for r in after.samples} and len(after.samples) == 11


def test_eds_settings_are_not_prep_parameters(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """EDS D / wmin cannot be given to prep at all: they live in the training config."""
    assert build_shards.main(args(data, tmp_path / "o", "--shards.eds_D=10")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "eds_D" in err and "Traceback" not in err


def test_concurrent_cron_run_is_refused_with_exit_code_3(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    with output_lock(out):
        assert reprocess.main(args(data, out)) == 3
    err = capsys.readouterr().err
    assert "another prep run" in err and ".prep.lock" in err


def test_user_mistakes_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_shards.main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    cfg = REPO / "prep" / "configs" / "coco.toml"
    assert build_shards.main(["--config", str(cfg), f"--data.root={tmp_path / 'nowhere'}", f"--out={tmp_path / 'o'}"]) == 2
    assert "nowhere" in capsys.readouterr().err
    bad_prefix = ["--config", str(REPO / "prep" / "configs" / "synthetic.toml"), "--shards.prefix=../x", f"--out={tmp_path / 'o'}"]
    assert build_shards.main(bad_prefix) == 2
    assert "shards.prefix" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        build_shards.main(["--help"])
    assert exc.value.code == 0 and "--shards.dist_clip=127.5" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
