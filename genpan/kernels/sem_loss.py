"""Fused semantic loss: EDS-weighted cross-entropy (eq. 1, 5; ignore 255) + TV on probabilities (eq. 11).

Same numbers as `genpan.train.losses.sem_ce_tv` (the definition); this is the fast path for CUDA tensors.
A program owns BLOCK_P consecutive pixels of one image and walks the C classes in chunks of BLOCK_C
with an online softmax (running max, rescaled sums), so each logit is read once per pass.

TV without the neighbours' softmax: H(P_p, P_q) = lse_q − Σ_c P_p,c z_q,c = lse_q − E_p[z_q], so the
sum over pairs is Σ_q lse_q·(#pairs where q is second) − Σ_p (E_p[z_down] + E_p[z_right]). Each pixel
adds its own lse and its two expectations, which the online pass accumulates next to Σ exp.

Forward stores three floats per pixel (lse, E_p[z_down], E_p[z_right]) for backward, which then needs
one pass: d/dz_p,c = g_ce·w_p/Σw·(P_p,c − [c = y_p])
                    + g_tv/#pairs·(−P_p,c(z_down,c − E_p[z_down]) − P_p,c(z_right,c − E_p[z_right])
                                   + (P_p,c − P_up,c) + (P_p,c − P_left,c)),
each term present only where its pair exists. Labels must lie in [0, C) or be 255 (not checked on the
device: the check would cost a host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from genpan.labels import IGNORE

BLOCK_P = 64
BLOCK_C = 32


@triton.jit
def _sem_fwd_kernel(
    logit_ptr, label_ptr, dist_ptr, partial_ptr, stats_ptr,
    C, H, W, N, inv_d2, wmin,
    IGNORE_INDEX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    HW = H * W
    offs = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = offs < HW
    row = offs // W
    col = offs % W
    has_down = inside & (row < H - 1)
    has_right = inside & (col < W - 1)
    img = b.to(tl.int64) * HW
    base = logit_ptr + img * C + offs

    m = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_P], dtype=tl.float32)
    a_down = tl.zeros([BLOCK_P], dtype=tl.float32)
    a_right = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        in_c = (ch < C)[None, :]
        ptr = base[:, None] + ch[None, :] * HW
        z = tl.load(ptr, mask=inside[:, None] & in_c, other=0.0).to(tl.float32)
        z = tl.where(in_c, z, float("-inf"))
        z_down = tl.load(ptr + W, mask=has_down[:, None] & in_c, other=0.0).to(tl.float32)
        z_right = tl.load(ptr + 1, mask=has_right[:, None] & in_c, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * rescale + tl.sum(e, axis=1)
        a_down = a_down * rescale + tl.sum(e * z_down, axis=1)
        a_right = a_right * rescale + tl.sum(e * z_right, axis=1)
        m = m_new
    lse = m + tl.log(s)
    e_down = a_down / s
    e_right = a_right / s

    label = tl.load(label_ptr + img + offs, mask=inside, other=IGNORE_INDEX)
    keep = inside & (label != IGNORE_INDEX)
    z_label = tl.load(base + label * HW, mask=keep, other=0.0).to(tl.float32)
    d = tl.load(dist_ptr + img + offs, mask=inside, other=0.0).to(tl.float32)
    weight = tl.where(keep, wmin + (1.0 - wmin) * tl.exp(-(d * d) * inv_d2), 0.0)
    ce = tl.where(keep, lse - z_label, 0.0)
    second = tl.where(inside & (row > 0), lse, 0.0) + tl.where(inside & (col > 0), lse, 0.0)
    first = tl.where(has_down, e_down, 0.0) + tl.where(has_right, e_right, 0.0)

    tl.store(stats_ptr + img + offs, lse, mask=inside)
    tl.store(stats_ptr + N + img + offs, e_down, mask=inside)
    tl.store(stats_ptr + 2 * N + img + offs, e_right, mask=inside)
    slot = partial_ptr + (b * tl.num_programs(0) + tile) * 3
    tl.store(slot, tl.sum(weight * ce, axis=0))
    tl.store(slot + 1, tl.sum(weight, axis=0))
    tl.store(slot + 2, tl.sum(second - first, axis=0))


@triton.jit
def _sem_bwd_kernel(
    logit_ptr, label_ptr, dist_ptr, stats_ptr, coef_ptr, grad_ptr,
    C, H, W, N, inv_d2, wmin,
    IGNORE_INDEX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    HW = H * W
    offs = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = offs < HW
    row = offs // W
    col = offs % W
    has_down = inside & (row < H - 1)
    has_right = inside & (col < W - 1)
    has_up = inside & (row > 0)
    has_left = inside & (col > 0)
    img = b.to(tl.int64) * HW
    base = logit_ptr + img * C + offs
    out = grad_ptr + img * C + offs

    lse = tl.load(stats_ptr + img + offs, mask=inside, other=0.0)
    e_down = tl.load(stats_ptr + N + img + offs, mask=inside, other=0.0)
    e_right = tl.load(stats_ptr + 2 * N + img + offs, mask=inside, other=0.0)
    lse_up = tl.load(stats_ptr + img + offs - W, mask=has_up, other=0.0)
    lse_left = tl.load(stats_ptr + img + offs - 1, mask=has_left, other=0.0)
    label = tl.load(label_ptr + img + offs, mask=inside, other=IGNORE_INDEX)
    keep = inside & (label != IGNORE_INDEX)
    d = tl.load(dist_ptr + img + offs, mask=inside, other=0.0).to(tl.float32)
    coef_ce = tl.load(coef_ptr)  # grad_output(ce) / Σw
    coef_tv = tl.load(coef_ptr + 1)  # grad_output(tv) / #pairs
    w_ce = tl.where(keep, coef_ce * (wmin + (1.0 - wmin) * tl.exp(-(d * d) * inv_d2)), 0.0)
    # P_p,c is multiplied by (w_ce + coef_tv·#(pairs where p is second)) in the gradient
    n_second = has_up.to(tl.float32) + has_left.to(tl.float32)
    p_coef = w_ce + coef_tv * n_second

    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        in_c = (ch < C)[None, :]
        ptr = base[:, None] + ch[None, :] * HW
        mask = inside[:, None] & in_c
        z = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse[:, None])
        g = p * p_coef[:, None] - tl.where(ch[None, :] == label[:, None], w_ce[:, None], 0.0)
        z_down = tl.load(ptr + W, mask=has_down[:, None] & in_c, other=0.0).to(tl.float32)
        g -= tl.where(has_down[:, None], coef_tv * p * (z_down - e_down[:, None]), 0.0)
        z_right = tl.load(ptr + 1, mask=has_right[:, None] & in_c, other=0.0).to(tl.float32)
        g -= tl.where(has_right[:, None], coef_tv * p * (z_right - e_right[:, None]), 0.0)
        z_up = tl.load(ptr - W, mask=has_up[:, None] & in_c, other=0.0).to(tl.float32)
        g -= tl.where(has_up[:, None], coef_tv * tl.exp(z_up - lse_up[:, None]), 0.0)
        z_left = tl.load(ptr - 1, mask=has_left[:, None] & in_c, other=0.0).to(tl.float32)
        g -= tl.where(has_left[:, None], coef_tv * tl.exp(z_left - lse_left[:, None]), 0.0)
        tl.store(out[:, None] + ch[None, :] * HW, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _prepare(logits: Tensor, labels: Tensor, dist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if logits.dim() != 4:
        raise ValueError(f"fused semantic loss: logits {tuple(logits.shape)} are not (B, C, h, w)")
    if logits.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused semantic loss: logits dtype {logits.dtype} is not float32 or bfloat16")
    want = (logits.shape[0], *logits.shape[2:])
    for name, t in (("labels", labels), ("dist", dist)):
        if tuple(t.shape) != want:
            raise ValueError(f"fused semantic loss: {name} has shape {tuple(t.shape)}, expected {want}")
    return logits.contiguous(), labels.to(torch.int64).contiguous(), dist.to(torch.float32).contiguous()


class FusedSemCETV(torch.autograd.Function):
    """autograd wrapper: forward returns (ce, tv) scalars, backward d/d(logits) in one kernel."""

    @staticmethod
    def forward(ctx, logits, labels, dist, D, wmin):  # type: ignore[override]
        logits, labels, dist = _prepare(logits, labels, dist)
        B, C, H, W = logits.shape
        tiles = triton.cdiv(H * W, BLOCK_P)
        n = B * H * W
        partial = torch.empty(B * tiles, 3, dtype=torch.float32, device=logits.device)
        stats = torch.empty(3, n, dtype=torch.float32, device=logits.device)
        inv_d2 = 1.0 / (float(D) * float(D))
        _sem_fwd_kernel[(tiles, B)](
            logits, labels, dist, partial, stats, C, H, W, n, inv_d2, float(wmin),
            IGNORE_INDEX=IGNORE, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
        )
        sums = partial.sum(0)
        sum_w = sums[1].clamp_min(torch.finfo(torch.float32).tiny)
        pairs = max(B * ((H - 1) * W + H * (W - 1)), 1)
        ctx.save_for_backward(logits, labels, dist, stats, sum_w)
        ctx.args = (inv_d2, float(wmin), pairs)
        return sums[0] / sum_w, sums[2] / pairs

    @staticmethod
    def backward(ctx, g_ce, g_tv):  # type: ignore[override]
        logits, labels, dist, stats, sum_w = ctx.saved_tensors
        inv_d2, wmin, pairs = ctx.args
        zero = torch.zeros((), dtype=torch.float32, device=logits.device)
        g_ce = zero if g_ce is None else g_ce.float()
        g_tv = zero if g_tv is None else g_tv.float()
        coef = torch.stack([g_ce / sum_w, g_tv / pairs]).contiguous()
        grad = torch.empty_like(logits)
        B, C, H, W = logits.shape
        _sem_bwd_kernel[(triton.cdiv(H * W, BLOCK_P), B)](
            logits, labels, dist, stats, coef, grad, C, H, W, B * H * W, inv_d2, wmin,
            IGNORE_INDEX=IGNORE, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
        )
        return grad, None, None, None, None


def fused_sem_ce_tv(logits: Tensor, labels: Tensor, dist: Tensor, D: float, wmin: float) -> tuple[Tensor, Tensor]:
    """Drop-in for `genpan.train.losses.sem_ce_tv`: (EDS-weighted CE eq. 1/5, TV on probabilities eq. 11)."""
    ce, tv = FusedSemCETV.apply(logits, labels, dist, D, wmin)
    return ce, tv
