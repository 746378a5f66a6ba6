"""The COCO panoptic file format: segment ids packed in RGB PNGs and the JSON beside them.

A pixel's segment id is R + 256·G + 256²·B; id 0 is void (unlabeled). These helpers are the one place
the packing is written, so readers, the synthetic generator, post-processing and PQ agree on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

VOID_ID = 0
MAX_SEGMENT_ID = 256**3 - 1


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (H, W) int32 segment ids."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer segment ids → (H, W, 3) uint8 RGB."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must lie in [0, {MAX_SEGMENT_ID}]")
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def decode_panoptic_png(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """PNG bytes → (H, W) int32 segment ids, decoded by OpenCV. Raises ValueError naming `name` on a bad file.

    Any 8-bit PNG with 3 or 4 channels reads (an alpha channel is ignored, as panopticapi's
    `np.array(Image.open(...))` + `rgb2id` does); grey or 16-bit files are refused.
    """
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise ValueError(f"{name}: not a decodable PNG")
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: panoptic PNG must be 8-bit RGB, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"{name}: panoptic PNG must have 3 colour channels, got shape {img.shape}")
    # OpenCV gives BGR(A): id = R + 256·G + 256²·B, built in place (fewest passes over the map)
    ids = img[..., 0].astype(np.int32)
    ids <<= 8
    ids |= img[..., 1]
    ids <<= 8
    ids |= img[..., 2]
    return ids


def row_run_starts(*maps: np.ndarray) -> np.ndarray:
    """Flat indices where a horizontal run starts in any of the equally shaped 2-D `maps`: each row's
    first pixel and every pixel that differs from its left neighbour in one of them."""
    h, w = maps[0].shape
    changed = np.empty((h, w), dtype=bool)
    changed[:, 0] = True
    np.not_equal(maps[0][:, 1:], maps[0][:, :-1], out=changed[:, 1:])
    for other in maps[1:]:
        changed[:, 1:] |= other[:, 1:] != other[:, :-1]
    return np.flatnonzero(changed)


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """Read a panoptic PNG file as (H, W) int32 segment ids."""
    path = Path(path)
    return decode_panoptic_png(path.read_bytes(), str(path))


def encode_panoptic_png(ids: np.ndarray) -> bytes:
    """(H, W) segment ids → PNG bytes (deterministic for the same ids)."""
    ok, buf = cv2.imencode(".png", id_to_rgb(ids)[..., ::-1])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return buf.tobytes()


def write_panoptic_png(path: str | Path, ids: np.ndarray) -> None:
    Path(path).write_bytes(encode_panoptic_png(ids))


def load_panoptic_json(path: str | Path, required: tuple[str, ...] = ("annotations", "categories")) -> dict[str, Any]:
    """Load a COCO panoptic JSON with a clear error for a missing or malformed file.

    `required`: the top-level lists it must have. A prediction file needs only `annotations` (the
    categories are the ground truth's, as panopticapi's `pq_compute` takes them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic JSON not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a COCO panoptic JSON is an object with an 'annotations' list, got {type(data).__name__}")
    for field in required:
        if field not in data:
            raise ValueError(f"{path}: a COCO panoptic JSON needs an '{field}' list")
    return data
