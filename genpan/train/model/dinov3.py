"""DINOv3 vision transformer (Siméoni et al., 2025), own code, loading the official checkpoints by key.

The interface mirrors the DINOv2 module (`train/model/vit.py`):

    vit = dinov3_vitl16()                                          # patch 16, 4 registers, RoPE base 100
    load_dinov3_checkpoint(vit, "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")  # or load_dinov3_hf(vit, hf_dir)
    feats = vit.forward_features(x)                                # x_norm_{clstoken,regtokens,patchtokens}
    maps = vit.get_intermediate_layers(x, n=[4, 11, 17, 23], reshape=True, norm=True)  # (B, D, H/16, W/16)

What differs from DINOv2: patch 16; no position table — 2-D rotary embeddings (RoPE) on the patch tokens'
queries and keys, computed from the patch grid at every call, so any multiple of 16 works with no
interpolation; 4 "storage" (register) tokens after the class token; LayerNorm eps 1e-5; the key bias of the
fused qkv projection is masked to zero (`attn.qkv.bias_mask`, 1 for q and v, 0 for k); SwiGLU with separate
`w1`, `w2`, `w3` for the "plus" and 7B sizes.

RoPE (per head of width d): periods p_k = base^(4k/d), k < d/4 (or geometric from min_period to max_period);
patch centres normalised to [-1, 1] ("separate": by the grid's own height and width, the official default;
"max"/"min": both axes by the longer/shorter side, keeping the aspect); angle = 2π·coord/p_k for rows in the
first d/4 pairs and columns in the next, the d/2 angles used twice (rotate-half convention). The pretraining
augmentations of these coordinates (random shift, per-axis jitter, global rescale; the official factories
pretrain with rescale 2) are options that act only in training mode, off by default for fine-tuning.

Official key names (`cls_token`, `storage_tokens`, `mask_token` (1, D), `rope_embed.periods`,
`blocks.N.attn.qkv.{weight,bias,bias_mask}`, `blocks.N.ls{1,2}.gamma`, `blocks.N.mlp.{fc1,fc2|w1,w2,w3}`,
`norm`, `local_cls_norm` for 7B) are those that transformers' converter
`models/dinov3_vit/convert_dinov3_vit_to_hf.py` (huggingface/transformers repository; not shipped in the
wheel) renames from the original checkpoints; `HF_TO_OFFICIAL` below is the inverse of that renaming, so a
Hugging Face `save_pretrained` directory loads as well. Sizes as in that converter's configs and the
published parameter counts (S 21M, S+ 29M, B 86M, L 300M, H+ 840M, 7B 6.7B).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from genpan.train.model.layers import DropPath, LayerScale, Mlp, PatchEmbed
from genpan.train.model.pretrained import load_state_dict_strictly, read_state_dict
from genpan.train.model.vit import select_intermediate_layers

NORMALIZE_COORDS = ("separate", "max", "min")


class RopePositionEmbedding(nn.Module):
    """2-D rotary embedding: (sin, cos), each (h·w, head_dim), for an h × w patch grid (row-major).

    `periods` is a buffer because the official checkpoints store it (`rope_embed.periods`).
    shift / jitter / rescale (None = off) perturb the coordinates in training mode only: shift adds U(−s, s)
    per axis, jitter multiplies each axis by a log-uniform factor in [1/j, j], rescale both axes by one in [1/r, r].
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: str = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
    ) -> None:
        super().__init__()
        head_dim = embed_dim // num_heads
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
        if (base is None) == (min_period is None or max_period is None):
            raise ValueError("RoPE takes either base or both min_period and max_period")
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(f"normalize_coords must be one of {NORMALIZE_COORDS}, got {normalize_coords!r}")
        self.head_dim, self.base = head_dim, base
        self.min_period, self.max_period = min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.register_buffer("periods", torch.empty(head_dim // 4), persistent=True)
        self.reset_periods()

    @torch.no_grad()
    def reset_periods(self) -> None:
        if self.periods.is_meta:
            return
        quarter = self.head_dim // 4
        if self.base is not None:
            periods = self.base ** (2 * torch.arange(quarter, dtype=torch.float64) / (self.head_dim // 2))
        else:  # geometric from min_period to max_period
            ratio = self.max_period / self.min_period
            periods = self.min_period * ratio ** torch.linspace(0, 1, quarter, dtype=torch.float64)
        self.periods.copy_(periods.float())

    def coordinates(self, h: int, w: int, device: torch.device) -> Tensor:
        """Patch centres (h·w, 2) as (row, column) in [-1, 1] under the chosen normalisation."""
        rows = torch.arange(h, device=device, dtype=torch.float32) + 0.5
        cols = torch.arange(w, device=device, dtype=torch.float32) + 0.5
        if self.normalize_coords == "separate":
            rows, cols = rows / h, cols / w
        else:
            side = torch.sym_max(h, w) if self.normalize_coords == "max" else torch.sym_min(h, w)
            rows, cols = rows / side, cols / side
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
        return 2.0 * grid - 1.0

    def augment(self, coords: Tensor) -> Tensor:
        dev = coords.device
        if self.shift_coords:
            coords = coords + torch.empty(1, 2, device=dev).uniform_(-self.shift_coords, self.shift_coords)
        if self.jitter_coords:
            span = math.log(self.jitter_coords)
            coords = coords * torch.empty(1, 2, device=dev).uniform_(-span, span).exp()
        if self.rescale_coords:
            span = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, 1, device=dev).uniform_(-span, span).exp()
        return coords

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        coords = self.coordinates(h, w, self.periods.device)
        if self.training:
            coords = self.augment(coords)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]  # hw 2 d/4
        angles = angles.flatten(1).repeat(1, 2)  # hw d: [rows, cols, rows, cols] quarters
        return angles.sin(), angles.cos()


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate the last h·w tokens of x (B, heads, N, d); the leading class/storage tokens stay as they are."""
    prefix = x.shape[-2] - sin.shape[0]
    head, patches = x[:, :, :prefix], x[:, :, prefix:]
    rotated = patches.float() * cos + rotate_half(patches.float()) * sin  # in fp32 under autocast too
    return torch.cat([head, rotated.to(x.dtype)], dim=-2)


class MaskedBiasLinear(nn.Linear):
    """Linear whose bias is multiplied by the buffer `bias_mask`: the official qkv keeps a k bias of zero."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__(dim, out_dim, bias=True)
        mask = torch.ones(out_dim)
        mask[out_dim // 3 : 2 * out_dim // 3] = 0.0  # the k third
        self.register_buffer("bias_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class RopeAttention(nn.Module):
    """Multi-head self-attention with RoPE on the patch tokens' q and k, through SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv: nn.Linear = MaskedBiasLinear(dim, 3 * dim) if qkv_bias else nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def swiglu_hidden_dim(mlp_hidden_dim: int, align: int) -> int:
    """2/3 of the MLP width rounded up to `align` (S+: 6·384 → 1536, H+: 6·1280 → 5120, 7B: 3·4096 → 8192)."""
    return -(-int(mlp_hidden_dim * 2 / 3) // align) * align


class SwiGLU(nn.Module):
    """w3(silu(w1 x) ⊙ w2 x), the official DINOv3 layout (three separate projections)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


FFN_LAYERS = ("mlp", "swiglu", "swiglu64")


class RopeBlock(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1 x, rope)), then x + ls2(mlp(norm2 x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float,
        ffn_layer: str,
        layerscale_init: float | None,
        drop_path: float,
        qkv_bias: bool,
    ) -> None:
        super().__init__()
        hidden = int(dim * ffn_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = RopeAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        if ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim, hidden)
        elif ffn_layer in ("swiglu", "swiglu64"):
            self.mlp = SwiGLU(dim, swiglu_hidden_dim(hidden, 64 if ffn_layer == "swiglu64" else 8))
        else:
            raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {ffn_layer!r}")
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class DinoV3VisionTransformer(nn.Module):
    """DINOv3 ViT; state-dict keys as in the official checkpoints.

    `n_storage_tokens` is the register count (4 in every released model); `layerscale_init` the LayerScale
    init (None: none); `untie_global_and_local_cls_norm` adds the 7B model's `local_cls_norm`, a norm used
    only by the pretraining's local crops, kept so that checkpoint loads strictly.
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        layerscale_init: float | None = 1.0,
        drop_path_rate: float = 0.0,
        n_storage_tokens: int = 4,
        pos_embed_rope_base: float | None = 100.0,
        pos_embed_rope_min_period: float | None = None,
        pos_embed_rope_max_period: float | None = None,
        pos_embed_rope_normalize_coords: str = "separate",
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        untie_global_and_local_cls_norm: bool = False,
    ) -> None:
        super().__init__()
        if n_storage_tokens < 0:
            raise ValueError(f"n_storage_tokens must be >= 0, got {n_storage_tokens}")
        self.embed_dim = self.num_features = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = self.n_storage_tokens = n_storage_tokens
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim)) if n_storage_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused here; kept so checkpoints load strictly
        self.rope_embed = RopePositionEmbedding(
            embed_dim,
            num_heads,
            base=pos_embed_rope_base,
            min_period=pos_embed_rope_min_period,
            max_period=pos_embed_rope_max_period,
            normalize_coords=pos_embed_rope_normalize_coords,
            shift_coords=pos_embed_rope_shift_coords,
            jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords,
        )
        drop_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            RopeBlock(embed_dim, num_heads, ffn_ratio, ffn_layer, layerscale_init, drop_rates[i], qkv_bias)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.local_cls_norm = nn.LayerNorm(embed_dim, eps=1e-5) if untie_global_and_local_cls_norm else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.cls_token.is_meta:
            return
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Image (B, 3, H, W) → tokens (B, 1 + R + n, D) [cls, storage, patches] and the patch grid (h, w)."""
        B, _, H, W = x.shape
        tokens = self.patch_embed(x)  # B n D
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens.expand(B, -1, -1))
        tokens = torch.cat([p.to(tokens.dtype) for p in prefix] + [tokens], dim=1)
        return tokens, (H // self.patch_size, W // self.patch_size)

    def _run_block(self, block: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        if self.grad_checkpointing and self.training and x.requires_grad:
            return checkpoint(block, x, rope, use_reentrant=False)
        return block(x, rope)

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        x, (h, w) = self.prepare_tokens_with_masks(x, masks)
        rope = self.rope_embed(h, w)
        for block in self.blocks:
            x = self._run_block(block, x, rope)
        x_norm = self.norm(x)
        r = self.n_storage_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : 1 + r],
            "x_storage_tokens": x_norm[:, 1 : 1 + r],  # the official name of the same tokens
            "x_norm_patchtokens": x_norm[:, 1 + r :],
            "x_prenorm": x,
            "masks": masks,
        }

    def _block_outputs(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        for i in indices:
            if not 0 <= i < self.n_blocks:
                raise ValueError(f"block index {i} out of range for a ViT of depth {self.n_blocks} (0-based)")
        x, (h, w) = self.prepare_tokens_with_masks(x)
        rope = self.rope_embed(h, w)
        wanted, taken = set(indices), {}
        for i, block in enumerate(self.blocks[: max(indices) + 1]):
            x = self._run_block(block, x, rope)
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
            patches = tokens[:, 1 + self.n_storage_tokens :]
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
        """As the official method: `n` an int takes the last n blocks, a sequence names 0-based blocks."""
        return select_intermediate_layers(self, x, n, reshape, return_class_token, norm, self.n_storage_tokens)

    def forward(self, x: Tensor, is_training: bool = False) -> Tensor | dict[str, Tensor | None]:
        features = self.forward_features(x)
        return features if is_training else features["x_norm_clstoken"]


# The official factories' sizes (hub names dinov3_<key>); all patch 16, 4 storage tokens, RoPE base 100.
ARCHS: dict[str, dict] = {
    "vits16": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4),
    "vits16plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6, ffn_layer="swiglu"),
    "vitb16": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4),
    "vitl16": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4),
    "vith16plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6, ffn_layer="swiglu"),
    "vit7b16": dict(
        embed_dim=4096,
        depth=40,
        num_heads=32,
        ffn_ratio=3,
        ffn_layer="swiglu64",
        qkv_bias=False,
        untie_global_and_local_cls_norm=True,
    ),
}
PUBLISHED_PARAMS_M = {"vits16": 21, "vits16plus": 29, "vitb16": 86, "vitl16": 300, "vith16plus": 840, "vit7b16": 6716}


def dinov3_arch(name: str, **kwargs) -> DinoV3VisionTransformer:
    """A released size by its hub name without the prefix ("vitl16"), kwargs overriding the defaults."""
    if name not in ARCHS:
        raise ValueError(f"unknown DINOv3 size {name!r}; one of {sorted(ARCHS)}")
    return DinoV3VisionTransformer(**{**ARCHS[name], **kwargs})


def dinov3_vits16(**kwargs) -> DinoV3VisionTransformer:
    return dinov3_arch("vits16", **kwargs)


def dinov3_vitb16(**kwargs) -> DinoV3VisionTransformer:
    return dinov3_arch("vitb16", **kwargs)


def dinov3_vitl16(**kwargs) -> DinoV3VisionTransformer:
    return dinov3_arch("vitl16", **kwargs)


def dinov3_vith16plus(**kwargs) -> DinoV3VisionTransformer:
    return dinov3_arch("vith16plus", **kwargs)


# -- loading ---------------------------------------------------------------------------------------------


def load_dinov3_checkpoint(model: DinoV3VisionTransformer, path: str | Path) -> None:
    """Copy an official DINOv3 `.pth` state dict into `model` strictly (every key problem named)."""
    load_state_dict_strictly(model, read_state_dict(path), str(path))


# Hugging Face name → official name, per block (after "layer.N." / "model.layer.N."), inverse of the converter.
HF_BLOCK_TO_OFFICIAL = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj"}
HF_LAYER_SCALE = {"layer_scale1": "ls1", "layer_scale2": "ls2"}
HF_MLP = {"up_proj": "fc1", "down_proj": "fc2"}
HF_GATED_MLP = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
HF_TOP_TO_OFFICIAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.mask_token": "mask_token",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def hf_to_official(hf: dict[str, Tensor], gated_mlp: bool) -> dict[str, Tensor]:
    """Rename a transformers `DINOv3ViTModel` state dict to the official layout.

    q/k/v projections are packed into `attn.qkv` (k bias zero, `bias_mask` 0 over k where HF has no k bias);
    keys this mapping does not know keep their name, so the strict check reports them as unexpected.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    mlp_names = HF_GATED_MLP if gated_mlp else HF_MLP
    for key, tensor in hf.items():
        name = key.removeprefix("model.")
        if name in HF_TOP_TO_OFFICIAL:
            official = HF_TOP_TO_OFFICIAL[name]
            if official == "mask_token":
                tensor = tensor.reshape(1, -1)  # HF (1, 1, D), official (1, D)
            if official == "storage_tokens" and tensor.shape[1] == 0:
                continue  # HF always has the parameter, empty without registers
            out[official] = tensor
            continue
        parts = name.split(".")
        if parts[0] != "layer" or len(parts) < 4 or not parts[1].isdigit():
            out[key] = tensor
            continue
        index, rest = int(parts[1]), ".".join(parts[2:])
        module, leaf = rest.rsplit(".", 1)
        if module in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
            qkv.setdefault(index, {})[f"{module[10]}.{leaf}"] = tensor
        elif module in HF_BLOCK_TO_OFFICIAL:
            out[f"blocks.{index}.{HF_BLOCK_TO_OFFICIAL[module]}.{leaf}"] = tensor
        elif module in HF_LAYER_SCALE and leaf == "lambda1":
            out[f"blocks.{index}.{HF_LAYER_SCALE[module]}.gamma"] = tensor
        elif module.startswith("mlp.") and module[4:] in mlp_names:
            out[f"blocks.{index}.mlp.{mlp_names[module[4:]]}.{leaf}"] = tensor
        else:
            out[key] = tensor
    for index, parts in qkv.items():
        prefix = f"blocks.{index}.attn.qkv."
        if all(f"{p}.weight" in parts for p in "qkv"):
            out[prefix + "weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]])
        else:
            for p in "qkv":
                if f"{p}.weight" in parts:
                    out[f"layer.{index}.attention.{p}_proj.weight"] = parts[f"{p}.weight"]  # reported unexpected
        if any(f"{p}.bias" in parts for p in "qkv"):
            dim = parts["q.weight"].shape[0] if "q.weight" in parts else next(iter(parts.values())).shape[0]
            biases = [parts.get(f"{p}.bias") for p in "qkv"]
            out[prefix + "bias"] = torch.cat([b if b is not None else torch.zeros(dim) for b in biases])
            out[prefix + "bias_mask"] = torch.cat([torch.full((dim,), float(b is not None)) for b in biases])
    return out


def _model_arch(model: DinoV3VisionTransformer) -> dict:
    """The model's architecture under transformers' config.json field names."""
    block = model.blocks[0]
    gated = isinstance(block.mlp, SwiGLU)
    hidden = (block.mlp.w1 if gated else block.mlp.fc1).out_features
    return {
        "hidden_size": model.embed_dim,
        "num_hidden_layers": model.n_blocks,
        "num_attention_heads": model.num_heads,
        "intermediate_size": hidden,
        "use_gated_mlp": gated,
        "num_register_tokens": model.n_storage_tokens,
        "patch_size": model.patch_size,
        "rope_theta": model.rope_embed.base,
        "layer_norm_eps": model.norm.eps,
        "hidden_act": "silu" if gated else "gelu",
    }


def read_hf_safetensors(directory: Path) -> dict[str, Tensor]:
    """All tensors of `model.safetensors`, or of the shards that `model.safetensors.index.json` lists."""
    try:
        from safetensors.torch import load_file
    except ImportError as err:  # an optional dependency: comes with transformers
        raise ImportError("loading a Hugging Face directory needs the `safetensors` package") from err
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    raise FileNotFoundError(f"no model.safetensors (or its index) in {directory}")


def load_dinov3_hf(model: DinoV3VisionTransformer, directory: str | Path) -> None:
    """Load a transformers `save_pretrained` directory (config.json + model.safetensors) strictly.

    config.json is checked against the model's architecture first (each differing field named), then the
    weights are renamed to the official layout and loaded as an official checkpoint would be. The HF model
    has no stored RoPE periods (it recomputes them from rope_theta), so the model's own periods are kept.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    config = json.loads(config_path.read_text())
    ours = _model_arch(model)
    defaults = {"use_gated_mlp": False, "num_register_tokens": 0, "patch_size": 16, "rope_theta": 100.0,
                "layer_norm_eps": 1e-5, "hidden_act": "gelu"}
    problems = []
    for field, value in ours.items():
        theirs = config.get(field, defaults.get(field))
        if field == "hidden_act" and not ours["use_gated_mlp"]:
            ok = theirs in ("gelu", None)
        elif isinstance(value, float) or isinstance(theirs, float):
            ok = theirs is not None and value is not None and np.isclose(float(theirs), float(value))
        else:
            ok = theirs == value
        if not ok:
            problems.append(f"config {field}: {theirs!r} in config.json vs {value!r} in the model")
    if problems:
        raise ValueError(f"Hugging Face model {directory} does not fit the model: " + "; ".join(problems))
    state = hf_to_official(read_hf_safetensors(directory), ours["use_gated_mlp"])
    state.setdefault("rope_embed.periods", model.rope_embed.periods.detach().clone())
    load_state_dict_strictly(model, state, str(directory))


def load_dinov3_weights(model: DinoV3VisionTransformer, path: str | Path) -> None:
    """An official `.pth` file or a Hugging Face directory, whichever `path` is."""
    if Path(path).is_dir():
        load_dinov3_hf(model, path)
    else:
        load_dinov3_checkpoint(model, path)
