"""Qualitative panels for reports: image | ground truth | prediction, segments coloured by id.

A category has one base colour in ground truth and prediction alike; its instances vary around it, and
segment borders are drawn white so touching instances of one class stay apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from genpan.prep.targets import boundary_mask


def colourise(pan_ids: np.ndarray, segments: list[dict[str, Any]]) -> np.ndarray:
    """(H, W) ids → (H, W, 3) uint8 RGB; void black, borders white."""
    rgb = np.zeros((*pan_ids.shape, 3), np.uint8)
    for i, seg in enumerate(segments):
        base = np.random.default_rng(int(seg["category_id"])).integers(70, 230, 3)
        jitter = np.random.default_rng(i).integers(-25, 26, 3)
        rgb[pan_ids == int(seg["id"])] = np.clip(base + jitter, 0, 255)
    rgb[boundary_mask(pan_ids) & (pan_ids != 0)] = 255
    return rgb


def panel(image_rgb: np.ndarray, gt: tuple[np.ndarray, list[dict]], pred: tuple[np.ndarray, list[dict]], height: int = 160) -> np.ndarray:
    """One row: image, GT and prediction side by side, each scaled to `height` px (nearest for labels)."""
    h, w = image_rgb.shape[:2]
    width = max(1, round(w * height / h))
    tiles = [cv2.resize(image_rgb, (width, height), interpolation=cv2.INTER_AREA)]
    for ids, segs in (gt, pred):
        tiles.append(cv2.resize(colourise(ids, segs), (width, height), interpolation=cv2.INTER_NEAREST))
    gap = np.full((height, 4, 3), 255, np.uint8)
    return np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)


def write_overlays(rows: list[np.ndarray], path: str | Path) -> Path:
    """Stack panels (padded to the widest) into one PNG."""
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    path = Path(path)
    if not cv2.imwrite(str(path), np.concatenate(padded, axis=0)[..., ::-1]):
        raise OSError(f"cannot write {path}")
    return path
