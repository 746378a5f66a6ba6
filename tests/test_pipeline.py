"""The main job end to end on a small setting: every artefact exists, the model learns (a PQ floor), and
the report's numbers are the ones eval/pq.py computes from the prediction files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--schedule.max_steps=3", "--schedule.warmup_steps=1", "--run.threads=1", "--data.num_workers=0",
              "--data.micro_batch=2", "--optim.batch_size=2", "--run.progress=false", "--run.ckpt_every=2"]
# The demo's own recipe (train/configs/tiny_cpu.toml), cut to 150 steps: enough for the stuff classes to
# be learned (measured 2026-12-07: PQ 0.301, stuff 0.586, things 0.016 on these 8 val images; ~3 min)
DEMO_ARGS = ["--schedule.max_steps=150", "--schedule.warmup_steps=10", "--run.progress=false", "--run.ckpt_every=100"]
PQ_FLOOR, STUFF_PQ_FLOOR = 0.15, 0.3  # about half the measured values: a run that stops learning falls far below


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "jobs/demo.py", "--out", str(out), "--train-images", "96", "--val-images", "8",
           *(f"--train-arg={a}" for a in DEMO_ARGS), "--predict-arg=--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_every_artefact_exists(demo_run) -> None:
    out, proc = demo_run
    for rel in ["data/annotations/panoptic_train.json", "data/annotations/panoptic_val.json", "shards/manifest.parquet",
                "train/final.pt", "train/metrics.jsonl", "train/config.resolved.toml", "predictions/panoptic_val.json",
                "report/report.md", "report/report.json", "report/loss_curves.png", "report/overlays.png",
                "report/pq_by_size.png", "report/pq_by_class.png"]:
        assert (out / rel).is_file(), rel
    assert len(list((out / "predictions/panoptic_val").glob("*.png"))) == 8
    assert len(list((out / "shards").glob("*.tar"))) >= 1
    assert "ran 5 of 5 stages" in proc.stdout


def test_the_model_learns(demo_run) -> None:
    """A quality floor: a change that breaks training, the targets or the post-processing fails here."""
    out, _ = demo_run
    summary = json.loads((out / "report/report.json").read_text())["summary"]
    assert summary["All"]["pq"] >= PQ_FLOOR, summary
    assert summary["Stuff"]["pq"] >= STUFF_PQ_FLOOR, summary


def test_report_numbers_are_what_eval_pq_computes(demo_run, tmp_path: Path) -> None:
    out, _ = demo_run
    data = out / "data/annotations"
    proc = subprocess.run(
        [sys.executable, "eval/pq.py", "--gt-json", str(data / "panoptic_val.json"), "--gt-dir", str(data / "panoptic_val"),
         "--pred-json", str(out / "predictions/panoptic_val.json"), "--pred-dir", str(out / "predictions/panoptic_val"),
         "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ours = json.loads((out / "report/report.json").read_text())
    theirs = json.loads((tmp_path / "report.json").read_text())
    assert ours["summary"] == theirs["summary"] and ours["per_class"] == theirs["per_class"]
    assert {"Training", "Qualitative", "Depth"} <= set(ours["extra_sections"])


def test_rerun_skips_finished_stages(demo_run) -> None:
    out, _ = demo_run
    proc = subprocess.run([sys.executable, "jobs/demo.py", "--out", str(out), "--train-images", "96", "--val-images", "8"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert proc.stdout.count("already done") == 5


def test_ablation_driver_on_two_variants(demo_run, tmp_path: Path) -> None:
    """jobs/ablation.py end to end (RGB baseline through the PE post-processing, and PE + EDS), a few steps."""
    out, _ = demo_run
    cmd = [sys.executable, "jobs/ablation.py", "--run", str(out), "--out", str(tmp_path / "abl"), "--steps", "2",
           "--variants", "rgb,pe_eds", "--results-md", "", "--predict-arg=--no-progress",
           *(f"--train-arg={a}" for a in TRAIN_ARGS if "max_steps" not in a)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = (tmp_path / "abl" / "report.md").read_text()
    assert "Direct centroid regression (RGB), no EDS" in report and "PE (L=4) + EDS" in report
    rows = json.loads((tmp_path / "abl" / "report.json").read_text())
    assert [r["variant"] for r in rows] == ["rgb", "pe_eds"] and (tmp_path / "abl" / "pq_by_size.png").is_file()
    import torch

    rgb = torch.load(tmp_path / "abl" / "rgb" / "train" / "final.pt", weights_only=True)
    assert json.loads(rgb["config"])["loss"]["inst_encoding"] == "rgb"
