"""Fused instance PE loss + EDS weight + TV (paper eq. 1-5 and 10), forward and backward in Triton.

Same numbers as `genpan.train.losses.inst_pe_tv` (the definition); this is the fast path for CUDA tensors.
A program owns a tile of BLOCK consecutive pixels (row-major) of one image. It builds the target
concat(γ(u), γ(v)) in registers (eq. 2-3, void = 0), the EDS weight from the boundary distance
(eq. 5, crowd weight 0), the per-pixel loss ½(‖Δ_u‖ + ‖Δ_v‖) (eq. 4) and the euclidean TV of the pairs
(p, p+W) and (p, p+1) (eq. 10). The neighbour pixels (the tile's halo: the next row and one pixel to
the right; in backward also the previous row and one to the left) are read through the cache.
Each program writes three partial sums (Σ w·L, Σ w, Σ tv); the eq. 1 ratio is taken on the device.

Backward recomputes the target and the four pair norms and writes d(loss)/d(pred) once, scaled by
grad_output/Σw and grad_output/#pairs read from a device tensor (no host sync).
Channel loops are unrolled at compile time (4L channels, L constexpr); loads upcast to fp32, the
gradient is stored in the prediction's dtype (fp32 or bf16).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 128  # one pixel per thread at 4 warps: ~77 (fwd) and ~167 (bwd) registers on sm_90, no spills
PI = tl.constexpr(math.pi)


@triton.jit
def _pe_component(u, v, C: tl.constexpr, L: tl.constexpr):
    """Channel C of concat(γ(u), γ(v)), γ interleaved sin_0, cos_0, sin_1, cos_1, … (eq. 3)."""
    FREQ: tl.constexpr = PI * (2 ** ((C % (2 * L)) // 2))
    if C < 2 * L:
        ang = u * FREQ
    else:
        ang = v * FREQ
    if C % 2 == 1:
        t = tl.cos(ang)
    else:
        t = tl.sin(ang)
    return t


@triton.jit
def _inst_fwd_kernel(
    pred_ptr, u_ptr, v_ptr, valid_ptr, ignore_ptr, dist_ptr, partial_ptr,
    H, W, inv_d2, wmin,
    L: tl.constexpr, BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    HW = H * W
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    inside = offs < HW
    row = offs // W
    col = offs % W
    has_down = inside & (row < H - 1)
    has_right = inside & (col < W - 1)
    img = b.to(tl.int64) * HW
    u = tl.load(u_ptr + img + offs, mask=inside, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + img + offs, mask=inside, other=0.0).to(tl.float32)
    valid = tl.load(valid_ptr + img + offs, mask=inside, other=0) != 0
    crowd = tl.load(ignore_ptr + img + offs, mask=inside, other=1) != 0
    d = tl.load(dist_ptr + img + offs, mask=inside, other=0.0).to(tl.float32)
    weight = tl.where(crowd | ~inside, 0.0, wmin + (1.0 - wmin) * tl.exp(-(d * d) * inv_d2))

    base = pred_ptr + img * (4 * L) + offs
    sq_u = tl.zeros([BLOCK], dtype=tl.float32)
    sq_v = tl.zeros([BLOCK], dtype=tl.float32)
    sq_down = tl.zeros([BLOCK], dtype=tl.float32)
    sq_right = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(4 * L):
        y = tl.load(base + c * HW, mask=inside, other=0.0).to(tl.float32)
        t = tl.where(valid, _pe_component(u, v, c, L), 0.0)
        diff = y - t
        if c < 2 * L:
            sq_u += diff * diff
        else:
            sq_v += diff * diff
        dd = y - tl.load(base + c * HW + W, mask=has_down, other=0.0).to(tl.float32)
        dr = y - tl.load(base + c * HW + 1, mask=has_right, other=0.0).to(tl.float32)
        sq_down += dd * dd
        sq_right += dr * dr
    per_pixel = 0.5 * (tl.sqrt(sq_u) + tl.sqrt(sq_v))
    tv = tl.where(has_down, tl.sqrt(sq_down), 0.0) + tl.where(has_right, tl.sqrt(sq_right), 0.0)
    slot = partial_ptr + (b * tl.num_programs(0) + tile) * 3
    tl.store(slot, tl.sum(weight * per_pixel, axis=0))
    tl.store(slot + 1, tl.sum(weight, axis=0))
    tl.store(slot + 2, tl.sum(tv, axis=0))


@triton.jit
def _safe_inv(x):
    """1/x, and 0 where x = 0 (the subgradient of a norm at 0, as torch's vector_norm)."""
    return tl.where(x > 0.0, 1.0 / tl.where(x > 0.0, x, 1.0), 0.0)


@triton.jit
def _inst_bwd_kernel(
    pred_ptr, u_ptr, v_ptr, valid_ptr, ignore_ptr, dist_ptr, coef_ptr, grad_ptr,
    H, W, inv_d2, wmin,
    L: tl.constexpr, BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    HW = H * W
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    inside = offs < HW
    row = offs // W
    col = offs % W
    has_down = inside & (row < H - 1)
    has_right = inside & (col < W - 1)
    has_up = inside & (row > 0)
    has_left = inside & (col > 0)
    img = b.to(tl.int64) * HW
    u = tl.load(u_ptr + img + offs, mask=inside, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + img + offs, mask=inside, other=0.0).to(tl.float32)
    valid = tl.load(valid_ptr + img + offs, mask=inside, other=0) != 0
    crowd = tl.load(ignore_ptr + img + offs, mask=inside, other=1) != 0
    d = tl.load(dist_ptr + img + offs, mask=inside, other=0.0).to(tl.float32)
    weight = tl.where(crowd | ~inside, 0.0, wmin + (1.0 - wmin) * tl.exp(-(d * d) * inv_d2))
    coef_pe = tl.load(coef_ptr)  # grad_output(pe) / Σw
    coef_tv = tl.load(coef_ptr + 1)  # grad_output(tv) / #pairs

    base = pred_ptr + img * (4 * L) + offs
    # pass 1: the norms every gradient term divides by
    sq_u = tl.zeros([BLOCK], dtype=tl.float32)
    sq_v = tl.zeros([BLOCK], dtype=tl.float32)
    sq_down = tl.zeros([BLOCK], dtype=tl.float32)
    sq_right = tl.zeros([BLOCK], dtype=tl.float32)
    sq_up = tl.zeros([BLOCK], dtype=tl.float32)
    sq_left = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(4 * L):
        y = tl.load(base + c * HW, mask=inside, other=0.0).to(tl.float32)
        diff = y - tl.where(valid, _pe_component(u, v, c, L), 0.0)
        if c < 2 * L:
            sq_u += diff * diff
        else:
            sq_v += diff * diff
        dd = y - tl.load(base + c * HW + W, mask=has_down, other=0.0).to(tl.float32)
        dr = y - tl.load(base + c * HW + 1, mask=has_right, other=0.0).to(tl.float32)
        du = y - tl.load(base + c * HW - W, mask=has_up, other=0.0).to(tl.float32)
        dl = y - tl.load(base + c * HW - 1, mask=has_left, other=0.0).to(tl.float32)
        sq_down += dd * dd
        sq_right += dr * dr
        sq_up += du * du
        sq_left += dl * dl
    scale_pe = 0.5 * coef_pe * weight
    inv_u = scale_pe * _safe_inv(tl.sqrt(sq_u))
    inv_v = scale_pe * _safe_inv(tl.sqrt(sq_v))
    inv_down = tl.where(has_down, coef_tv * _safe_inv(tl.sqrt(sq_down)), 0.0)
    inv_right = tl.where(has_right, coef_tv * _safe_inv(tl.sqrt(sq_right)), 0.0)
    inv_up = tl.where(has_up, coef_tv * _safe_inv(tl.sqrt(sq_up)), 0.0)
    inv_left = tl.where(has_left, coef_tv * _safe_inv(tl.sqrt(sq_left)), 0.0)
    # pass 2: the gradient, one write per element (the loads hit the cache)
    out = grad_ptr + img * (4 * L) + offs
    for c in tl.static_range(4 * L):
        y = tl.load(base + c * HW, mask=inside, other=0.0).to(tl.float32)
        diff = y - tl.where(valid, _pe_component(u, v, c, L), 0.0)
        if c < 2 * L:
            g = diff * inv_u
        else:
            g = diff * inv_v
        g += (y - tl.load(base + c * HW + W, mask=has_down, other=0.0).to(tl.float32)) * inv_down
        g += (y - tl.load(base + c * HW + 1, mask=has_right, other=0.0).to(tl.float32)) * inv_right
        g += (y - tl.load(base + c * HW - W, mask=has_up, other=0.0).to(tl.float32)) * inv_up
        g += (y - tl.load(base + c * HW - 1, mask=has_left, other=0.0).to(tl.float32)) * inv_left
        tl.store(out + c * HW, g.to(grad_ptr.dtype.element_ty), mask=inside)


def _prepare(pred: Tensor, u: Tensor, v: Tensor, valid: Tensor, ignore: Tensor, dist: Tensor, num_harmonics: int):
    if pred.dim() != 4 or pred.shape[1] != 4 * num_harmonics:
        raise ValueError(f"fused PE loss: prediction {tuple(pred.shape)} is not (B, {4 * num_harmonics}, h, w)")
    if pred.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused PE loss: prediction dtype {pred.dtype} is not float32 or bfloat16")
    want = (pred.shape[0], *pred.shape[2:])
    for name, t in (("u", u), ("v", v), ("valid", valid), ("ignore", ignore), ("dist", dist)):
        if tuple(t.shape) != want:
            raise ValueError(f"fused PE loss: {name} has shape {tuple(t.shape)}, expected {want}")
    return (
        pred.contiguous(),
        u.to(torch.float32).contiguous(),
        v.to(torch.float32).contiguous(),
        _as_bytes(valid),
        _as_bytes(ignore),
        dist.to(torch.float32).contiguous(),
    )


def _as_bytes(mask: Tensor) -> Tensor:
    """A bool mask as uint8 without a copy (same storage), other dtypes converted."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8)


class FusedInstPETV(torch.autograd.Function):
    """autograd wrapper: forward returns (pe, tv) scalars, backward d/d(pred) in one kernel."""

    @staticmethod
    def forward(ctx, pred, u, v, valid, ignore, dist, num_harmonics, D, wmin):  # type: ignore[override]
        pred, u, v, valid, ignore, dist = _prepare(pred, u, v, valid, ignore, dist, num_harmonics)
        B, _, H, W = pred.shape
        tiles = triton.cdiv(H * W, BLOCK)
        partial = torch.empty(B * tiles, 3, dtype=torch.float32, device=pred.device)
        inv_d2 = 1.0 / (float(D) * float(D))
        _inst_fwd_kernel[(tiles, B)](
            pred, u, v, valid, ignore, dist, partial, H, W, inv_d2, float(wmin), L=num_harmonics, BLOCK=BLOCK
        )
        sums = partial.sum(0)
        sum_w = sums[1].clamp_min(torch.finfo(torch.float32).tiny)
        pairs = max(B * ((H - 1) * W + H * (W - 1)), 1)
        ctx.save_for_backward(pred, u, v, valid, ignore, dist, sum_w)
        ctx.args = (num_harmonics, inv_d2, float(wmin), pairs)
        return sums[0] / sum_w, sums[2] / pairs

    @staticmethod
    def backward(ctx, g_pe, g_tv):  # type: ignore[override]
        pred, u, v, valid, ignore, dist, sum_w = ctx.saved_tensors
        num_harmonics, inv_d2, wmin, pairs = ctx.args
        zero = torch.zeros((), dtype=torch.float32, device=pred.device)
        g_pe = zero if g_pe is None else g_pe.float()
        g_tv = zero if g_tv is None else g_tv.float()
        coef = torch.stack([g_pe / sum_w, g_tv / pairs]).contiguous()
        grad = torch.empty_like(pred)
        B, _, H, W = pred.shape
        _inst_bwd_kernel[(triton.cdiv(H * W, BLOCK), B)](
            pred, u, v, valid, ignore, dist, coef, grad, H, W, inv_d2, wmin, L=num_harmonics, BLOCK=BLOCK
        )
        return grad, None, None, None, None, None, None, None, None


def fused_inst_pe_tv(
    pred: Tensor,
    u: Tensor,
    v: Tensor,
    valid: Tensor,
    ignore: Tensor,
    dist: Tensor,
    num_harmonics: int,
    D: float,
    wmin: float,
) -> tuple[Tensor, Tensor]:
    """Drop-in for `genpan.train.losses.inst_pe_tv`: (EDS-weighted PE loss eq. 1-5, euclidean TV eq. 10)."""
    pe, tv = FusedInstPETV.apply(pred, u, v, valid, ignore, dist, num_harmonics, D, wmin)
    return pe, tv
