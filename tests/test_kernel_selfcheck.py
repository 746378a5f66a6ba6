"""The start-up self-check that guards the fused kernels on a GPU, exercised on the CPU with stand-in
kernels: the reference itself passes, a raising kernel and kernels with wrong values or wrong gradients
fail with a reason; "auto" falls back with one warning line, "triton" turns a failure into an error."""

from __future__ import annotations

import pytest
import torch

from genpan.kernels.selfcheck import check_kernels
from genpan.train import losses as L


def _scaled_gradient(kernel, factor):
    def wrapped(x, *args):
        a, b = kernel(x, *args)
        return a + (factor - 1.0) * (a - a.detach()), b  # same value, gradient of `a` times factor
    return wrapped


def test_the_reference_passes_against_itself():
    assert check_kernels("cpu", torch.float32, inst_kernel=L.inst_pe_tv, sem_kernel=L.sem_ce_tv) is None


def test_a_raising_kernel_fails_with_its_message():
    def boom(*args):
        raise RuntimeError("PTX compile failed\nsecond line")
    reason = check_kernels("cpu", torch.float32, inst_kernel=boom, sem_kernel=L.sem_ce_tv)
    assert reason == "RuntimeError: PTX compile failed"


def test_wrong_values_and_wrong_gradients_fail():
    def off(x, *args):
        a, b = L.sem_ce_tv(x, *args)
        return a * 1.001, b
    reason = check_kernels("cpu", torch.float32, inst_kernel=L.inst_pe_tv, sem_kernel=off)
    assert reason is not None and reason.startswith("semantic kernel forward (loss)")
    reason = check_kernels("cpu", torch.float32, inst_kernel=_scaled_gradient(L.inst_pe_tv, 1.01), sem_kernel=L.sem_ce_tv)
    assert reason is not None and reason.startswith("instance kernel backward")


def test_auto_falls_back_with_one_warning_and_triton_raises(capsys, monkeypatch):
    monkeypatch.setattr(L, "_self_check_results", {})
    calls = []

    def failing(device, dtype):
        calls.append((device, dtype))
        return "semantic kernel forward (loss): 1 vs reference 2"

    device = torch.device("cuda:3")  # a key only: nothing runs on it
    assert L.kernels_pass_self_check(device, torch.bfloat16, check=failing) is False
    assert L.kernels_pass_self_check(device, torch.bfloat16, check=failing) is False  # checked once per pair
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: the fused loss kernels failed their self-check on cuda:3")
    with pytest.raises(RuntimeError, match="loss.backend = 'triton' but the fused kernels failed"):
        L.kernels_pass_self_check(device, torch.bfloat16, strict=True, check=failing)
    assert len(calls) == 1
    assert L.kernels_pass_self_check(torch.device("cuda:3"), torch.float32, check=lambda d, t: None) is True


def test_cpu_tensors_under_auto_never_reach_the_kernels(monkeypatch):
    monkeypatch.setattr(L, "_self_check_results", {})
    assert L._use_kernels("auto", torch.zeros(1)) is False and L._self_check_results == {}
    assert L._use_kernels("torch", torch.zeros(1)) is False
