"""Transformer building blocks of the DINOv2 ViT (Oquab et al., 2023), own code.

Submodule and parameter names follow the official `facebookresearch/dinov2` layers, because the
state-dict keys of the released checkpoints are the contract (`attn.qkv`, `ls1.gamma`, `mlp.w12`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) → patch tokens (B, H/p · W/p, D) by a stride-p convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _, _, H, W = x.shape
        p = self.patch_size
        assert H % p == 0, f"Input image height {H} is not a multiple of the patch size {p}"
        assert W % p == 0, f"Input image width {W} is not a multiple of the patch size {p}"
        x = self.proj(x)  # B D H/p W/p
        return x.flatten(2).transpose(1, 2)  # B N D


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention` (flash / memory-efficient on GPU).

    `qkv` packs the projections as (3, heads, head_dim) along its output axis, as the official layer does.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens (B, N, D) → q, k, v each (B, heads, N, head_dim)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.split_heads(x)
        x = F.scaled_dot_product_attention(q, k, v)  # B heads N head_dim; scale 1/sqrt(head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Two-layer GELU MLP (ViT-S/B/L)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(mlp_hidden_dim: int) -> int:
    """Hidden width of DINOv2's fused SwiGLU: 2/3 of the MLP width, rounded up to a multiple of 8.

    ViT-g: 4 · 1536 = 6144 → 4096, so the parameter count matches a GELU MLP of width 6144.
    """
    return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward (ViT-g): w3(silu(x W1) ⊙ x W2) with W1, W2 packed in `w12`."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """Per-channel residual scale `gamma` (CaiT); DINOv2 checkpoints store it as `ls{1,2}.gamma`."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `rate`, rescale the rest."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        layerscale_init: float | None = 1.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim, hidden)
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_dim(hidden))
        else:
            raise ValueError(f"ffn_layer must be 'mlp', 'swiglu' or 'swiglufused', got {ffn_layer!r}")
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
