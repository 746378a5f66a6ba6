"""bench/device_check.sh --dry-run runs every step of the GPU check on the CPU at tiny sizes and writes
the one table; bench/device_table.py records a failed or timed-out step with its reason."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genpan.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from device_table import build_table  # noqa: E402

STEPS = ("kernel_tests", "kernel_selfcheck", "loss_kernels", "train_step", "inference")


def test_dry_run_writes_every_figure_to_one_table(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/device_check.sh", "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=150)
    table = (out / "device_check.md").read_text() if (out / "device_check.md").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + table
    assert "Dry run" in table and "not GPU figures" in table
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    by_step = {}
    for step, state, _, metric, value in (map(str.strip, r) for r in rows):
        assert state == "ok", (step, metric, value)
        by_step.setdefault(step, {})[metric] = value
    assert tuple(by_step) == STEPS
    assert "passed" in by_step["kernel_tests"]["tests"] and "failed" not in by_step["kernel_tests"]["tests"]
    assert by_step["kernel_selfcheck"]["kernel_selfcheck_failures"] == "0"
    assert float(by_step["loss_kernels"]["cpu_smoke_max_rel_err"]) < 1e-5
    assert float(by_step["train_step"]["cpu_train_images_per_s"]) > 0 and float(by_step["train_step"]["fsdp_images_per_s"]) > 0
    assert float(by_step["inference"]["predict_over_forward"]) > 0


def test_table_records_failures_timeouts_and_skips(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    atomic_write_text(logs / "good.log", "some output\nRESULT speed=1.5\n")
    atomic_write_text(logs / "broken.log", "RESULT partial=2\nTraceback (most recent call last):\nValueError: bad | thing\n")
    atomic_write_text(logs / "hung.log", "started\n")
    atomic_write_text(logs / "late.log", "no time left before the overall deadline\n")
    atomic_write_text(tmp_path / "steps.tsv", "good\t0\t60\t3.2\tpython a.py\nbroken\t1\t60\t1.0\tpython b.py\n"
                      "hung\t124\t30\t30.0\tpython c.py\nlate\t-1\t0\t0\tpython d.py\n")
    table = build_table(tmp_path, dry_run=False)
    assert "Dry run" not in table
    assert "| good | ok | 3 | speed | 1.5 |" in table
    assert "| broken | failed (exit 1) | 1 | partial | 2 |" in table
    assert "| broken | failed (exit 1) | 1 | error | ValueError: bad \\| thing |" in table
    assert "| hung | timed out after 30 s | 30 | error | started |" in table
    assert "| late | skipped (no time left) |" in table
    assert "1 of 4 steps ok; failed: broken, hung, late." in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA these commands would run for real")
def test_gpu_commands_parse_and_stop_only_at_the_missing_device(capsys):
    """Every command of the GPU run is accepted by its script's parser and gets as far as the device check."""
    listing = subprocess.run(["bash", "bench/device_check.sh", "--commands"], cwd=REPO, env=dict(os.environ, PYTHON="python"),
                             capture_output=True, text=True, timeout=30, check=True)
    names = []
    for line in listing.stdout.splitlines():
        name, command = line.split("\t")
        names.append(name)
        argv = shlex.split(command)
        while argv[0] == "env" or "=" in argv[0]:
            argv.pop(0)
        _, script, *args = argv
        if script == "-m":  # pytest over a test file
            assert all((REPO / a).is_file() for a in args if a.endswith(".py"))
            continue
        spec = importlib.util.spec_from_file_location(f"device_check_{name}", REPO / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            rc = module.main(args)
        except ValueError as exc:  # bench/loss_kernels.py raises; its __main__ turns it into exit 2
            assert "no CUDA" in str(exc), (name, exc)
            continue
        err = capsys.readouterr().err
        assert rc == 2 and "no CUDA" in err and "usage:" not in err, (name, rc, err)
    assert names[0] == "kernel_tests" and names[-1] == "inference" and len(names) == 7
