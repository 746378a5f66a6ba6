"""Strict loading by key of the official DINOv2 checkpoints (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`) and of
any state dict (DINOv3: `train/model/dinov3.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


def state_dict_mismatches(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Every difference between a state dict and the model's own, one line each, named by key."""
    expected = model.state_dict()
    problems = [f"missing key {key}" for key in expected if key not in state]
    problems += [f"unexpected key {key}" for key in state if key not in expected]
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            problems.append(
                f"shape mismatch {key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}"
            )
    return problems


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a `.pth` file, read with `weights_only=True` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or non-torch file
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(state, Mapping) and len(state) == 1 and next(iter(state)) in ("model", "state_dict"):
        state = next(iter(state.values()))  # common wrapper around the plain state dict
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a state dict of tensors")
    return dict(state)


def load_dinov2_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Copy an official DINOv2 state dict into `model`; every missing/unexpected key and shape mismatch is named.

    Raises FileNotFoundError for a missing file and ValueError listing all mismatches (nothing is copied then).
    """
    load_state_dict_strictly(model, read_state_dict(path), str(path))


def load_state_dict_strictly(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Copy `state` into `model` only if it fits exactly; else ValueError naming `source` and every mismatch."""
    problems = state_dict_mismatches(model, state)
    if problems:
        raise ValueError(f"checkpoint {source} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        own = model.state_dict()
        for key, tensor in state.items():
            own[key].copy_(tensor)
