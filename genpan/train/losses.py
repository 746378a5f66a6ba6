"""The paper's losses, PyTorch reference path (eq. 1–14): these functions define the numbers.

Every tensor is at loss resolution h × w (the model's output size), batch B:

    outputs["sem"]    (B, C, h, w)  logits
    outputs["inst"]   (B, K, h, w)  K = 4L ("pe"), 3 ("rgb") or 2·uv_bins ("uvcls")
    outputs["depth"]  (B, 1, h, w)  sigmoid output in [0, 1]

    targets["sem"]    (B, h, w) long   train id, 255 = ignore
    targets["dist"]   (B, h, w) float  distance to the nearest segment boundary, in loss-resolution px
    targets["u"], ["v"] (B, h, w) float  centroid of the pixel's instance in [-1, 1] (any finite value elsewhere)
    targets["valid"]  (B, h, w) bool   pixel of a labelled (non-crowd) thing instance
    targets["ignore"] (B, h, w) bool   crowd pixel: takes no part in any instance loss
    targets["ins"]    (B, h, w) long   instance index, 0 = none (only DICE reads it)
    targets["disp"]   (B, h, w) float  disparity in [0, 1] (depth_loss = "affine")
    targets["depth"]  (B, h, w) float  metric depth in metres (depth_loss = "silog")
    targets["depth_valid"] (B, h, w) bool, optional: pixels with a depth label (default: target > 0)

Choices the paper leaves open, fixed here:
- Eq. 1 is applied to the whole batch at once: Σ over all pixels of all images of w·L over Σ w.
  An empty denominator gives 0 (still attached to the graph).
- TV terms (eq. 10, 11) are unweighted and global (every pixel, void and crowd included), averaged
  over all vertical and horizontal neighbour pairs of the batch: Σ_pairs term / (#vertical + #horizontal).
- Instance PE loss: void pixels have target 0 and count; crowd pixels get weight 0 (identity unknown).
- DICE (eq. 12–14) is computed per image over its labelled instances and the image's non-crowd pixels,
  then averaged over the images that have at least one labelled instance.
- "rgb" baseline: per-pixel L1 norm Σ_c |Δ_c| of the 3-vector; its TV uses the same L1 norm.
- "uvcls" baseline: ½(CE_u + CE_v) on labelled instance pixels only (void and crowd ignored: CE has no
  void class); TV is eq. 11 on the u and on the v distribution, averaged.
- Depth losses are per image on its labelled pixels, averaged over the images that have any.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genpan.labels import IGNORE, eds_weight, pe_encode, pe_target

INST_ENCODINGS = ("pe", "rgb", "uvcls")
DEPTH_LOSSES = ("affine", "silog")
BACKENDS = ("auto", "torch", "triton")


@dataclass
class LossConfig:
    """Weights and options of the paper's losses (the paper gives no TV/DICE weights: 1.0 by default)."""

    sem_weight: float = 1.0
    inst_weight: float = 1.0
    depth_weight: float = 1.0
    sem_tv_weight: float = 1.0
    inst_tv_weight: float = 1.0
    dice_weight: float = 1.0
    D: float = 20.0  # EDS decay (eq. 5), in loss-resolution pixels
    wmin: float = 0.0  # EDS floor weight (eq. 5)
    num_harmonics: int = 4  # L of eq. 3
    inst_encoding: str = "pe"  # "pe" | "rgb" | "uvcls" (appendix C)
    uv_bins: int = 80
    depth_loss: str = "affine"  # "affine" (eq. 6-8) | "silog" (eq. 9)
    silog_lambda: float = 0.5
    max_depth: float = 10.0  # metres; silog reads the sigmoid output as depth / max_depth
    backend: str = "auto"  # "auto": Triton kernels for CUDA tensors, reference otherwise

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("inst_encoding", self.inst_encoding, INST_ENCODINGS),
            ("depth_loss", self.depth_loss, DEPTH_LOSSES),
            ("backend", self.backend, BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"loss option {name}={value!r} is not one of {', '.join(allowed)}")
        if self.D <= 0:
            raise ValueError(f"loss option D must be positive, got {self.D}")
        if not 0.0 <= self.wmin <= 1.0:
            raise ValueError(f"loss option wmin must lie in [0, 1], got {self.wmin}")
        if self.num_harmonics < 1 or self.uv_bins < 2:
            raise ValueError("loss options need num_harmonics >= 1 and uv_bins >= 2")


# ---------------------------------------------------------------- shared pieces


def _compute_dtype(x: Tensor) -> torch.dtype:
    """bf16/fp16 predictions are upcast to fp32; fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def weighted_mean(per_pixel: Tensor, weight: Tensor) -> Tensor:
    """Eq. 1: Σ w·L / Σ w over every pixel given; 0 when Σ w = 0."""
    den = weight.sum()
    return (weight * per_pixel).sum() / den.clamp_min(torch.finfo(den.dtype).tiny)


def _pair_tv(per_vertical: Tensor, per_horizontal: Tensor) -> Tensor:
    """Mean of a neighbour-pair term over all vertical and horizontal pairs (0 when there are none)."""
    count = per_vertical.numel() + per_horizontal.numel()
    return (per_vertical.sum() + per_horizontal.sum()) / max(count, 1)


def norm_tv(pred: Tensor, ord: float = 2.0) -> Tensor:
    """TV of eq. 10: ‖y_ij − y_i+1,j‖ and ‖y_ij − y_i,j+1‖ (norm over channels), mean over pairs."""
    pred = pred.to(_compute_dtype(pred))
    vertical = torch.linalg.vector_norm(pred[:, :, 1:, :] - pred[:, :, :-1, :], ord=ord, dim=1)
    horizontal = torch.linalg.vector_norm(pred[:, :, :, 1:] - pred[:, :, :, :-1], ord=ord, dim=1)
    return _pair_tv(vertical, horizontal)


def prob_tv(logits: Tensor) -> Tensor:
    """TV on probabilities (eq. 11): H(P_ij, P_i+1,j) and H(P_ij, P_i,j+1), H(a, b) = −Σ a log b."""
    logp = F.log_softmax(logits.to(_compute_dtype(logits)), dim=1)
    p = logp.exp()
    vertical = -(p[:, :, :-1, :] * logp[:, :, 1:, :]).sum(1)
    horizontal = -(p[:, :, :, :-1] * logp[:, :, :, 1:]).sum(1)
    return _pair_tv(vertical, horizontal)


# ---------------------------------------------------------------- semantic


def sem_ce_tv(logits: Tensor, labels: Tensor, dist: Tensor, D: float, wmin: float) -> tuple[Tensor, Tensor]:
    """Semantic loss terms: EDS-weighted CE normalised as eq. 1 (eq. 5 weights, ignore 255) and TV (eq. 11).

    logits (B, C, h, w); labels (B, h, w) long; dist (B, h, w) boundary distance in px.
    Returns (ce, tv).
    """
    x = logits.to(_compute_dtype(logits))
    keep = labels != IGNORE
    ce = F.cross_entropy(x, torch.where(keep, labels, 0), reduction="none")
    weight = eds_weight(dist.to(x.dtype), D, wmin) * keep
    return weighted_mean(ce, weight), prob_tv(x)


# ---------------------------------------------------------------- instance, PE encoding


def _pe_weight(dist: Tensor, ignore: Tensor, D: float, wmin: float, dtype: torch.dtype) -> Tensor:
    return eds_weight(dist.to(dtype), D, wmin) * ~ignore


def pe_loss(pred: Tensor, u: Tensor, v: Tensor, valid: Tensor, weight: Tensor, num_harmonics: int) -> Tensor:
    """PE centroid loss (eq. 2-4) normalised as eq. 1.

    Per pixel ½(‖Δ_[1:2L]‖₂ + ‖Δ_[2L+1:4L]‖₂) with Δ = target − pred, target concat(γ(u), γ(v)) on
    `valid` pixels and 0 (void) elsewhere; `weight` (B, h, w) is the per-pixel EDS weight (0 on crowd).
    """
    x = pred.to(_compute_dtype(pred))
    half = 2 * num_harmonics
    if x.shape[1] != 2 * half:
        raise ValueError(f"instance prediction has {x.shape[1]} channels, PE with L={num_harmonics} needs {2 * half}")
    target = pe_target(u.to(x.dtype), v.to(x.dtype), valid, num_harmonics).permute(0, 3, 1, 2)
    diff = x - target
    per_pixel = 0.5 * (
        torch.linalg.vector_norm(diff[:, :half], dim=1) + torch.linalg.vector_norm(diff[:, half:], dim=1)
    )
    return weighted_mean(per_pixel, weight.to(x.dtype))


def inst_pe_tv(
    pred: Tensor,
    u: Tensor,
    v: Tensor,
    valid: Tensor,
    ignore: Tensor,
    dist: Tensor,
    num_harmonics: int,
    D: float,
    wmin: float,
) -> tuple[Tensor, Tensor]:
    """Instance PE terms: EDS-weighted PE loss (eq. 1-5, crowd weight 0) and euclidean TV (eq. 10).

    This is the signature the fused Triton kernel reproduces. Returns (pe, tv).
    """
    weight = _pe_weight(dist, ignore, D, wmin, _compute_dtype(pred))
    return pe_loss(pred, u, v, valid, weight, num_harmonics), norm_tv(pred, 2.0)


def dice_loss(pred: Tensor, u: Tensor, v: Tensor, valid: Tensor, ignore: Tensor, ins: Tensor, num_harmonics: int,
              num_instances: int | None = None) -> Tensor:
    """Generalised DICE (eq. 12-14) with w_l = 1/area_l over each image's labelled instances.

    p_l,ij = exp(−(d^x)²)·exp(−(d^y)²), d^x/d^y the euclidean distances between pixel ij's predicted
    u/v halves and instance l's code; r_l,ij = 1 on instance l. Pixels: all non-crowd pixels of the
    image (void included, so void predicted like an instance is penalised). Mean over images with instances.

    The whole batch at once, with no host synchronisation: instance index k of image b is slot (b, k) of
    a (B, K) table (K = `num_instances`, one more than the largest index: the width of the batch's crowd
    table; computed from `ins` when not given). Slots without labelled pixels have area 0 and weight 0.
    Squared distances come from ‖a − b‖² = ‖a‖² + ‖b‖² − 2a·b as one batched matrix product.
    """
    x = pred.to(_compute_dtype(pred))
    B, C = x.shape[:2]
    half = 2 * num_harmonics
    K = int(ins.max()) + 1 if num_instances is None else int(num_instances)
    keep = ~ignore.reshape(B, -1)
    labelled = (valid & (ins > 0)).reshape(B, -1) & keep
    slot = ins.reshape(B, -1).long().clamp(0, K - 1)
    lab = labelled.to(x.dtype)
    area = torch.zeros(B, K, dtype=x.dtype, device=x.device).scatter_add_(1, slot, lab)
    safe_area = area.clamp_min(1.0)
    # every pixel of an instance carries the same (u, v): the mean recovers it
    u_l = torch.zeros_like(area).scatter_add_(1, slot, u.reshape(B, -1).to(x.dtype) * lab) / safe_area
    v_l = torch.zeros_like(area).scatter_add_(1, slot, v.reshape(B, -1).to(x.dtype) * lab) / safe_area
    pix = x.reshape(B, C, -1)
    sq_dist = _sq_dist_batched(pe_encode(u_l, num_harmonics), pix[:, :half]) + _sq_dist_batched(pe_encode(v_l, num_harmonics), pix[:, half:])
    p = torch.exp(-sq_dist) * keep.to(x.dtype)[:, None, :]  # (B, K, P), crowd pixels out
    present = area > 0
    w_l = torch.where(present, 1.0 / safe_area, torch.zeros_like(area))
    own = torch.gather(p, 1, slot[:, None, :]).squeeze(1)  # p of each pixel under its own instance
    intersection = (torch.gather(w_l, 1, slot) * own * lab).sum(1)
    union = (w_l * area).sum(1) + (w_l[:, :, None] * p).sum((1, 2))
    has = present.any(1)
    per_image = torch.where(has, 1.0 - 2.0 * intersection / union.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(union))
    return per_image.sum() / has.sum().clamp_min(1).to(x.dtype)


def _sq_dist_batched(codes: Tensor, pix: Tensor) -> Tensor:
    """‖code_bl − pix_bj‖² for codes (B, n, k) and pixel vectors (B, k, P) → (B, n, P), clamped at 0."""
    sq = (codes * codes).sum(2)[:, :, None] + (pix * pix).sum(1)[:, None, :] - 2.0 * torch.bmm(codes, pix)
    return sq.clamp_min(0.0)


# ---------------------------------------------------------------- instance, appendix C baselines


def rgb_target(u: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """Direct centroid regression target (appendix C): (u01, v01, 1) on instances, (0, 0, 0) on void."""
    code = torch.stack([(u + 1.0) * 0.5, (v + 1.0) * 0.5, torch.ones_like(u)], dim=1)
    return code * valid[:, None].to(code.dtype)


def rgb_loss(pred: Tensor, u: Tensor, v: Tensor, valid: Tensor, weight: Tensor) -> Tensor:
    """RGB baseline: per-pixel L1 norm Σ_c |pred − target| with EDS weights, normalised as eq. 1."""
    x = pred.to(_compute_dtype(pred))
    per_pixel = (x - rgb_target(u.to(x.dtype), v.to(x.dtype), valid)).abs().sum(1)
    return weighted_mean(per_pixel, weight.to(x.dtype))


def uv_bins_of(c: Tensor, bins: int) -> Tensor:
    """Bin index of a coordinate in [-1, 1] on a grid of `bins` equal cells (1 falls in the last)."""
    return ((c + 1.0) * 0.5 * bins).floor().long().clamp(0, bins - 1)


def uvcls_loss(pred: Tensor, u: Tensor, v: Tensor, valid: Tensor, weight: Tensor, bins: int) -> Tensor:
    """u/v classification baseline (appendix C): ½(CE over u bins + CE over v bins) on instance pixels.

    pred (B, 2·bins, h, w): u logits then v logits. Void pixels take no part (CE has no void class);
    `weight` is the EDS weight (0 on crowd), normalised as eq. 1.
    """
    x = pred.to(_compute_dtype(pred))
    if x.shape[1] != 2 * bins:
        raise ValueError(f"instance prediction has {x.shape[1]} channels, uvcls with {bins} bins needs {2 * bins}")
    ce_u = F.cross_entropy(x[:, :bins], uv_bins_of(u, bins), reduction="none")
    ce_v = F.cross_entropy(x[:, bins:], uv_bins_of(v, bins), reduction="none")
    return weighted_mean(0.5 * (ce_u + ce_v), weight.to(x.dtype) * valid)


def uvcls_tv(pred: Tensor, bins: int) -> Tensor:
    """Eq. 11 on the u distribution and on the v distribution, averaged."""
    return 0.5 * (prob_tv(pred[:, :bins]) + prob_tv(pred[:, bins:]))


# ---------------------------------------------------------------- depth


def _shift_scale_normalise(d: Tensor) -> Tensor:
    """Eq. 7-8: (d − median(d)) / mean|d − median(d)| (scale floored to avoid 0/0 on flat maps)."""
    t = d.median()
    s = (d - t).abs().mean().clamp_min(1e-6)
    return (d - t) / s


def affine_invariant_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Affine-invariant disparity loss (eq. 6-8), per image on its valid pixels, mean over images.

    torch.median takes the lower of the two middle values for an even count.
    """
    x = pred.to(_compute_dtype(pred))
    per_image = []
    for b in range(x.shape[0]):
        m = valid[b]
        if not bool(m.any()):
            continue
        d_hat = _shift_scale_normalise(x[b][m])
        d_star = _shift_scale_normalise(target[b][m].to(x.dtype))
        per_image.append((d_star - d_hat).abs().mean())
    return torch.stack(per_image).mean() if per_image else x.sum() * 0.0


def silog_loss(pred_depth: Tensor, target_depth: Tensor, valid: Tensor, lam: float = 0.5) -> Tensor:
    """Scale-invariant log loss (eq. 9): mean d² − λ(mean d)², d = log y − log y*, per image, mean over images.

    Pixels need valid and target > 0; the prediction is floored at 1e-6 m before the log.
    """
    x = pred_depth.to(_compute_dtype(pred_depth))
    per_image = []
    for b in range(x.shape[0]):
        m = valid[b] & (target_depth[b] > 0)
        if not bool(m.any()):
            continue
        d = torch.log(x[b][m].clamp_min(1e-6)) - torch.log(target_depth[b][m].to(x.dtype))
        per_image.append((d * d).mean() - lam * d.mean() ** 2)
    return torch.stack(per_image).mean() if per_image else x.sum() * 0.0


# ---------------------------------------------------------------- combiner


def _use_kernels(backend: str, x: Tensor) -> bool:
    """backend "auto": the kernels for CUDA fp32/bf16 predictions that passed their self-check on this
    device and dtype, the reference for anything else; "triton": the kernels, a failed check an error."""
    if backend == "torch":
        return False
    if backend == "auto" and not (x.is_cuda and x.dtype in (torch.float32, torch.bfloat16)):
        return False
    return kernels_pass_self_check(x.device, x.dtype, strict=backend == "triton")


_self_check_results: dict[tuple[str, torch.dtype], str | None] = {}


def kernels_pass_self_check(device: torch.device, dtype: torch.dtype, strict: bool = False,
                            check: Callable[[torch.device, torch.dtype], str | None] | None = None) -> bool:
    """Whether the fused kernels may run on (device, dtype): checked once per pair against the reference
    (genpan/kernels/selfcheck.py). A failure prints one warning line and falls back to the reference, or
    raises when `strict` (`loss.backend = "triton"`). `check` replaces the real check (tests)."""
    key = (str(device), dtype)
    if key not in _self_check_results:
        if check is None:
            from genpan.kernels.selfcheck import check_kernels as check
        _self_check_results[key] = check(device, dtype)
        if _self_check_results[key] is not None and not strict:
            print(f"warning: the fused loss kernels failed their self-check on {device} {dtype}; using the PyTorch "
                  f"reference instead ({_self_check_results[key]})", file=sys.stderr, flush=True)
    reason = _self_check_results[key]
    if reason is not None and strict:
        raise RuntimeError(f"loss.backend = 'triton' but the fused kernels failed their self-check on {device} {dtype}: {reason}")
    return reason is None


def _check_shape(name: str, pred: Tensor, target: Tensor) -> None:
    if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"loss: output {name!r} has shape {tuple(pred.shape)} but its targets are {tuple(target.shape)}"
            " (expected (B, ·, h, w) against (B, h, w))"
        )


def _need(targets: dict[str, Any], keys: tuple[str, ...], task: str) -> None:
    missing = [k for k in keys if k not in targets]
    if missing:
        raise ValueError(f"loss: task {task!r} needs targets {', '.join(missing)}")


def compute_losses(outputs: dict[str, Tensor], targets: dict[str, Tensor], cfg: LossConfig,
                   tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Every loss term of the tasks present in both outputs and targets, plus `total`.

    `tasks` (the config's): each listed task must have its output and its targets, else ValueError naming
    the task and the missing field — a loss term is never dropped silently.

    total = sem_weight·(sem_ce + sem_tv_weight·sem_tv)
          + inst_weight·(inst_main + inst_tv_weight·inst_tv + dice_weight·inst_dice)   (dice: "pe" only)
          + depth_weight·depth
    """
    if tasks is not None:
        _check_tasks(outputs, targets, cfg, tasks)
    terms: dict[str, Tensor] = {}
    total: Tensor | None = None

    def add(value: Tensor) -> None:
        nonlocal total
        total = value if total is None else total + value

    if "sem" in outputs and "sem" in targets:
        _need(targets, ("dist",), "sem")
        logits = outputs["sem"]
        _check_shape("sem", logits, targets["sem"])
        if _use_kernels(cfg.backend, logits):
            from genpan.kernels.sem_loss import fused_sem_ce_tv

            ce, tv = fused_sem_ce_tv(logits, targets["sem"], targets["dist"], cfg.D, cfg.wmin)
        else:
            ce, tv = sem_ce_tv(logits, targets["sem"], targets["dist"], cfg.D, cfg.wmin)
        terms["sem_ce"], terms["sem_tv"] = ce, tv
        add(cfg.sem_weight * (ce + cfg.sem_tv_weight * tv))

    if "inst" in outputs and "u" in targets:
        _need(targets, ("v", "valid", "ignore", "dist"), "inst")
        pred = outputs["inst"]
        _check_shape("inst", pred, targets["u"])
        u, v, valid, ignore, dist = (targets[k] for k in ("u", "v", "valid", "ignore", "dist"))
        if cfg.inst_encoding == "pe":
            _need(targets, ("ins",), "inst")
            if _use_kernels(cfg.backend, pred):
                from genpan.kernels.inst_loss import fused_inst_pe_tv

                main, tv = fused_inst_pe_tv(pred, u, v, valid, ignore, dist, cfg.num_harmonics, cfg.D, cfg.wmin)
            else:
                main, tv = inst_pe_tv(pred, u, v, valid, ignore, dist, cfg.num_harmonics, cfg.D, cfg.wmin)
            # DICE always runs on the reference path (a per-image matrix product, not a per-pixel stream)
            width = targets["crowd"].shape[1] if "crowd" in targets else None  # known on the host: no sync
            dice = dice_loss(pred, u, v, valid, ignore, targets["ins"], cfg.num_harmonics, width)
            terms["inst_dice"] = dice
            inst_total = main + cfg.inst_tv_weight * tv + cfg.dice_weight * dice
        else:
            weight = _pe_weight(dist, ignore, cfg.D, cfg.wmin, _compute_dtype(pred))
            if cfg.inst_encoding == "rgb":
                main, tv = rgb_loss(pred, u, v, valid, weight), norm_tv(pred, 1.0)
            else:
                main, tv = uvcls_loss(pred, u, v, valid, weight, cfg.uv_bins), uvcls_tv(pred, cfg.uv_bins)
            inst_total = main + cfg.inst_tv_weight * tv
        terms["inst_main"], terms["inst_tv"] = main, tv
        add(cfg.inst_weight * inst_total)

    depth_key = "disp" if cfg.depth_loss == "affine" else "depth"
    if "depth" in outputs and depth_key in targets:
        pred = outputs["depth"]
        target = targets[depth_key]
        _check_shape("depth", pred, target)
        pred = pred[:, 0]
        valid = targets.get("depth_valid", target > 0)
        if cfg.depth_loss == "affine":
            depth = affine_invariant_loss(pred, target, valid)
        else:
            depth = silog_loss(pred * cfg.max_depth, target, valid, cfg.silog_lambda)
        terms["depth"] = depth
        add(cfg.depth_weight * depth)

    if total is None:
        raise ValueError("loss: no task has both an output and its targets (outputs: "
                         f"{sorted(outputs)}, targets: {sorted(targets)})")
    terms["total"] = total
    return terms


def _check_tasks(outputs: dict[str, Tensor], targets: dict[str, Tensor], cfg: LossConfig, tasks: Sequence[str]) -> None:
    depth_key = "disp" if cfg.depth_loss == "affine" else "depth"
    needed = {"sem": ("sem", "dist"), "inst": ("u", "v", "valid", "ignore", "dist") + (("ins",) if cfg.inst_encoding == "pe" else ()),
              "depth": (depth_key,)}
    for task in tasks:
        if task not in outputs:
            raise ValueError(f"loss: task '{task}' is in the config's tasks but the model gave no '{task}' output")
        missing = [k for k in needed.get(task, ()) if k not in targets]
        if missing:
            raise ValueError(f"loss: task '{task}' is in the config's tasks but the batch has no {missing[0]!r} targets"
                             + (" (shards built without depth: re-run prep with depth, or drop the task)" if task == "depth" else ""))

