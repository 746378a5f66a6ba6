"""Fused Triton loss kernels against the PyTorch reference, run on CPU by Triton's interpreter.

Triton reads TRITON_INTERPRET when it decorates kernels (its own library functions included) and
again while interpreting, so it must be set before triton is first imported and stay set. This module
therefore runs in its own process, started by tests/test_kernels.py with the variable set; collected
in an ordinary pytest run it skips itself, and the other test modules never see the variable.
Run it alone with: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_interpreted.py
On a GPU the same tests run compiled, on CUDA tensors, without the interpreter:
GENPAN_KERNEL_TEST_DEVICE=cuda python -m pytest -q tests/test_kernels_interpreted.py (bench/device_check.sh does).

Tolerances. fp32: forward rtol 1e-5. Gradients rtol 1e-5 plus atol 1e-5·max|g_ref|: every gradient
element is a sum of several terms (weighted loss, up to four TV pairs) that partly cancel, so its
fp32 error is a few ulp of the largest term, not of the result.
bf16: the kernels upcast the bf16 inputs and compute in fp32, so forward values are compared with the
reference on the same values upcast to fp32, at the fp32 tolerance. The kernel's gradient is that fp32
result rounded once to bf16 (8 significant bits): at most one bf16 ulp away (the interpreter truncates,
the GPU rounds to nearest: ½ ulp), and one ulp is at most 2^-7 of the value, hence rtol 2^-7 against
the fp32 reference gradient. (The reference run on bf16 tensors itself is no better target: its TV and
PE branches each cast their gradient to bf16 and add them in bf16.)
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("GENPAN_KERNEL_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        pytest.skip("GENPAN_KERNEL_TEST_DEVICE=cuda needs a CUDA device and TRITON_INTERPRET unset", allow_module_level=True)
elif os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from process start; tests/test_kernels.py runs it in a subprocess",
                allow_module_level=True)

from genpan.kernels import inst_loss as inst_k  # noqa: E402
from genpan.kernels import sem_loss as sem_k  # noqa: E402
from genpan.train import losses as L  # noqa: E402

BF16_RTOL = 2.0**-7


def _close_grad(g, g_ref, rtol):
    atol = 1e-5 * g_ref.abs().max().item() + 1e-12
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=rtol, atol=atol)


def _grads(fn, x, g_a=0.7, g_b=-1.3):
    """Loss values and d(g_a·a + g_b·b)/dx: grad_output ≠ 1 on both outputs."""
    a, b = fn(x)
    return a.detach(), b.detach(), torch.autograd.grad(g_a * a + g_b * b, x)[0]


# ---------------------------------------------------------------- instance


def inst_inputs(B=2, n_harm=2, H=13, W=23, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, 4 * n_harm, H, W, generator=g).to(DEVICE, dtype).requires_grad_()
    u = torch.rand(B, H, W, generator=g) * 2 - 1
    v = torch.rand(B, H, W, generator=g) * 2 - 1
    crowd = torch.rand(B, H, W, generator=g) > 0.85
    valid = (torch.rand(B, H, W, generator=g) > 0.4) & ~crowd
    dist = torch.rand(B, H, W, generator=g) * 6
    return pred, *(t.to(DEVICE) for t in (u, v, valid, crowd, dist))


def _inst_check(pred, u, v, valid, crowd, dist, n_harm, D=4.0, wmin=0.05, grad_rtol=1e-5):
    def fused(x):
        return inst_k.fused_inst_pe_tv(x, u, v, valid, crowd, dist, n_harm, D, wmin)

    def ref(x):
        return L.inst_pe_tv(x, u, v, valid, crowd, dist, n_harm, D, wmin)

    pe, tv, g = _grads(fused, pred)
    pe_r, tv_r, g_r = _grads(ref, pred.detach().float().requires_grad_())
    torch.testing.assert_close(pe, pe_r.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tv, tv_r.float(), rtol=1e-5, atol=1e-7)
    assert g.dtype == pred.dtype
    _close_grad(g, g_r, grad_rtol)
    return pe, tv, g


@pytest.mark.parametrize("n_harm", [1, 4])
def test_inst_fp32_matches_reference_across_tiles_and_borders(n_harm):
    # 13·23 = 299 pixels: three 128-pixel tiles, the last partial; all straddle rows
    pe, tv, g = _inst_check(*inst_inputs(n_harm=n_harm, seed=n_harm), n_harm)
    assert pe.item() > 0 and tv.item() > 0 and g.abs().sum().item() > 0


def test_inst_all_void_and_all_crowd_images():
    pred, u, v, valid, crowd, dist = inst_inputs(H=7, W=9, seed=3)
    none = torch.zeros_like(valid)
    _inst_check(pred, u, v, none, none, dist, 2)
    everything = torch.ones_like(valid)
    pe, tv, g = _inst_check(pred, u, v, none, everything, dist, 2)
    assert pe.item() == 0.0 and tv.item() > 0  # no weight left, TV still global


def test_inst_constant_prediction_has_finite_zero_subgradients():
    pred, u, v, valid, crowd, dist = inst_inputs(H=6, W=5, seed=4)
    zeros = torch.zeros_like(pred).requires_grad_()
    pe, tv, g = _inst_check(zeros, u, v, torch.zeros_like(valid), crowd, dist, 2)
    assert tv.item() == 0.0 and torch.isfinite(g).all() and g.abs().max().item() == 0.0


def test_inst_thin_maps():
    for H, W in ((1, 17), (9, 1)):
        _inst_check(*inst_inputs(H=H, W=W, seed=H + W), 2)


def test_inst_bf16_prediction():
    _inst_check(*inst_inputs(n_harm=4, seed=5, dtype=torch.bfloat16), 4, grad_rtol=BF16_RTOL)


# ---------------------------------------------------------------- semantic


def sem_inputs(B=2, C=19, H=5, W=17, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, C, H, W, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) > 0.8] = 255
    dist = torch.rand(B, H, W, generator=g) * 6
    return logits, labels.to(DEVICE), dist.to(DEVICE)


def _sem_check(logits, labels, dist, D=4.0, wmin=0.05, grad_rtol=1e-5):
    pe, tv, g = _grads(lambda x: sem_k.fused_sem_ce_tv(x, labels, dist, D, wmin), logits)
    pe_r, tv_r, g_r = _grads(lambda x: L.sem_ce_tv(x, labels, dist, D, wmin), logits.detach().float().requires_grad_())
    torch.testing.assert_close(pe, pe_r.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tv, tv_r.float(), rtol=1e-5, atol=1e-7)
    assert g.dtype == logits.dtype
    _close_grad(g, g_r, grad_rtol)
    return pe, tv, g


@pytest.mark.parametrize("C", [19, 37, 133])
def test_sem_fp32_matches_reference(C):
    # 5·17 = 85 pixels: two 64-pixel tiles; C = 37 and 133 leave a partial 32-class chunk
    ce, tv, g = _sem_check(*sem_inputs(C=C, seed=C, H=5 if C < 100 else 3))
    assert ce.item() > 0 and tv.item() > 0


def test_sem_all_ignore_and_thin_maps():
    logits, labels, dist = sem_inputs(seed=7)
    ce, tv, g = _sem_check(logits, torch.full_like(labels, 255), dist)
    assert ce.item() == 0.0 and tv.item() > 0
    for H, W in ((1, 13), (11, 1)):
        _sem_check(*sem_inputs(C=5, H=H, W=W, seed=H + W))


def test_sem_bf16_logits():
    _sem_check(*sem_inputs(C=40, seed=8, dtype=torch.bfloat16), grad_rtol=BF16_RTOL)


# ---------------------------------------------------------------- dispatch


def test_compute_losses_triton_backend_equals_torch_backend():
    pred, u, v, valid, crowd, dist = inst_inputs(H=6, W=11, seed=9)
    logits, labels, _ = sem_inputs(H=6, W=11, seed=10)
    ins = (valid.long() * (1 + (torch.arange(11, device=DEVICE) > 5).long())).expand_as(valid).contiguous()
    targets = {"sem": labels, "dist": dist, "u": u, "v": v, "valid": valid, "ignore": crowd, "ins": ins}
    results = {}
    for backend in ("torch", "triton"):
        x_sem = logits.detach().clone().requires_grad_()
        x_inst = pred.detach().clone().requires_grad_()
        cfg = L.LossConfig(num_harmonics=2, D=4.0, backend=backend)
        terms = L.compute_losses({"sem": x_sem, "inst": x_inst}, targets, cfg)
        terms["total"].backward()
        results[backend] = ({k: t.detach() for k, t in terms.items()}, x_sem.grad, x_inst.grad)
    ref_terms, ref_gs, ref_gi = results["torch"]
    terms, gs, gi = results["triton"]
    assert set(terms) == set(ref_terms)
    for k in terms:
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-5, atol=1e-7)
    _close_grad(gs, ref_gs, 1e-5)
    _close_grad(gi, ref_gi, 1e-5)


def test_selfcheck_passes_for_the_real_kernels():
    from genpan.kernels.selfcheck import check_kernels

    assert check_kernels(DEVICE, torch.float32) is None
