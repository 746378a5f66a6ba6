"""Monocular depth metrics as the depth literature reports them on NYUv2 (Eigen et al. 2014).

Per image, on valid pixels (ground truth in (min_depth, max_depth], inside the eval crop):
    AbsRel = mean |p − g| / g          SqRel = mean (p − g)² / g
    RMSE   = sqrt(mean (p − g)²)       RMSE log = sqrt(mean (ln p − ln g)²)
    log10  = mean |log10 p − log10 g|  δ_k = fraction with max(p/g, g/p) < 1.25^k, k = 1, 2, 3
then averaged over images (the convention of BTS, AdaBins, Depth Anything). Predictions are clipped
to [min_depth, max_depth] first. The NYUv2 eval crop is the Eigen crop of the 480×640 frames:
rows 45..470, columns 41..600 (inclusive), scaled to other resolutions.

    python eval/depth.py --gt-dir data/depth_val --pred-dir predictions/depth_val --out report/ [--no-eigen-crop --max-depth 60]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from genpan.atomic import atomic_write_text

NYU_MIN_DEPTH = 1e-3
NYU_MAX_DEPTH = 10.0
EIGEN_CROP_480x640 = (45, 471, 41, 601)  # top, bottom (exclusive), left, right (exclusive)


@dataclass(frozen=True)
class DepthMetrics:
    abs_rel: float
    sq_rel: float
    rmse: float
    rmse_log: float
    log10: float
    delta1: float
    delta2: float
    delta3: float
    num_images: int = 1

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def eigen_crop_mask(height: int, width: int) -> np.ndarray:
    """The Eigen crop as a boolean mask, scaled from 480×640 to (height, width)."""
    top, bottom, left, right = EIGEN_CROP_480x640
    mask = np.zeros((height, width), dtype=bool)
    mask[round(top * height / 480) : round(bottom * height / 480), round(left * width / 640) : round(right * width / 640)] = True
    return mask


def image_depth_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    min_depth: float = NYU_MIN_DEPTH,
    max_depth: float = NYU_MAX_DEPTH,
    eigen_crop: bool = True,
) -> DepthMetrics | None:
    """Metrics of one image (metres); None when it has no valid ground-truth pixel."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    valid = np.isfinite(gt) & (gt > min_depth) & (gt <= max_depth)
    if eigen_crop:
        valid &= eigen_crop_mask(*gt.shape)
    if not valid.any():
        return None
    g = gt[valid]
    p = np.clip(np.nan_to_num(pred[valid], nan=min_depth, posinf=max_depth, neginf=min_depth), min_depth, max_depth)
    ratio = np.maximum(p / g, g / p)
    diff = p - g
    return DepthMetrics(
        abs_rel=float(np.mean(np.abs(diff) / g)),
        sq_rel=float(np.mean(diff**2 / g)),
        rmse=float(np.sqrt(np.mean(diff**2))),
        rmse_log=float(np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2))),
        log10=float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
        delta1=float(np.mean(ratio < 1.25)),
        delta2=float(np.mean(ratio < 1.25**2)),
        delta3=float(np.mean(ratio < 1.25**3)),
    )


def disparity_to_aligned_depth(pred_disp: np.ndarray, gt_depth: np.ndarray, valid: np.ndarray, max_depth: float) -> np.ndarray:
    """Relative-depth protocol (MiDaS, Depth Anything): fit scale s and shift t by least squares so that
    s·pred + t matches the ground-truth disparity 1/gt on valid pixels, then return depth 1/(s·pred + t)
    (clipped to [1/max_depth, ∞) in disparity, i.e. at most max_depth)."""
    p = pred_disp[valid].astype(np.float64)
    g = 1.0 / gt_depth[valid].astype(np.float64)
    a = np.stack([p, np.ones_like(p)], axis=1)
    (s, t), *_ = np.linalg.lstsq(a, g, rcond=None)
    aligned = s * pred_disp.astype(np.float64) + t
    return 1.0 / np.maximum(aligned, 1.0 / max_depth)


def mean_depth_metrics(per_image: list[DepthMetrics | None]) -> DepthMetrics | None:
    """Average over the images that had valid pixels."""
    kept = [m for m in per_image if m is not None]
    if not kept:
        return None
    fields = [k for k in DepthMetrics.__dataclass_fields__ if k != "num_images"]
    means = {k: float(np.mean([getattr(m, k) for m in kept])) for k in fields}
    return DepthMetrics(**means, num_images=len(kept))


def depth_table_markdown(m: DepthMetrics) -> str:
    """A Markdown table for report.md (lower is better for errors, higher for δ)."""
    head = "| AbsRel ↓ | SqRel ↓ | RMSE ↓ | RMSE log ↓ | log10 ↓ | δ1 ↑ | δ2 ↑ | δ3 ↑ | images |"
    sep = "|---|---|---|---|---|---|---|---|---|"
    row = (
        f"| {m.abs_rel:.4f} | {m.sq_rel:.4f} | {m.rmse:.4f} | {m.rmse_log:.4f} | {m.log10:.4f} | "
        f"{m.delta1:.4f} | {m.delta2:.4f} | {m.delta3:.4f} | {m.num_images} |"
    )
    return "\n".join([head, sep, row])


def evaluate_folders(
    gt_dir: Path,
    pred_dir: Path,
    min_depth: float = NYU_MIN_DEPTH,
    max_depth: float = NYU_MAX_DEPTH,
    eigen_crop: bool = True,
    disparity_scale_m: float | None = None,
) -> tuple[DepthMetrics | None, int]:
    """Score every ground-truth depth PNG (uint16 mm) against the prediction PNG of the same name.

    With `disparity_scale_m`, predictions are relative disparity (a model trained on disparity pseudo-labels:
    the PNG holds disparity × disparity_scale_m in mm, as eval/predict.py writes a sigmoid output with
    --depth-max): each image is scale-and-shift aligned in disparity space before the metrics.
    Returns the mean metrics and the number of images scored; a missing or mis-sized prediction is a
    ValueError naming the file.
    """
    gt_files = sorted(Path(gt_dir).glob("*.png"))
    if not gt_files:
        raise FileNotFoundError(f"no ground-truth depth PNGs in {gt_dir}")
    per_image = []
    for gt_path in tqdm(gt_files, desc="depth", unit="img"):
        pred_path = Path(pred_dir) / gt_path.name
        if not pred_path.is_file():
            raise ValueError(f"{gt_path.name}: no prediction in {pred_dir}")
        gt, pred = _read_mm(gt_path), _read_mm(pred_path)
        if gt.shape != pred.shape:
            raise ValueError(f"{gt_path.name}: prediction is {pred.shape} but ground truth is {gt.shape}")
        if disparity_scale_m is not None:
            valid = np.isfinite(gt) & (gt > min_depth) & (gt <= max_depth)
            if valid.sum() < 2:
                per_image.append(None)
                continue
            pred = disparity_to_aligned_depth(pred / disparity_scale_m, gt, valid, max_depth)
        per_image.append(image_depth_metrics(pred, gt, min_depth, max_depth, eigen_crop))
    return mean_depth_metrics(per_image), len(gt_files)


def _read_mm(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 2 or img.dtype != np.uint16:
        raise ValueError(f"{path}: depth PNG must be single-channel 16-bit (mm)")
    return img.astype(np.float64) / 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Depth metrics (AbsRel, RMSE, log10, δ) of predicted depth PNGs (uint16 mm) against ground truth.")
    parser.add_argument("--gt-dir", type=Path, required=True, help="ground-truth depth PNGs, uint16 millimetres")
    parser.add_argument("--pred-dir", type=Path, required=True, help="predicted depth PNGs with the same file names (eval/predict.py writes depth_{split}/)")
    parser.add_argument("--out", type=Path, default=None, help="write depth.json and depth.md here")
    parser.add_argument("--min-depth", type=float, default=NYU_MIN_DEPTH, help="valid ground truth is above this (m; default 1e-3)")
    parser.add_argument("--max-depth", type=float, default=NYU_MAX_DEPTH, help="valid ground truth is at most this; predictions are clipped to it (m; default 10)")
    parser.add_argument("--no-eigen-crop", action="store_true", help="score the whole image (the Eigen crop is for NYUv2's 480×640 frames)")
    parser.add_argument("--disparity", type=float, default=None, metavar="DEPTH_MAX",
                        help="predictions are relative disparity written with predict.py --depth-max DEPTH_MAX: align "
                        "scale and shift per image in disparity space first (MiDaS / Depth Anything protocol)")
    args = parser.parse_args(argv)
    try:
        metrics, n = evaluate_folders(args.gt_dir, args.pred_dir, args.min_depth, args.max_depth, not args.no_eigen_crop, args.disparity)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if metrics is None:
        print(f"error: none of the {n} ground-truth images has a valid depth in ({args.min_depth}, {args.max_depth}] m", file=sys.stderr)
        return 2
    table = depth_table_markdown(metrics)
    print(table)
    if args.out is not None:
        atomic_write_text(args.out / "depth.json", json.dumps(metrics.as_dict(), indent=2))
        atomic_write_text(args.out / "depth.md", "## Depth\n\n" + table + "\n")
        print(f"wrote {args.out / 'depth.json'} and depth.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
