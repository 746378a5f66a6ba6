"""Collation: parsed samples → one padded CPU batch, every field a view of one buffer.

Images of a batch differ in size; each field is padded to the batch's largest height and width with its
void value (zero image, void labels) and every image keeps its true size. No CPU resize: the random
scale and crop happen on the training device in one `grid_sample` per batch (genpan/train/augment.py).
The image is stored HWC, as decoded, and handed out as a (B, 3, H, W) channels-last view: a CHW copy
cost more than the rest of the collate. Inside a DataLoader worker the buffer is shared memory (one of
the worker's reused buffers, genpan/train/data.py), so the batch reaches the trainer without another copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genpan.labels import IGNORE
from genpan.train.samples import ParsedSample, decode_into, parse_sample

Spec = dict[str, tuple[tuple[int, ...], torch.dtype, float]]  # field → (stored shape, dtype, void value)
Layout = dict[str, tuple[int, tuple[int, ...], torch.dtype]]  # field → (byte offset, stored shape, dtype)


def _sample_specs(depth: str, plane: tuple[int, ...]) -> Spec:
    """Field → (stored shape with `plane` = leading dims, dtype, void value) of the decoded maps."""
    specs = {
        "image": ((*plane, 3), torch.uint8, 0),
        "sem": (plane, torch.uint8, IGNORE),
        "ins": (plane, torch.int16, 0),
        "dist": (plane, torch.int16, 0),
    }
    if depth != "none":
        specs[depth] = (plane, torch.float32, 0)
        specs["depth_valid"] = (plane, torch.bool, False)
    return specs


def batch_specs(samples: list[ParsedSample]) -> Spec:
    """Field → (stored shape, dtype, padding value) of the padded batch of `samples`."""
    n = len(samples)
    plane = (n, max(s.height for s in samples), max(s.width for s in samples))
    depths = {s.depth for s in samples}
    if len(depths) > 1:
        raise ValueError(f"one batch mixes depth targets {sorted(depths)}")
    return {
        **_sample_specs(samples[0].depth, plane),
        "size": ((n, 2), torch.long, 0),
        "crowd": ((n, max(len(s.crowd) for s in samples)), torch.bool, False),
    }


def batch_layout(specs: Spec) -> tuple[Layout, int]:
    """(field → (byte offset, stored shape, dtype), total bytes): each field 64-byte aligned in one buffer."""
    layout, total = {}, 0
    for name, (shape, dtype, _) in specs.items():
        layout[name] = (total, shape, dtype)
        total += -(-math.prod(shape) * dtype.itemsize // 64) * 64
    return layout, total


def layout_views(buffer: Tensor, layout: Layout) -> dict[str, Tensor]:
    """The fields in their stored shapes as views of the uint8 `buffer` (one storage for the batch)."""
    return {
        name: buffer[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, (offset, shape, dtype) in layout.items()
    }


def _pad(dst: np.ndarray, h: int, w: int, fill: float) -> None:
    """Set everything of dst (H, W, ...) outside its top-left h×w to `fill` (the inside is decoded into)."""
    if h < dst.shape[0]:
        dst[h:] = fill
    if w < dst.shape[1]:
        dst[:h, w:] = fill


def _private_buffer(nbytes: int) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def collate(samples: list[ParsedSample], allocate: Callable[[int], Tensor] = _private_buffer) -> dict[str, Any]:
    """Decode and pad parsed samples into one batch: key (list), image (B, 3, H, W) uint8 channels-last,
    sem (B, H, W) uint8, ins and dist int16, size (B, 2) long, crowd (B, K) bool, and depth or disp with
    depth_valid when the samples carry them. `allocate(nbytes)` gives the uint8 buffer every field views."""
    specs = batch_specs(samples)
    layout, total = batch_layout(specs)
    views = layout_views(allocate(total), layout)
    arrays = {name: view.numpy() for name, view in views.items()}
    maps = [name for name in specs if name not in ("size", "crowd")]
    for i, s in enumerate(samples):
        h, w = s.height, s.width
        arrays["size"][i] = (h, w)
        decode_into(s, {name: arrays[name][i, :h, :w] for name in maps})
        for name in maps:
            _pad(arrays[name][i], h, w, specs[name][2])
        crowd = arrays["crowd"][i]
        crowd[: len(s.crowd)] = s.crowd
        crowd[len(s.crowd) :] = False
    return {"key": [s.key for s in samples], **views, "image": views["image"].permute(0, 3, 1, 2)}


def decode_sample(raw: dict[str, Any], depth: str = "none") -> dict[str, Any]:
    """Raw tar members of one sample → numpy arrays: image (H, W, 3) RGB uint8, sem, ins, dist, crowd flags
    (and depth/disp + depth_valid); the loader itself decodes straight into its batches (`collate`)."""
    sample = parse_sample(raw, depth)
    specs = _sample_specs(depth, (sample.height, sample.width))
    out = {name: torch.empty(shape, dtype=dtype).numpy() for name, (shape, dtype, _) in specs.items()}
    decode_into(sample, out)
    return {"key": sample.key, **out, "crowd": sample.crowd}
