"""The panoptic model (paper 3.1, Fig. 1): DINOv2 or DINOv3 encoder → shared decoder → per-task projection heads.

cfg = ModelConfig(arch="vit_large", num_classes=133)          # or ModelConfig(backbone="dinov3_vitl16", ...)
model = build_model(cfg)
model.load_backbone("dinov2_vitl14_pretrain.pth")            # DINOv3: the official .pth or a HF directory
out = model(images)   # images (B, 3, H, W), RGB in [0, 1] (float) or 0..255 (uint8); H, W multiples of the patch p
out["sem"]  (B, C, h, w) logits, out["inst"] (B, inst_channels, h, w), out["depth"] (B, 1, h, w) if enabled;
h = 8·H/p, w = 8·W/p: 8·H/14 for DINOv2 (paper 5.1), 8·H/16 = H/2 for DINOv3 (the decoder's three ×2 stages
are kept, see train/model/decoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from genpan.train.model import dinov3
from genpan.train.model.decoder import SharedDecoder
from genpan.train.model.heads import build_heads
from genpan.train.model.pretrained import load_dinov2_checkpoint
from genpan.train.model.vit import ARCHS, POS_EMBED_INITS, DinoVisionTransformer, vit_custom

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# model.backbone values: "dinov2" (size by model.arch), a released DINOv3 size, or "dinov3_custom"
DINOV3_BACKBONES = tuple(f"dinov3_{name}" for name in dinov3.ARCHS) + ("dinov3_custom",)
BACKBONES = ("dinov2",) + DINOV3_BACKBONES
DEFAULT_PATCH = {"dinov2": 14, "dinov3": 16}
DEFAULT_IMG_SIZE = {"dinov2": 518, "dinov3": 224}  # DINOv2: its pos_embed table (37²); DINOv3 has none

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

    backbone: "dinov2" (default; size from `arch`), "dinov3_vits16" | "dinov3_vits16plus" | "dinov3_vitb16" |
    "dinov3_vitl16" | "dinov3_vith16plus" | "dinov3_vit7b16", or "dinov3_custom" with embed_dim/depth/num_heads
    (and ffn_ratio / ffn_layer).
    arch: DINOv2 only: "vit_small" | "vit_base" | "vit_large" | "vit_giant2", or "custom" with
    embed_dim/depth/num_heads.
    patch_size / img_size / num_register_tokens: 0 / 0 / -1 mean the backbone's own (DINOv2 14, 518, 0;
    DINOv3 16, 224, 4); resolved on construction. img_size sizes DINOv2's pos_embed table; DINOv3 has none
    (RoPE) and uses it only as the export example size.
    rope_*: DINOv3 RoPE options: base (periods base^(4k/d)), coordinate normalisation ("separate" | "max" |
    "min"), and the pretraining's coordinate augmentations (shift, jitter, rescale; 0 = off, training mode only).
    layers: 1-based blocks concatenated into the decoder input; empty = `default_layers(depth)`.
    pos_embed_init / coord_features: off ("trunc_normal", False) for the paper's configs, whose pretrained
    DINOv2 already knows where each patch is; on ("sincos", True) when training from scratch, where a random
    learned position table leaves the instance head no way to read absolute position (it collapsed to the
    void code in a measured tiny run; see genpan/train/model/decoder.py).
    pixel_mean / pixel_std: ImageNet statistics on [0, 1] RGB, applied inside the model.
    """

    backbone: str = "dinov2"
    arch: str = "vit_base"
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    ffn_ratio: float = 4.0
    ffn_layer: str = "mlp"
    patch_size: int = 0
    num_register_tokens: int = -1
    img_size: int = 0
    rope_base: float = 100.0
    rope_normalize_coords: str = "separate"
    rope_shift: float = 0.0
    rope_jitter: float = 0.0
    rope_rescale: float = 0.0
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
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        family = self.family
        self.patch_size = self.patch_size or DEFAULT_PATCH[family]
        self.img_size = self.img_size or DEFAULT_IMG_SIZE[family]
        if self.num_register_tokens < 0:
            self.num_register_tokens = 4 if family == "dinov3" else 0
        if family == "dinov3":
            if self.custom and min(self.embed_dim, self.depth, self.num_heads) <= 0:
                raise ValueError("model.backbone 'dinov3_custom' needs positive model.embed_dim, depth and num_heads")
            if self.ffn_layer not in dinov3.FFN_LAYERS:
                raise ValueError(f"model.ffn_layer must be one of {dinov3.FFN_LAYERS}, got {self.ffn_layer!r}")
            if self.rope_normalize_coords not in dinov3.NORMALIZE_COORDS:
                raise ValueError(f"model.rope_normalize_coords must be one of {dinov3.NORMALIZE_COORDS}")
            if min(self.rope_base, self.rope_shift + 1, self.rope_jitter + 1, self.rope_rescale + 1) <= 0:
                raise ValueError("model.rope_base must be positive, rope_shift/jitter/rescale >= 0")
            if self.pos_embed_init != "trunc_normal":
                raise ValueError("model.pos_embed_init has no meaning for DINOv3 (RoPE, no position table)")
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
    def family(self) -> str:
        """"dinov2" or "dinov3"."""
        return self.backbone.split("_")[0]

    @property
    def custom(self) -> bool:
        return self.backbone == "dinov3_custom" if self.family == "dinov3" else self.arch == "custom"

    @property
    def vit_depth(self) -> int:
        if self.custom:
            return self.depth
        if self.family == "dinov3":
            return dinov3.ARCHS[self.backbone.removeprefix("dinov3_")]["depth"]
        return ARCHS[self.arch]["depth"]

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


def build_dinov3_backbone(cfg: ModelConfig) -> dinov3.DinoV3VisionTransformer:
    kwargs = dict(
        patch_size=cfg.patch_size,
        n_storage_tokens=cfg.num_register_tokens,
        layerscale_init=cfg.layerscale_init,
        drop_path_rate=cfg.drop_path_rate,
        pos_embed_rope_base=cfg.rope_base,
        pos_embed_rope_normalize_coords=cfg.rope_normalize_coords,
        pos_embed_rope_shift_coords=cfg.rope_shift or None,
        pos_embed_rope_jitter_coords=cfg.rope_jitter or None,
        pos_embed_rope_rescale_coords=cfg.rope_rescale or None,
    )
    if cfg.custom:
        size = dict(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
        return dinov3.DinoV3VisionTransformer(**size, ffn_ratio=cfg.ffn_ratio, ffn_layer=cfg.ffn_layer, **kwargs)
    return dinov3.dinov3_arch(cfg.backbone.removeprefix("dinov3_"), **kwargs)


def build_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "dinov3":
        return build_dinov3_backbone(cfg)
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
    """Encoder + shared decoder + heads; `forward(images)` returns {"sem", "inst"[, "depth"]} at 8·H/p."""

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
        """Load official backbone weights into the encoder, strictly (every mismatch named).

        DINOv2: the official `.pth`; DINOv3: the official `.pth` or a Hugging Face `save_pretrained` directory.
        """
        if self.cfg.family == "dinov3":
            dinov3.load_dinov3_weights(self.backbone, path)
        else:
            load_dinov2_checkpoint(self.backbone, path)

    def normalize(self, images: Tensor) -> Tensor:
        """RGB in [0, 1] (float) or 0..255 (uint8) → ImageNet-normalised float."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.normalize(images)  # B 3 H W
        maps = self.backbone.intermediate_layers(x, self.block_indices, norm=True)  # each B e H/p W/p
        pixels = self.decoder(torch.cat(maps, dim=1))  # B d 8H/p 8W/p
        return {name: head(pixels) for name, head in self.heads.items()}


def build_model(cfg: ModelConfig) -> PanopticModel:
    return PanopticModel(cfg)
