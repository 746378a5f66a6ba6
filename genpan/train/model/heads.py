"""Task-specific projection heads (paper 3.1, Fig. 1): a 1×1 convolution from the shared pixel embedding.

- sem:   C class logits (cross-entropy, paper 3.2);
- inst:  `inst_channels` values: 4L for the spectral centroid code of eq. 3 (16 for L = 4), 3 for the RGB
         centroid-regression ablation, 2·80 for the u/v classification ablation;
- depth: 1 channel through a sigmoid, disparity/depth in [0, 1] (paper 5.1, appendix A).
"""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """1×1 conv `in_channels` → `out_channels`, optionally followed by a sigmoid."""

    def __init__(self, in_channels: int, out_channels: int, sigmoid: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.sigmoid = sigmoid

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        return y.sigmoid() if self.sigmoid else y


def build_heads(width: int, num_classes: int, inst_channels: int, depth_head: bool) -> nn.ModuleDict:
    """The heads keyed by the model-output names `sem`, `inst` and (optional) `depth`."""
    heads = {"sem": ProjectionHead(width, num_classes), "inst": ProjectionHead(width, inst_channels)}
    if depth_head:
        heads["depth"] = ProjectionHead(width, 1, sigmoid=True)
    return nn.ModuleDict(heads)
