"""Model: DINOv2 or DINOv3 ViT backbone (own code, official checkpoint keys), shared decoder, task heads (paper 3.1)."""

from genpan.train.model.dinov3 import (
    DinoV3VisionTransformer,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vits16,
    load_dinov3_checkpoint,
    load_dinov3_hf,
)
from genpan.train.model.layer_decay import param_groups_layer_decay
from genpan.train.model.panoptic import ModelConfig, PanopticModel, build_model, default_layers, tiny_cpu_config
from genpan.train.model.pretrained import load_dinov2_checkpoint
from genpan.train.model.vit import DinoVisionTransformer, vit_base, vit_custom, vit_giant2, vit_large, vit_small

__all__ = [
    "DinoV3VisionTransformer",
    "DinoVisionTransformer",
    "ModelConfig",
    "PanopticModel",
    "build_model",
    "default_layers",
    "dinov3_vitb16",
    "dinov3_vith16plus",
    "dinov3_vitl16",
    "dinov3_vits16",
    "load_dinov2_checkpoint",
    "load_dinov3_checkpoint",
    "load_dinov3_hf",
    "param_groups_layer_decay",
    "tiny_cpu_config",
    "vit_base",
    "vit_custom",
    "vit_giant2",
    "vit_large",
    "vit_small",
]
