"""Kill + --resume reproduces the uninterrupted run exactly; a corrupt checkpoint falls back to the previous one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data import write_synthetic_shards
from test_trainer import TINY, tiny_overrides

from genpan.train.checkpoint import SHARED_NAME, list_checkpoints, load_latest
from genpan.train.config import load_train_config
from genpan.train.trainer import FINAL_NAME, METRICS_NAME, Trainer, read_metrics

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
STEPS = 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("resume"), num_images=8, per_shard=3, min_size=48, max_size=80)


def resume_overrides(shards: Path, out: Path) -> list[str]:
    """Augmentation on (random scale, crop, flip), shuffled resampled shards: all the state resume must restore."""
    return tiny_overrides(shards, out, micro_batch=2, steps=STEPS) + [
        "--data.scale_min=0.7", "--data.scale_max=1.4", "--data.flip_prob=0.5", "--data.resampled=true",
        "--data.shuffle_buffer=4", "--data.shuffle_initial=2", "--run.ckpt_every=3", "--schedule.warmup_steps=5",
        "--optim.min_lr=1e-5",
    ]


def losses_of(path: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k.startswith("loss_") or k in ("step", "lr", "epoch")} for r in read_metrics(path)]


def test_sigkill_then_resume_reproduces_the_straight_run(shards, tmp_path):
    straight = tmp_path / "straight"
    Trainer(load_train_config(TINY, resume_overrides(shards, straight))).fit()

    killed = tmp_path / "killed"
    cmd = [sys.executable, "train/main.py", "--config", TINY] + resume_overrides(shards, killed)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list_checkpoints(killed / "checkpoints") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / FINAL_NAME).exists()
    done_before = len(read_metrics(killed / METRICS_NAME))
    assert done_before < STEPS

    result = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout
    assert losses_of(killed / METRICS_NAME) == losses_of(straight / METRICS_NAME)
    a = torch.load(straight / FINAL_NAME, weights_only=True)["model"]
    b = torch.load(killed / FINAL_NAME, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_and_resume_in_process_matches(shards, tmp_path):
    straight = tmp_path / "s"
    Trainer(load_train_config(TINY, resume_overrides(shards, straight) + ["--schedule.max_steps=10"])).fit()
    part = tmp_path / "p"
    stop = resume_overrides(shards, part) + ["--schedule.max_steps=10"]
    Trainer(load_train_config(TINY, stop + ["--run.stop_after_step=7"])).fit()  # last checkpoint: step 6
    assert len(read_metrics(part / METRICS_NAME)) == 7
    resumed = Trainer(load_train_config(TINY, stop), resume=True)
    assert resumed.step == 6
    resumed.fit()
    assert losses_of(part / METRICS_NAME) == losses_of(straight / METRICS_NAME)


def test_corrupt_latest_checkpoint_falls_back(shards, tmp_path):
    run = tmp_path / "c"
    overrides = resume_overrides(shards, run) + ["--schedule.max_steps=7", "--run.stop_after_step=7"]
    Trainer(load_train_config(TINY, overrides)).fit()
    steps = [s for s, _ in list_checkpoints(run / "checkpoints")]
    assert steps == [6, 3]
    newest = run / "checkpoints" / "step-00000006" / SHARED_NAME
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated write
    messages: list[str] = []
    loaded = load_latest(run / "checkpoints", 0, messages.append)
    assert loaded is not None and loaded.step == 3
    assert any("step-00000006" in m and "sha256" in m for m in messages)
    trainer = Trainer(load_train_config(TINY, overrides), resume=True, log=messages.append)
    assert trainer.step == 3
