"""Runs the Triton kernel tests (tests/test_kernels_interpreted.py) in a fresh process under
TRITON_INTERPRET=1, so this pytest process and its other test modules keep the normal Triton mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from train import losses as L

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "test_kernels_interpreted.py"


def test_kernels_match_reference_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 10, report
    assert "skipped" not in proc.stdout and "failed" not in proc.stdout, report


def test_dispatch_picks_reference_on_cpu_unless_forced():
    x = torch.zeros(1)
    assert not L._use_kernels("auto", x)
    assert not L._use_kernels("torch", x)
    assert L._use_kernels("triton", x)
    assert L._use_kernels("auto", torch.zeros(1, device="meta")) is False
