"""The panoptic model (paper 3.1, Fig. 1): DINOv2 encoder → shared decoder → per-task projection heads.

cfg = ModelConfig(arch="vit_large", num_classes=133)
model = build_model(cfg)
model.load_backbone("dinov2_vitl14_pretrain.pth")
out = model(images)   # images (B, 3, H, W), RGB in [0, 1] (float) or 0..255 (uint8); H, W multiples of 14
out["sem"]  (B, C, h, w) logits, out["inst"] (B, inst_channels, h, w), out["depth"] (B, 1, h, w) if enabled;
h = 8·H/14, w = 8·W/14 (paper 5.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from genpan.train.model.decoder import SharedDecoder
from genpan.train.model.heads import build_heads
from genpan.train.model.pretrained import load_dinov2_checkpoint
from genpan.train.model.vit import ARCHS, POS_EMBED_INITS, DinoVisionTransformer, vit_custom

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# 1-based blocks whose outputs feed the decoder (paper 5.1 for depth 12 and 24; ViT-g as Depth Anything).
PAPER_LAYERS = {12: [3, 6, 9, 12], 24: [5, 12, 18, 24], 40: [10, 20, 30, 40]}


def default_layers(depth: int, count: int = 4) -> list[int]:
    """1-based blocks to tap: the paper's choice where it has one, else `count` evenly spaced ending at the last."""
    if depth in PAPER_LAYERS and count == 4:
        return list(PAPER_LAYERS[depth])
    return sorted({max(1, -(-depth * k // count)) for k in range(1, count + 1)})


@dataclass
class ModelConfig:
    """Schema of the `[model]` config section.

    arch: "vit_small" | "vit_base" | "vit_large" | "vit_giant2", or "custom" with embed_dim/depth/num_heads.
    layers: 1-based blocks concatenated into the decoder input; empty = `default_layers(depth)`.
    pos_embed_init / coord_features: off ("trunc_normal", False) for the paper's configs, whose pretrained
    DINOv2 already knows where each patch is; on ("sincos", True) when training from scratch, where a random
    learned position table leaves the instance head no way to read absolute position (it collapsed to the
    void code in a measured tiny run; see train/model/decoder.py).
    pixel_mean / pixel_std: ImageNet statistics on [0, 1] RGB, applied inside the model.
    """

    arch: str = "vit_base"
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    patch_size: int = 14
    num_register_tokens: int = 0
    img_size: int = 518
    layers: list[int] = field(default_factory=list)
    decoder_width: int = 256
    decoder_kernel_size: int = 4
    num_classes: int = 133
    inst_channels: int = 16  # 4L, L = 4 harmonics (paper eq. 3)
    depth_head: bool = False
    pos_embed_init: str = "trunc_normal"
    coord_features: bool = False
    coord_harmonics: int = 4
    drop_path_rate: float = 0.0
    layerscale_init: float = 1.0
    grad_checkpointing: bool = False
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.arch != "custom" and self.arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {sorted(ARCHS)} or 'custom', got {self.arch!r}")
        if self.arch == "custom" and min(self.embed_dim, self.depth, self.num_heads) <= 0:
            raise ValueError("model.arch 'custom' needs positive model.embed_dim, model.depth and model.num_heads")
        if self.pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(f"model.pos_embed_init must be one of {POS_EMBED_INITS}, got {self.pos_embed_init!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"model.img_size {self.img_size} is not a multiple of model.patch_size {self.patch_size}")
        for name in ("num_classes", "inst_channels", "decoder_width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError("model.pixel_mean and model.pixel_std need 3 values each, std > 0")
        bad = [b for b in self.layers if not 1 <= b <= self.vit_depth]
        if bad:
            raise ValueError(f"model.layers are 1-based blocks in 1..{self.vit_depth}, got {bad}")

    @property
    def vit_depth(self) -> int:
        return self.depth if self.arch == "custom" else ARCHS[self.arch]["depth"]

    @property
    def tapped_layers(self) -> list[int]:
        """The 1-based blocks actually used."""
        return list(self.layers) or default_layers(self.vit_depth)


def tiny_cpu_config(**overrides) -> ModelConfig:
    """The from-scratch CPU demo model: ViT embed 192, depth 6, 3 heads, 112 px, sin-cos pos_embed + coord features.

    Architecture only: heads keep ModelConfig's defaults (133 classes, inst_channels 16 = 4L with L = 4,
    no depth head) unless overridden; `train/configs/tiny_cpu.toml` is the demo's source of truth and sets
    num_classes 8, inst_channels 8 (L = 2) and the depth head.

    Decoder width 128, not 256: on 2 CPU cores a training step at batch 8 takes ~0.25 s instead of ~3.3 s
    (PyTorch's CPU transposed convolution slows down sharply at width 256).
    """
    values = dict(
        arch="custom",
        embed_dim=192,
        depth=6,
        num_heads=3,
        img_size=112,
        decoder_width=128,
        pos_embed_init="sincos",
        coord_features=True,
    )
    return ModelConfig(**{**values, **overrides})


def build_backbone(cfg: ModelConfig) -> DinoVisionTransformer:
    kwargs = dict(
        patch_size=cfg.patch_size,
        num_register_tokens=cfg.num_register_tokens,
        img_size=cfg.img_size,
        init_values=cfg.layerscale_init,
        drop_path_rate=cfg.drop_path_rate,
        pos_embed_init=cfg.pos_embed_init,
    )
    if cfg.arch == "custom":
        return vit_custom(cfg.embed_dim, cfg.depth, cfg.num_heads, **kwargs)
    return DinoVisionTransformer(**{**ARCHS[cfg.arch], **kwargs})


class PanopticModel(nn.Module):
    """Encoder + shared decoder + heads; `forward(images)` returns {"sem", "inst"[, "depth"]} at 8·H/14."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.backbone.grad_checkpointing = cfg.grad_checkpointing
        # Never masked here; frozen so DDP does not wait for a gradient that never comes.
        self.backbone.mask_token.requires_grad_(False)
        self.block_indices = [b - 1 for b in cfg.tapped_layers]  # 0-based
        self.decoder = SharedDecoder(
            in_channels=len(self.block_indices) * self.backbone.embed_dim,
            width=cfg.decoder_width,
            kernel_size=cfg.decoder_kernel_size,
            coord_harmonics=cfg.coord_harmonics if cfg.coord_features else 0,
        )
        self.heads = build_heads(cfg.decoder_width, cfg.num_classes, cfg.inst_channels, cfg.depth_head)
        # Not saved in checkpoints: they are config values, not learned.
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)

    def load_backbone(self, path) -> None:
        """Load an official DINOv2 checkpoint into the encoder, strictly (every mismatch named)."""
        load_dinov2_checkpoint(self.backbone, path)

    def normalize(self, images: Tensor) -> Tensor:
        """RGB in [0, 1] (float) or 0..255 (uint8) → ImageNet-normalised float."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.normalize(images)  # B 3 H W
        maps = self.backbone.intermediate_layers(x, self.block_indices, norm=True)  # each B e H/14 W/14
        pixels = self.decoder(torch.cat(maps, dim=1))  # B d 8H/14 8W/14
        return {name: head(pixels) for name, head in self.heads.items()}


def build_model(cfg: ModelConfig) -> PanopticModel:
    return PanopticModel(cfg)
