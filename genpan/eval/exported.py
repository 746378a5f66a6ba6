"""The export-friendly predictor: the panoptic model with a positional-embedding resize that traces for any size.

Why a wrapper: `DinoVisionTransformer.interpolate_pos_encoding` compares the patch grid with the native grid in
Python and calls `F.interpolate(scale_factor=(h + 0.1)/M)`; `torch.export` turns that comparison into a guard
and specialises the program to the example's height (a 112-px example refuses every other size). Here the
bicubic resize is written as two interpolation matrices built from `arange` of the symbolic sizes,

    P_out = W_h · P · W_wᵀ      (W_h: h × M, W_w: w × M; P: the M × M × D table),

which reproduces `F.interpolate(mode="bicubic")` (Keys kernel, a = −0.75, clamped border taps, the
`scale_factor` convention of the plain DINOv2 checkpoints) and its antialiased variant (PIL's
kernel, a = −0.5, renormalised at the borders, used by the `_reg4` checkpoints), to float32 rounding. The
native-size shortcut (stored table returned as is) becomes a `torch.where` on tensors, so no guard either.
DINOv3 needs no replacement: its RoPE sin/cos come from `arange` over the symbolic patch grid.
Everything is ordinary tensor algebra, so it exports to `torch.export` and to ONNX (opset ≥ 17).

`ExportPredictor(model, decode_grid=G)` optionally appends the uv-grid decode of paper 5.1 (the G + G argmin of
`genpan.eval.postprocess.decode_embeddings`): the artefact then returns per-pixel semantic ids, instance cell ids
(v_idx·G + u_idx, the row-major cell index `genpan.eval.postprocess` groups by) and depth.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
from torch import Tensor, nn

from genpan.eval.postprocess import grid_centres
from genpan.labels import pe_encode

RAW_OUTPUTS = ("sem", "inst", "depth")
DECODED_OUTPUTS = ("sem_id", "inst_cell", "depth")


def _keys_cubic(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel at |x| (support 2): the kernel of bicubic interpolation."""
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _count(n: Tensor) -> Tensor:
    """A 0-d float tensor holding a (possibly symbolic) length, built by tensor ops only (no guard)."""
    return torch.ones_like(n).sum()


def bicubic_matrix(out_size, in_size: int, offset: float = 0.0, antialias: bool = False, device=None) -> Tensor:
    """(out_size, in_size) float32 matrix W with W @ x = F.interpolate(x, mode="bicubic") along one axis.

    `offset` > 0: the resize is requested as scale_factor (out + offset)/in (plain DINOv2 checkpoints), so source
    coordinates use that scale; `offset` 0: requested as a size, scale in/out. align_corners is False.
    Without antialias: source x = (i + ½)·s − ½, four taps at floor(x) − 1 .. floor(x) + 2 clamped to the
    border, Keys kernel a = −0.75. With antialias (PyTorch follows PIL): kernel a = −0.5 stretched by
    max(s, 1), taps in [c − support + ½, c + support + ½) ∩ [0, in) with c = (i + ½)·s, weights renormalised.
    `out_size` may be a symbolic size; no Python branch depends on it.
    """
    i = torch.arange(out_size, dtype=torch.float32, device=device)
    j = torch.arange(in_size, dtype=torch.float32, device=device)
    scale = in_size / (_count(i) + offset)  # source pixels per output pixel (0-d tensor)
    if not antialias:
        src = (i + 0.5) * scale - 0.5
        base = torch.floor(src)
        t = src - base
        weights = torch.zeros(i.shape[0], in_size, dtype=torch.float32, device=device)
        for k in range(4):  # taps base−1 .. base+2, each clamped to the border as the kernel does
            tap = (base - 1.0 + k).clamp(0.0, in_size - 1.0)
            w = _keys_cubic(t + 1.0 - k, -0.75)
            weights = weights + w[:, None] * (tap[:, None] == j[None, :]).to(torch.float32)
        return weights
    stretch = torch.clamp(scale, min=1.0)
    support = 2.0 * stretch
    centre = (i + 0.5) * scale
    lo = torch.clamp(torch.floor(centre - support + 0.5), min=0.0)
    hi = torch.clamp(torch.floor(centre + support + 0.5), max=float(in_size))
    inside = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])
    w = _keys_cubic((j[None, :] - centre[:, None] + 0.5) / stretch, -0.5) * inside.to(torch.float32)
    return w / w.sum(dim=1, keepdim=True)


def exportable_pos_encoding(vit: nn.Module, x: Tensor, h: int, w: int) -> Tensor:
    """Drop-in for `DinoVisionTransformer.interpolate_pos_encoding` with no shape-dependent Python branch."""
    p = vit.patch_size
    gh, gw = h // p, w // p
    table = vit.pos_embed
    dim = table.shape[-1]
    side = int(math.isqrt(table.shape[1] - 1))
    grid = table[0, 1:].float().reshape(side, side, dim)
    wh = bicubic_matrix(gh, side, vit.interpolate_offset, vit.interpolate_antialias, grid.device)
    ww = bicubic_matrix(gw, side, vit.interpolate_offset, vit.interpolate_antialias, grid.device)
    # native grid: the eager model returns the stored table untouched (the offset resize is not the identity)
    native = (_count(wh[:, 0]) == side) & (_count(ww[:, 0]) == side)
    wh = torch.where(native, _rows_of_eye(wh, side), wh)
    ww = torch.where(native, _rows_of_eye(ww, side), ww)
    patch = torch.einsum("im,mnd->ind", wh, grid)
    patch = torch.einsum("jn,ind->ijd", ww, patch).reshape(1, -1, dim)
    return torch.cat([table[:, :1].float(), patch], dim=1).to(x.dtype)


def _rows_of_eye(like: Tensor, side: int) -> Tensor:
    """(rows(like), side) with ones where row == column: the identity when rows == side."""
    r = torch.arange(like.shape[0], device=like.device)
    c = torch.arange(side, device=like.device)
    return (r[:, None] == c[None, :]).to(like.dtype)


class ExportPredictor(nn.Module):
    """Tuple-returning, export-friendly wrapper of a `PanopticModel` (a private copy; the original is untouched).

    forward(images (B, 3, H, W) float RGB in [0, 1], H and W multiples of the patch, `patch_size`) returns
    - decode_grid 0: (sem (B, C, h, w) logits, inst (B, 4L, h, w)[, depth (B, 1, h, w)]);
    - decode_grid G: (sem_id (B, h, w) int64 train ids, inst_cell (B, h, w) int64 = v_idx·G + u_idx
      [, depth (B, h, w)]), the nearest grid code found by two independent argmins over G (paper 5.1).
    """

    def __init__(self, model: nn.Module, decode_grid: int = 0) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        vit = self.model.backbone
        self.patch_size = int(vit.patch_size)
        if hasattr(vit, "pos_embed"):  # DINOv2; DINOv3's RoPE already has no size-dependent Python branch
            vit.interpolate_pos_encoding = partial(exportable_pos_encoding, vit)  # instance attribute: this copy only
        self.has_depth = "depth" in self.model.heads
        self.decode_grid = int(decode_grid)
        if self.decode_grid:
            if self.decode_grid < 2:
                raise ValueError(f"decode grid must be at least 2, got {decode_grid}")
            inst_channels = self.model.cfg.inst_channels
            if inst_channels % 4:
                raise ValueError(f"the in-graph decode needs 4L instance channels, the model has {inst_channels}")
            centres = torch.from_numpy(grid_centres(self.decode_grid)).float()
            self.register_buffer("code_table", pe_encode(centres, inst_channels // 4), persistent=False)  # G, 2L

    @property
    def output_names(self) -> list[str]:
        names = DECODED_OUTPUTS if self.decode_grid else RAW_OUTPUTS
        return list(names if self.has_depth else names[:2])

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images)
        if not self.decode_grid:
            return tuple(out[name] for name in RAW_OUTPUTS if name in out)
        sem_id = out["sem"].argmax(dim=1)
        inst = out["inst"].float()
        half = inst.shape[1] // 2
        # ‖γ‖² is the same for every code, so the nearest code maximises the dot product (u and v separately)
        u_idx = torch.einsum("bchw,gc->bghw", inst[:, :half], self.code_table).argmax(dim=1)
        v_idx = torch.einsum("bchw,gc->bghw", inst[:, half:], self.code_table).argmax(dim=1)
        decoded = (sem_id, v_idx * self.decode_grid + u_idx)
        return decoded + ((out["depth"][:, 0],) if self.has_depth else ())
