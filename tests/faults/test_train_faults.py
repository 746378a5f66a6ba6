"""SIGKILL train/main.py again and again (at random steps, and while a checkpoint is being written), --resume each
time, and corrupt the newest checkpoint once: the loss curve and final weights equal an uninterrupted CPU run."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data import write_synthetic_shards
from test_resume import losses_of, resume_overrides
from test_trainer import TINY

from genpan.train.checkpoint import SHARED_NAME, list_checkpoints, step_dir_name
from genpan.train.config import load_train_config
from genpan.train.trainer import FINAL_NAME, METRICS_NAME, Trainer, read_metrics

REPO = Path(__file__).resolve().parents[2]
KILLS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("train_faults"), num_images=8, per_shard=3, min_size=48, max_size=80)


def steps_logged(out: Path) -> int:
    try:
        return len(read_metrics(out / METRICS_NAME))
    except (OSError, ValueError):
        return 0


def run_and_kill(cmd: list[str], out: Path, when: str, after_step: int) -> int:
    """Start the trainer and SIGKILL it once `after_step` steps are logged (`when="step"`), or as soon as a
    checkpoint temp folder appears after that (`when="checkpoint"`); returns the steps logged at the kill."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if steps_logged(out) >= after_step and (when == "step" or list((out / "checkpoints").glob(".step-*.tmp"))):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before its kill point: {proc.stderr.read().decode()[-1500:]}"
    return steps_logged(out)


def test_repeated_kills_and_a_corrupt_checkpoint_keep_the_loss_curve(shards: Path, tmp_path: Path) -> None:
    from test_resume import STEPS

    straight = tmp_path / "straight"
    Trainer(load_train_config(TINY, resume_overrides(shards, straight))).fit()

    out = tmp_path / "killed"
    cmd = [sys.executable, "train/main.py", "--config", TINY] + resume_overrides(shards, out)
    rng = random.Random(0)
    kills = []
    for i in range(KILLS):
        start = steps_logged(out)
        when = "checkpoint" if i % 2 else "step"
        target = min(start + rng.randint(2, 5), STEPS - 3)
        run = cmd + (["--resume"] if i else [])
        kills.append((when, run_and_kill(run, out, when, target)))
    # Corrupt the newest complete checkpoint: resume must notice (checksum) and fall back to the one before.
    newest_step, newest = list_checkpoints(out / "checkpoints")[0]
    shared = newest / SHARED_NAME
    shared.write_bytes(shared.read_bytes()[: shared.stat().st_size // 2])
    result = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert f"checkpoint {newest} is unusable" in log and "does not match its sha256" in log
    resumed_from = log.split("resumed from ", 1)[1].split(" ", 1)[0]
    assert Path(resumed_from).name != step_dir_name(newest_step) and Path(resumed_from).name.startswith("step-")
    print(f"kills (kind, steps logged at the kill): {kills}")
    assert losses_of(out / METRICS_NAME) == losses_of(straight / METRICS_NAME), kills
    a = torch.load(straight / FINAL_NAME, weights_only=True)["model"]
    b = torch.load(out / FINAL_NAME, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
