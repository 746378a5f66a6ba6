"""AdamW parameter groups with layer-wise learning-rate decay over the ViT blocks (BEiT/MAE convention).

With depth D and decay r, a parameter at layer id ℓ gets lr · r^(D + 1 − ℓ), where
ℓ = 0 for the embeddings (patch_embed, cls/register (DINOv3: storage)/mask tokens, pos_embed), ℓ = i + 1 for block i (0-based),
ℓ = D + 1 for the backbone's final norm, the decoder and the heads (full lr).
Paper 5.1: the backbone is fine-tuned, "layer decay to suppress the learning rate for the earlier layers"
(0.6 in the authors' follow-up recipe).
"""

from __future__ import annotations

from torch import nn

EMBEDDING_NAMES = ("patch_embed", "cls_token", "pos_embed", "register_tokens", "storage_tokens", "mask_token")
NO_DECAY_NAMES = ("pos_embed", "cls_token", "register_tokens", "storage_tokens", "mask_token")


def backbone_layer_id(name: str, depth: int) -> int:
    """Layer id of a parameter name relative to the backbone (e.g. "blocks.3.attn.qkv.weight" → 4)."""
    first = name.split(".")[0]
    if first in EMBEDDING_NAMES:
        return 0
    if first == "blocks":
        return int(name.split(".")[1]) + 1
    return depth + 1


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """No decay on norms, biases and LayerScale gammas (all 1-D) nor on position/class/register tokens."""
    return param.ndim > 1 and name.split(".")[-1] not in NO_DECAY_NAMES


def param_groups_layer_decay(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Groups for `torch.optim.AdamW(groups)`: keys params, lr, lr_scale, weight_decay, name.

    `model` is a PanopticModel (backbone at `model.backbone`) or a bare DinoVisionTransformer. A scheduler
    should set each group's lr to scheduled_lr · group["lr_scale"].
    """
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    depth = len(backbone.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if prefix and not name.startswith(prefix):
            layer = depth + 1
        else:
            layer = backbone_layer_id(name[len(prefix) :], depth)
        decay = uses_weight_decay(name, param)
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {
                "params": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"layer{layer}_{'decay' if decay else 'no_decay'}",
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]
