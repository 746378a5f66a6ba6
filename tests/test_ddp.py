"""Two CPU processes under torchrun (gloo): DDP with gradient accumulation keeps both ranks' weights identical."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import write_synthetic_shards
from test_trainer import TINY, tiny_overrides

from genpan.train.config import load_train_config
from genpan.train.data import BatchStream
from genpan.train.trainer import FINAL_NAME, METRICS_NAME, read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("ddp"), num_images=8, per_shard=2, min_size=48, max_size=72)


def torchrun(args: list[str], timeout: int = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train/main.py"] + args
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_two_gloo_ranks_train_three_steps_to_identical_weights(shards, tmp_path):
    out = tmp_path / "run"
    # micro-batch 1 × 2 ranks × 2 accumulation steps = 4: the first micro-step runs under no_sync
    overrides = tiny_overrides(shards, out, micro_batch=1, steps=3) + [
        "--optim.batch_size=4", "--run.save_rank_weights=true", "--data.scale_min=0.7", "--data.scale_max=1.3",
        "--data.flip_prob=0.5", "--data.resampled=true", "--data.shuffle_buffer=4",
    ]
    result = torchrun(["--config", TINY] + overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(out / "weights-rank0.pt", weights_only=True)
    rank1 = torch.load(out / "weights-rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    final = torch.load(out / FINAL_NAME, weights_only=True)["model"]
    assert all(torch.equal(final[k], rank0[k]) for k in final)
    assert [r["step"] for r in read_metrics(out / METRICS_NAME)] == [1, 2, 3]
    assert (out / "checkpoints" / "step-00000003" / "rank-1.pt").is_file()
    # the ranks read different images, so equal weights come from the gradient all-reduce
    cfg = load_train_config(TINY, overrides)
    streams = [BatchStream(cfg.data, rank=r, world_size=2, seed=cfg.run.seed) for r in (0, 1)]
    assert [next(streams[0])["key"] for _ in range(6)] != [next(streams[1])["key"] for _ in range(6)]


def test_fsdp2_matches_ddp_and_resumes(shards, tmp_path):
    """FSDP2 (`fully_shard` per block) on gloo: same weights as DDP up to reduction order; resume is exact."""
    base = tiny_overrides(shards, tmp_path, micro_batch=1, steps=3) + ["--optim.batch_size=2", "--run.ckpt_every=2"]
    runs = {}
    for name, extra in (("ddp", []), ("fsdp", ["--run.fsdp=true"])):
        out = tmp_path / name
        result = torchrun(["--config", TINY] + base + extra + [f"--run.out={out}"])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = torch.load(out / FINAL_NAME, weights_only=True)["model"]
    assert runs["ddp"].keys() == runs["fsdp"].keys()
    # Biases of the transposed convs feed a GroupNorm with one channel per group (width 32): their true
    # gradient is 0, so Adam turns rounding noise, which depends on the reduction order, into full steps.
    no_gradient = {f"decoder.up.{i}.0.bias" for i in range(3)}
    for key in runs["ddp"].keys() - no_gradient:
        torch.testing.assert_close(runs["fsdp"][key], runs["ddp"][key], rtol=1e-4, atol=1e-5)
    # resume the FSDP run from its step-2 checkpoint: the step-3 weights come out identical
    out = tmp_path / "fsdp"
    (out / FINAL_NAME).unlink()
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    result = torchrun(["--config", TINY] + base + ["--run.fsdp=true", f"--run.out={out}", "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(out / FINAL_NAME, weights_only=True)["model"]
    assert all(torch.equal(resumed[k], runs["fsdp"][k]) for k in resumed)
