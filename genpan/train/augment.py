"""On-device augmentation: random scale + crop + horizontal flip of a padded batch, and the loss targets.

One affine map per image takes output pixels to source pixels; `F.grid_sample` applies it to the image
(bilinear), the depth (bilinear) and the label maps (nearest) in one batched call each, so images of
different sizes and different random scales share one kernel launch and no Python loop runs per image.
Conventions (genpan/labels.py): pixel centres at x + 0.5, centroid u = 2(x + 0.5)/w − 1 from columns.

For output pixel column j (edge coordinates, j + 0.5 at its centre) of an output W pixels wide:
    scaled x  = j + 0.5 + offset_x               (offset: the crop window's left edge in the scaled image)
    source x  = scaled x / f                     (f = total resize factor, source → output)
    flipped   = w_img − source x
The label maps are sampled directly at the loss resolution h = 8·H/p (p the backbone's patch) with the same map (pixel j of the
loss grid sits at output edge coordinate (j + 0.5)·W/w), so no second resize is needed.

A crop does not change a boundary distance; a resize by f scales it by f, and the loss grid by w/W
more: d_loss = d_source · f · w/W (shard contract, EDS eq. 5 uses D in loss-resolution pixels).
Regions outside the source image are void: sem 255, ins 0, dist = `pad_dist`, depth invalid.

Centroids (paper eq. 2) are recomputed on the cropped, flipped instance map at the loss resolution by a
scatter mean over (image, instance index), then gathered back to every pixel of the instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from genpan.labels import DIST_SCALE, IGNORE

LOSS_STRIDE_NUM = 8  # the model's output is 8·H/p: 8·H/14 for DINOv2 (paper 5.1), H/2 for DINOv3 (p = 16)
DEFAULT_PATCH = 14


@dataclass(frozen=True)
class AugmentParams:
    """Per-batch random draws: total resize factor, crop offset (scaled-image px) and flip, each (B,)."""

    factor: Tensor
    offset_x: Tensor
    offset_y: Tensor
    flip: Tensor


def loss_size(height: int, width: int, patch_size: int = DEFAULT_PATCH) -> tuple[int, int]:
    return height * LOSS_STRIDE_NUM // patch_size, width * LOSS_STRIDE_NUM // patch_size


def draw_params(
    sizes: Tensor,
    out_hw: tuple[int, int],
    scale_range: tuple[float, float],
    flip_prob: float,
    generator: torch.Generator,
) -> AugmentParams:
    """Random scale, crop window and flip for images of `sizes` (B, 2) = (h, w) on the CPU generator.

    The base factor makes the image just cover the output (max of the two ratios); a scale s drawn
    uniformly from `scale_range` multiplies it. The crop offset is uniform over every window position;
    when the scaled image is smaller than the output the image lands at a uniform position inside it.
    """
    sizes = sizes.to(torch.float64)
    out_h, out_w = out_hw
    batch = sizes.shape[0]
    base = torch.maximum(out_h / sizes[:, 0], out_w / sizes[:, 1])
    lo, hi = scale_range
    s = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
    factor = base * s
    slack_y = sizes[:, 0] * factor - out_h  # > 0: room to move the window; < 0: room to move the image
    slack_x = sizes[:, 1] * factor - out_w
    ry = torch.rand(batch, generator=generator, dtype=torch.float64)
    rx = torch.rand(batch, generator=generator, dtype=torch.float64)
    offset_y = torch.minimum(slack_y, torch.zeros_like(slack_y)) + ry * slack_y.abs()
    offset_x = torch.minimum(slack_x, torch.zeros_like(slack_x)) + rx * slack_x.abs()
    flip = torch.rand(batch, generator=generator, dtype=torch.float64) < flip_prob
    return AugmentParams(factor, offset_x, offset_y, flip)


def identity_params(sizes: Tensor) -> AugmentParams:
    """No resize, no crop offset, no flip (evaluation at native size)."""
    batch = sizes.shape[0]
    zeros = torch.zeros(batch, dtype=torch.float64)
    return AugmentParams(torch.ones(batch, dtype=torch.float64), zeros, zeros.clone(), torch.zeros(batch, dtype=torch.bool))


def sampling_grid(
    params: AugmentParams, sizes: Tensor, canvas_hw: tuple[int, int], out_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> Tensor:
    """(B, gh, gw, 2) grid_sample coordinates (align_corners=False) into the padded canvas.

    `out_hw` is the augmented image size, `grid_hw` the resolution sampled (out_hw itself or the loss grid).
    """
    sizes = sizes.to(torch.float64)
    canvas_h, canvas_w = canvas_hw
    out_h, out_w = out_hw
    gh, gw = grid_hw
    cols = (torch.arange(gw, dtype=torch.float64) + 0.5) * (out_w / gw)  # output edge coordinates
    rows = (torch.arange(gh, dtype=torch.float64) + 0.5) * (out_h / gh)
    src_x = (cols[None, :] + params.offset_x[:, None]) / params.factor[:, None]  # (B, gw)
    src_y = (rows[None, :] + params.offset_y[:, None]) / params.factor[:, None]  # (B, gh)
    src_x = torch.where(params.flip[:, None], sizes[:, 1:2] - src_x, src_x)
    gx = 2.0 * src_x / canvas_w - 1.0
    gy = 2.0 * src_y / canvas_h - 1.0
    return torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1).to(torch.float32)


def instance_centroids(ins: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel centroid (u, v) in [-1, 1] of each pixel's instance in `ins` (B, h, w) long; 0 where ins = 0.

    Scatter mean over the flat index b·K + ins (K = max index + 1): sums of pixel-centre coordinates
    and counts in one `index_add_` each, gathered back per pixel.
    """
    batch, h, w = ins.shape
    device = ins.device
    k = int(ins.max().item()) + 1 if ins.numel() else 1
    flat = (ins + torch.arange(batch, device=device)[:, None, None] * k).reshape(-1)
    u_pix = (2.0 * (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w - 1.0).expand(batch, h, w)
    v_pix = (2.0 * (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h - 1.0)[:, None].expand(batch, h, w)
    count = torch.zeros(batch * k, device=device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    sum_u = torch.zeros(batch * k, device=device).index_add_(0, flat, u_pix.reshape(-1))
    sum_v = torch.zeros(batch * k, device=device).index_add_(0, flat, v_pix.reshape(-1))
    denom = count.clamp_min(1.0)
    thing = ins > 0
    u = torch.where(thing, (sum_u / denom)[flat].view(batch, h, w), 0.0)
    v = torch.where(thing, (sum_v / denom)[flat].view(batch, h, w), 0.0)
    return u, v


def canvas_mask(sizes: Tensor, canvas_hw: tuple[int, int]) -> Tensor:
    """(B, 1, Hc, Wc) float: 1 inside each image's own (h, w), 0 on the padding the collate added."""
    rows = torch.arange(canvas_hw[0], device=sizes.device)
    cols = torch.arange(canvas_hw[1], device=sizes.device)
    mask = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
    return mask[:, None].float()


def _nearest(maps: Tensor, grid: Tensor) -> Tensor:
    return F.grid_sample(maps, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def augment_batch(
    batch: dict[str, Tensor],
    out_hw: tuple[int, int],
    params: AugmentParams,
    pad_value: tuple[float, float, float],
    pad_dist: float,
    patch_size: int = DEFAULT_PATCH,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Apply `params` to a collated batch already on the training device.

    batch: image (B, 3, Hc, Wc) uint8, sem (B, Hc, Wc) uint8, ins (B, Hc, Wc) int16, dist (B, Hc, Wc) int16
    (dist.zst units), size (B, 2) long, crowd (B, K) bool (crowd flag per instance index, 0 = none),
    optional depth / disp (B, Hc, Wc) float with depth_valid (B, Hc, Wc) bool.
    Returns the images (B, 3, H, W) float in [0, 1] and the loss targets at h = 8·H/p (genpan/train/losses.py names).
    """
    device = batch["image"].device
    canvas_hw = tuple(batch["image"].shape[-2:])
    sizes = batch["size"].cpu()
    out_h, out_w = out_hw
    h, w = loss_size(out_h, out_w, patch_size)

    img_grid = sampling_grid(params, sizes, canvas_hw, out_hw, out_hw).to(device)
    image = batch["image"].float() / 255.0
    in_image = canvas_mask(sizes.to(device), canvas_hw)  # B 1 Hc Wc: 1 on each image, 0 on its padding
    sampled = F.grid_sample(torch.cat([image, in_image], 1), img_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    pad = torch.tensor(pad_value, device=device, dtype=sampled.dtype).view(1, 3, 1, 1)
    inside = sampled[:, 3:4]
    # at the image edge bilinear mixes image and zeros: complete the missing weight with the pad colour
    images = (sampled[:, :3] + (1.0 - inside) * pad).clamp(0.0, 1.0)

    loss_grid = sampling_grid(params, sizes, canvas_hw, out_hw, (h, w)).to(device)
    labels = torch.stack(
        [batch["sem"].float(), batch["ins"].float(), batch["dist"].float(), in_image[:, 0]], 1
    )
    lab = _nearest(labels, loss_grid)  # B 4 h w
    inside = lab[:, 3] > 0.5
    sem = torch.where(inside, lab[:, 0].round().long(), IGNORE)
    ins = torch.where(inside, lab[:, 1].round().long(), 0)
    dist_scale = (params.factor * (w / out_w)).to(device=device, dtype=torch.float32)[:, None, None]
    dist = torch.where(inside, lab[:, 2] / DIST_SCALE * dist_scale, pad_dist)

    u, v = instance_centroids(ins)
    crowd = batch["crowd"]
    crowd_px = torch.gather(crowd, 1, ins.clamp_max(crowd.shape[1] - 1).reshape(ins.shape[0], -1)).view_as(ins) & (ins > 0)
    targets = {
        "sem": sem,
        "ins": ins,
        "dist": dist,
        "u": u,
        "v": v,
        "valid": (ins > 0) & ~crowd_px,
        "ignore": crowd_px,
        "crowd": crowd,  # (B, K): K = one more than the largest instance index, known on the host
    }
    for key in ("depth", "disp"):
        if key in batch:
            stack = torch.stack([batch[key].float(), batch["depth_valid"].float()], 1)
            out = F.grid_sample(stack, loss_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            targets[key] = out[:, 0]
            # a bilinear value is only trusted where all four neighbours carried a label
            targets["depth_valid"] = out[:, 1] > 0.999
    return images, targets


class DeviceAugmenter:
    """Random scale + crop + flip on the training device, drawn from its own seeded CPU generator.

    The generator's state goes into checkpoints, so a resumed run draws the same augmentations.
    `train=False` keeps every image at scale 1 with no offset and no flip (its top-left H×W window).
    """

    def __init__(
        self,
        out_hw: tuple[int, int],
        scale_range: tuple[float, float],
        flip_prob: float,
        seed: int,
        pad_value: tuple[float, float, float],
        pad_dist: float,
        train: bool = True,
        patch_size: int = DEFAULT_PATCH,
    ) -> None:
        self.out_hw, self.scale_range, self.flip_prob = out_hw, scale_range, flip_prob
        self.patch_size = patch_size
        self.pad_value, self.pad_dist, self.train = pad_value, pad_dist, train
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        sizes = batch["size"].cpu()
        if self.train:
            params = draw_params(sizes, self.out_hw, self.scale_range, self.flip_prob, self.generator)
        else:
            params = identity_params(sizes)
        return augment_batch(batch, self.out_hw, params, self.pad_value, self.pad_dist, self.patch_size)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
