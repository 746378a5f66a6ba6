"""DINOv2 vision transformer (Oquab et al., 2023), own code, loading the official checkpoints by key.

The interface follows `facebookresearch/dinov2` so users of the official backbone feel at home:

    vit = vit_large(patch_size=14, num_register_tokens=4)        # img_size=518, LayerScale 1.0
    load_dinov2_checkpoint(vit, "dinov2_vitl14_reg4_pretrain.pth")   # genpan/train/model/pretrained.py
    feats = vit.forward_features(x)                                # x_norm_{clstoken,regtokens,patchtokens}
    maps = vit.get_intermediate_layers(x, n=[4, 11, 17, 23], reshape=True, norm=True)  # (B, D, H/14, W/14)

Defaults differ from the official factories where the released checkpoints need it: patch 14,
img_size 518 (pos_embed (1, 1+37², D)), LayerScale init 1.0, SwiGLU for `vit_giant2`, and the
positional-embedding interpolation mode of the checkpoint family (see `interpolate_patch_pos_embed`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from genpan.train.model.layers import Block, PatchEmbed

POS_EMBED_INITS = ("trunc_normal", "sincos")


def interpolate_patch_pos_embed(patch_pos: Tensor, grid_hw: tuple[int, int], antialias: bool, offset: float) -> Tensor:
    """Resample a square patch position table (1, M², D) to the patch grid (h, w), bicubically, in fp32.

    Two behaviours, matching the two DINOv2 checkpoint families:
    - plain models (offset 0.1, no antialias): the resize is given as the scale factor
      ((h + 0.1)/M, (w + 0.1)/M); the output size is still (h, w), but source coordinates are
      computed from that scale, a historical work-around the weights were trained with;
    - `_reg4` models (offset 0, antialias): the resize is given as the output size (h, w) and
      antialiased, which only matters when shrinking the grid.
    Returns (1, h·w, D) in the input dtype.
    """
    _, n, dim = patch_pos.shape
    side = int(math.isqrt(n))
    assert side * side == n, f"pos_embed holds {n} patch positions, not a square grid"
    h, w = grid_hw
    grid = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # 1 D M M
    if offset:
        scale = ((h + offset) / side, (w + offset) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
    assert grid.shape[-2:] == (h, w), f"interpolated pos_embed is {tuple(grid.shape[-2:])}, expected {(h, w)}"
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos.dtype)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos position table (grid_size², embed_dim): rows in the first half of the channels, columns
    in the second; each half holds sin/cos of the patch index at frequencies 1/10000^(k/(D/4)), k < D/4.

    Used to initialise `pos_embed` when training from scratch: a random table gives the network no notion of
    where a patch is, which the instance head needs (it regresses absolute centroids, paper eq. 2–4).
    """
    if embed_dim % 4:
        raise ValueError(f"sincos pos_embed needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    index = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(index, index, indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angle = pos.reshape(-1, 1) * omega  # M² quarter
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with optional register tokens; state-dict keys as in the official checkpoints.

    Args mirror the official class: `init_values` is the LayerScale init (None: no LayerScale),
    `ffn_layer` "mlp" or "swiglufused" (ViT-g). `interpolate_antialias` / `interpolate_offset` default to the
    checkpoint family's values (registers: antialias, offset 0; plain: offset 0.1). `pos_embed_init`:
    "trunc_normal" (official) or "sincos" (fixed 2-D sin-cos start, for training from scratch).
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        init_values: float | None = 1.0,
        drop_path_rate: float = 0.0,
        num_register_tokens: int = 0,
        interpolate_antialias: bool | None = None,
        interpolate_offset: float | None = None,
        pos_embed_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(f"pos_embed_init must be one of {POS_EMBED_INITS}, got {pos_embed_init!r}")
        self.embed_dim = self.num_features = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        has_registers = num_register_tokens > 0
        self.interpolate_antialias = has_registers if interpolate_antialias is None else interpolate_antialias
        self.interpolate_offset = (0.0 if has_registers else 0.1) if interpolate_offset is None else interpolate_offset
        self.grad_checkpointing = False  # recompute block activations in backward to save memory

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if has_registers else None
        drop_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, 0 at the first block
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, ffn_layer, init_values, drop_rates[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused here; kept so checkpoints load strictly
        self.init_weights(pos_embed_init)

    @torch.no_grad()
    def init_weights(self, pos_embed_init: str) -> None:
        if self.pos_embed.is_meta:
            return
        if pos_embed_init == "sincos":
            grid = int(math.isqrt(self.pos_embed.shape[1] - 1))
            self.pos_embed[0, 1:] = sincos_pos_embed_2d(self.embed_dim, grid)
            self.pos_embed[0, 0] = 0.0
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """pos_embed (1, 1+n, D) for an input image of h × w pixels; the native grid is returned as stored."""
        grid_hw = (h // self.patch_size, w // self.patch_size)
        native = int(math.isqrt(self.pos_embed.shape[1] - 1))
        if grid_hw == (native, native):
            return self.pos_embed.to(x.dtype)
        patch_pos = interpolate_patch_pos_embed(
            self.pos_embed[:, 1:], grid_hw, self.interpolate_antialias, self.interpolate_offset
        )
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Image (B, 3, H, W) → tokens (B, 1 + R + n, D): [cls, registers, patches]."""
        B, _, H, W = x.shape
        x = self.patch_embed(x)  # B n D
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.interpolate_pos_encoding(x, H, W)
        if self.register_tokens is not None:  # registers carry no position: inserted after pos_embed
            regs = self.register_tokens.expand(B, -1, -1).to(x.dtype)
            x = torch.cat([x[:, :1], regs, x[:, 1:]], dim=1)
        return x

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and x.requires_grad:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        x = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            x = self._run_block(block, x)
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : 1 + r],
            "x_norm_patchtokens": x_norm[:, 1 + r :],
            "x_prenorm": x,
            "masks": masks,
        }

    def _block_outputs(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Token sequences after the given 0-based blocks, in the order asked; stops after the last needed block."""
        for i in indices:
            if not 0 <= i < self.n_blocks:
                raise ValueError(f"block index {i} out of range for a ViT of depth {self.n_blocks} (0-based)")
        x = self.prepare_tokens_with_masks(x)
        wanted, taken = set(indices), {}
        for i, block in enumerate(self.blocks[: max(indices) + 1]):
            x = self._run_block(block, x)
            if i in wanted:
                taken[i] = x
        return [taken[i] for i in indices]

    def intermediate_layers(self, x: Tensor, indices: Sequence[int], norm: bool = True) -> list[Tensor]:
        """Patch-token maps (B, D, H/p, W/p) after each 0-based block in `indices` (final norm applied if `norm`)."""
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        maps = []
        for tokens in self._block_outputs(x, list(indices)):
            if norm:
                tokens = self.norm(tokens)
            patches = tokens[:, 1 + self.num_register_tokens :]  # B n D
            maps.append(patches.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous())
        return maps

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """As the official method: `n` an int takes the last n blocks, a sequence names 0-based blocks.

        Returns patch tokens (B, n_patches, D), or (B, D, H/p, W/p) with `reshape`; with `return_class_token`
        each entry is (patch tokens, class token).
        """
        return select_intermediate_layers(self, x, n, reshape, return_class_token, norm, self.num_register_tokens)

    def forward(self, x: Tensor, is_training: bool = False) -> Tensor | dict[str, Tensor | None]:
        features = self.forward_features(x)
        return features if is_training else features["x_norm_clstoken"]


def select_intermediate_layers(vit: nn.Module, x: Tensor, n: int | Sequence[int], reshape: bool, return_class_token: bool,
                               norm: bool, n_extra_tokens: int) -> tuple:
    """The official `get_intermediate_layers` of a DINO ViT: `n` an int takes the last n blocks, a sequence
    names 0-based blocks; patch tokens follow the class token and `n_extra_tokens` register tokens."""
    indices = list(range(vit.n_blocks - n, vit.n_blocks)) if isinstance(n, int) else list(n)
    outputs = vit._block_outputs(x, indices)
    if norm:
        outputs = [vit.norm(out) for out in outputs]
    class_tokens = [out[:, 0] for out in outputs]
    outputs = [out[:, 1 + n_extra_tokens :] for out in outputs]
    if reshape:
        B, _, H, W = x.shape
        h, w = H // vit.patch_size, W // vit.patch_size
        outputs = [out.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
    if return_class_token:
        return tuple(zip(outputs, class_tokens, strict=True))
    return tuple(outputs)


ARCHS: dict[str, dict] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}


def _build(arch: str, patch_size: int, num_register_tokens: int, **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(
        patch_size=patch_size, num_register_tokens=num_register_tokens, **{**ARCHS[arch], **kwargs}
    )


def vit_small(patch_size: int = 14, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-S/14: embed 384, depth 12, 6 heads (~21M parameters)."""
    return _build("vit_small", patch_size, num_register_tokens, **kwargs)


def vit_base(patch_size: int = 14, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-B/14: embed 768, depth 12, 12 heads (~86M parameters)."""
    return _build("vit_base", patch_size, num_register_tokens, **kwargs)


def vit_large(patch_size: int = 14, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-L/14: embed 1024, depth 24, 16 heads (~300M parameters)."""
    return _build("vit_large", patch_size, num_register_tokens, **kwargs)


def vit_giant2(patch_size: int = 14, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-g/14: embed 1536, depth 40, 24 heads (64 per head), SwiGLU MLP (~1.1B parameters)."""
    return _build("vit_giant2", patch_size, num_register_tokens, **kwargs)


def vit_custom(embed_dim: int, depth: int, num_heads: int, **kwargs) -> DinoVisionTransformer:
    """A size of your own, e.g. vit_custom(192, 6, 3, img_size=112) for the CPU demo."""
    return DinoVisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


FACTORIES = {"vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large, "vit_giant2": vit_giant2}
