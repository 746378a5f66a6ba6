"""Pictures of panoptic segmentations: report panels (image | ground truth | prediction) and per-image
overlays (the photo with its segmentation blended over it, instance outlines, a legend of the classes
present, optionally the ground truth and the depth map beside it).

A category has one base colour in ground truth and prediction alike; its instances vary around it, and
segment borders are drawn white so touching instances of one class stay apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from genpan.prep.targets import boundary_mask


def category_colour(category_id: int) -> np.ndarray:
    return np.random.default_rng(int(category_id)).integers(70, 230, 3)


def colourise(pan_ids: np.ndarray, segments: list[dict[str, Any]]) -> np.ndarray:
    """(H, W) ids → (H, W, 3) uint8 RGB; void black, borders white."""
    rgb = np.zeros((*pan_ids.shape, 3), np.uint8)
    for i, seg in enumerate(segments):
        jitter = np.random.default_rng(i).integers(-25, 26, 3)
        rgb[pan_ids == int(seg["id"])] = np.clip(category_colour(seg["category_id"]) + jitter, 0, 255)
    rgb[boundary_mask(pan_ids) & (pan_ids != 0)] = 255
    return rgb


def blend(image_rgb: np.ndarray, pan_ids: np.ndarray, segments: list[dict[str, Any]], alpha: float = 0.55) -> np.ndarray:
    """The photo with its segmentation over it: labelled pixels mixed with their segment's colour, void
    left as the photo, every segment's outline white."""
    colours = colourise(pan_ids, segments).astype(np.float32)
    labelled = (pan_ids != 0)[..., None]
    out = np.where(labelled, (1 - alpha) * image_rgb.astype(np.float32) + alpha * colours, image_rgb.astype(np.float32))
    out[boundary_mask(pan_ids) & (pan_ids != 0)] = 255
    return out.round().astype(np.uint8)


def _title(tile: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((22, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, tile], axis=0)


def legend(categories: list[tuple[int, str]], width: int) -> np.ndarray:
    """Rows of colour swatches with class names, wrapped to `width` px."""
    rows, row, x = [], np.full((22, width, 3), 255, np.uint8), 4
    for cat_id, name in categories:
        (tw, _), _ = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        if x + 18 + tw > width and x > 4:
            rows.append(row)
            row, x = np.full((22, width, 3), 255, np.uint8), 4
        row[5:17, x : x + 12] = category_colour(cat_id)
        cv2.putText(row, name, (x + 16, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += 16 + tw + 12
    rows.append(row)
    return np.concatenate(rows, axis=0)


def overlay_picture(
    image_rgb: np.ndarray,
    pred: tuple[np.ndarray, list[dict[str, Any]]],
    names: dict[int, str],
    gt: tuple[np.ndarray, list[dict[str, Any]]] | None = None,
    depth: np.ndarray | None = None,
    max_side: int = 640,
) -> np.ndarray:
    """One picture per image: prediction over the photo, then (when given) the ground truth over the
    photo and the depth map (turbo colours, near = red), titled, with a legend of the classes present."""
    h, w = image_rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    photo = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA) if scale < 1 else image_rgb

    def small(ids: np.ndarray) -> np.ndarray:
        return cv2.resize(ids.astype(np.int32), size, interpolation=cv2.INTER_NEAREST) if ids.shape != photo.shape[:2] else ids

    tiles = [_title(blend(photo, small(pred[0]), pred[1]), "prediction")]
    present = {int(s["category_id"]) for s in pred[1]}
    if gt is not None:
        tiles.append(_title(blend(photo, small(gt[0]), gt[1]), "ground truth"))
        present |= {int(s["category_id"]) for s in gt[1]}
    if depth is not None:
        d = cv2.resize(depth.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
        valid = d > 0
        lo, hi = (float(d[valid].min()), float(d[valid].max())) if valid.any() else (0.0, 1.0)
        norm = np.where(valid, 255 * (1 - (d - lo) / max(hi - lo, 1e-6)), 0).astype(np.uint8)
        tiles.append(_title(cv2.applyColorMap(norm, cv2.COLORMAP_TURBO)[..., ::-1], "depth"))
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    row = tiles[0]
    for tile in tiles[1:]:
        row = np.concatenate([row, gap, tile], axis=1)
    key = legend([(c, names.get(c, str(c))) for c in sorted(present)], row.shape[1])
    return np.concatenate([row, key], axis=0)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", rgb[..., ::-1])
    if not ok:
        raise OSError(f"cannot encode {path}")
    from genpan.atomic import atomic_write_bytes

    atomic_write_bytes(path, buf.tobytes())
    return path


def panel(image_rgb: np.ndarray, gt: tuple[np.ndarray, list[dict]], pred: tuple[np.ndarray, list[dict]], height: int = 160) -> np.ndarray:
    """One row: image, GT and prediction side by side, each scaled to `height` px (nearest for labels)."""
    h, w = image_rgb.shape[:2]
    width = max(1, round(w * height / h))
    tiles = [cv2.resize(image_rgb, (width, height), interpolation=cv2.INTER_AREA)]
    for ids, segs in (gt, pred):
        tiles.append(cv2.resize(colourise(ids, segs), (width, height), interpolation=cv2.INTER_NEAREST))
    gap = np.full((height, 4, 3), 255, np.uint8)
    return np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)


def write_overlays(rows: list[np.ndarray], path: str | Path, titles: tuple[str, ...] = ("image", "ground truth", "prediction")) -> Path:
    """Stack panels (padded to the widest) into one PNG, under a row of panel titles."""
    width = max(r.shape[1] for r in rows)
    header = np.full((22, width, 3), 255, np.uint8)
    tile = (rows[0].shape[1] - 8) // 3  # the first panel's tile width (3 tiles, two 4 px gaps)
    for k, text in enumerate(titles):
        cv2.putText(header, text, (k * (tile + 4) + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    padded = [header] + [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    path = Path(path)
    if not cv2.imwrite(str(path), np.concatenate(padded, axis=0)[..., ::-1]):
        raise OSError(f"cannot write {path}")
    return path
