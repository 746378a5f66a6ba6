"""Shared shallow decoder (paper 3.1, 5.1): patch features (B, 4e, H/p, W/p) → pixel embedding (B, d, 8H/p, 8W/p).

p is the backbone's patch: 14 for DINOv2 (output 8·H/14, paper 5.1), 16 for DINOv3 (output 8·H/16 = H/2).
For DINOv3 the same three ×2 stages are kept rather than matched to 8/14 of the input: a ratio of 4/7 from
a 1/16 grid would need a fractional resize, and each patch still expands to 8 × 8 output pixels, so the decoder
and heads see the same work per token and its weights keep their meaning. At the recipes' sizes (1024 px for
1008) the DINOv3 output is 512 px against DINOv2's 576: about 11 % coarser per side.

Three stride-2 transposed convolutions (each ×2) and one 3×3 convolution, with GroupNorm + GELU after each
transposed convolution. The paper names neither norm nor activation; GroupNorm is chosen because it does not
depend on the batch: the same numbers at batch 1 per GPU, in eval and in training, and no SyncBatchNorm under
DDP/FSDP. GELU matches the backbone. The last convolution stays linear: the task heads are projections of it.

Option `coord_harmonics` > 0 concatenates the pixel coordinates' sin-cos features (γ of paper eq. 3, the
same basis as the instance target) to the input of every stage. A pretrained DINOv2 already encodes absolute
position; a ViT trained from scratch with a learned pos_embed does not, and its instance head collapses
toward the void code (measured: things PQ 0 without, 49 with sin-cos pos_embed + these features, ViT 192/6).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from genpan.labels import pe_encode


def coordinate_features(h: int, w: int, num_harmonics: int, device=None, dtype=torch.float32) -> Tensor:
    """(1, 4L, h, w): γ(u) (2L channels, constant along rows) then γ(v), pixel centres u = 2(x+0.5)/w − 1."""
    u = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) * 2 / w - 1
    v = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) * 2 / h - 1
    gu = pe_encode(u, num_harmonics).T[:, None, :].expand(-1, h, w)  # 2L h w
    gv = pe_encode(v, num_harmonics).T[:, :, None].expand(-1, h, w)
    return torch.cat([gu, gv], dim=0)[None].to(dtype)


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest group count ≤ 32 dividing the channels (32 for the default width 256)."""
    return math.gcd(channels, max_groups)


class SharedDecoder(nn.Module):
    """Upsample ×8 with 3 transposed convs (kernel `kernel_size`, stride 2) + 1 conv 3×3; width `width`.

    kernel_size 4 (padding 1) lets neighbouring patches overlap, so the 8×8 pixels of one patch are not
    a function of that patch alone; kernel_size 2 is the non-overlapping variant.
    """

    def __init__(self, in_channels: int, width: int = 256, kernel_size: int = 4, coord_harmonics: int = 0) -> None:
        super().__init__()
        if kernel_size < 2 or kernel_size % 2:
            raise ValueError(f"decoder kernel_size must be an even number >= 2, got {kernel_size}")
        self.coord_harmonics = coord_harmonics
        extra = 4 * coord_harmonics
        padding = (kernel_size - 2) // 2  # output exactly 2× the input
        self.up = nn.ModuleList()
        for stage in range(3):
            stage_in = (in_channels if stage == 0 else width) + extra
            self.up.append(
                nn.Sequential(
                    nn.ConvTranspose2d(stage_in, width, kernel_size, stride=2, padding=padding),
                    nn.GroupNorm(group_count(width), width),
                    nn.GELU(),
                )
            )
        self.out = nn.Conv2d(width + extra, width, kernel_size=3, padding=1)

    def _with_coords(self, x: Tensor) -> Tensor:
        if not self.coord_harmonics:
            return x
        coords = coordinate_features(x.shape[2], x.shape[3], self.coord_harmonics, x.device, x.dtype)
        return torch.cat([x, coords.expand(x.shape[0], -1, -1, -1)], dim=1)

    def forward(self, z: Tensor) -> Tensor:
        x = z  # B 4e H/14 W/14
        for stage in self.up:
            x = stage(self._with_coords(x))
        return self.out(self._with_coords(x))  # B d 8H/14 8W/14
