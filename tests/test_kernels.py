"""Runs the Triton kernel tests (tests/test_kernels_interpreted.py) in a fresh process under
TRITON_INTERPRET=1, so this pytest process and its other test modules keep the normal Triton mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genpan.train import losses as L

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
    assert L._use_kernels("auto", torch.zeros(1, device="meta")) is False
    # forced, on a CPU outside the interpreter: the self-check fails, and "triton" makes that an error
    with pytest.raises(RuntimeError, match="failed their self-check on cpu"):
        L._use_kernels("triton", x)


def _signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """Triton signature of every argument: pointer/scalar types as given, the rest constexpr."""
    return {name: types.get(name, "constexpr") for name in kernel.arg_names}


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path, monkeypatch):
    """Ahead-of-time compilation to a Hopper cubin: the compiled (not interpreted) kernels build,
    sin/cos use the accurate libdevice path (no sin.approx)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton in interpreter mode")
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - depends on the installed triton build
        pytest.skip(f"triton without the AOT compiler API: {exc}")
    from genpan.kernels import inst_loss, sem_loss

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the default, set to silence Triton 3.9's notice
    aux = {"u_ptr": "*fp32", "v_ptr": "*fp32", "valid_ptr": "*u8", "ignore_ptr": "*u8", "dist_ptr": "*fp32",
           "partial_ptr": "*fp32", "coef_ptr": "*fp32", "H": "i32", "W": "i32", "inv_d2": "fp32", "wmin": "fp32"}
    inst_types = {**aux, "pred_ptr": "*bf16", "grad_ptr": "*bf16"}
    sem_types = {**aux, "logit_ptr": "*fp32", "grad_ptr": "*fp32", "label_ptr": "*i64", "stats_ptr": "*fp32",
                 "C": "i32", "N": "i64"}
    jobs = [
        (inst_loss._inst_fwd_kernel, inst_types, {"L": 4, "BLOCK": inst_loss.BLOCK}),
        (inst_loss._inst_bwd_kernel, inst_types, {"L": 4, "BLOCK": inst_loss.BLOCK}),
        (sem_loss._sem_fwd_kernel, sem_types, {"IGNORE_INDEX": 255, "BLOCK_P": sem_loss.BLOCK_P, "BLOCK_C": sem_loss.BLOCK_C}),
        (sem_loss._sem_bwd_kernel, sem_types, {"IGNORE_INDEX": 255, "BLOCK_P": sem_loss.BLOCK_P, "BLOCK_C": sem_loss.BLOCK_C}),
    ]
    for kernel, types, consts in jobs:
        src = ASTSource(fn=kernel, signature=_signature(kernel, types), constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        ptx = compiled.asm["ptx"]
        assert ".entry" in ptx and "sin.approx" not in ptx and "cos.approx" not in ptx, kernel.__name__
