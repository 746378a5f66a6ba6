"""One shard sample, read in two steps inside a DataLoader worker.

`parse_sample` reads what the batch layout needs when the sample leaves the shuffle buffer (size, crowd
flags and distance scale from the json, and checks the fields are there); `decode_into` then decodes
every field straight into its place in the batch buffer (OpenCV for the image, zstd for the label planes,
genpan/planes.py), converting to the batch dtype in the same pass. Every problem with a sample is a
one-line ValueError naming the sample and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from genpan.labels import DIST_SCALE, DIST_SCALES
from genpan.planes import PlaneError, decode_plane
from genpan.prep.shards import DISP_SCALE, check_sample_key
from genpan.train.shard_urls import check_prep_version

INT16_MAX = np.iinfo(np.int16).max
IMAGE_FIELDS = ("jpg", "png")
LABEL_FIELDS = ("sem.zst", "ins.zst", "dist.zst")
MAX_SIDE = 1 << 15  # pixels on an image side the loader accepts (COCO ≤ 640, Cityscapes 2048)


def wanted_fields(depth: str) -> set[str]:
    """The tar members the loader reads for data.depth = `depth` (others are skipped unread)."""
    return {*IMAGE_FIELDS, *LABEL_FIELDS, "json"} | ({f"{depth}.zst"} if depth != "none" else set())


@dataclass
class ParsedSample:
    """A raw sample whose json is read and checked; its pixels are not decoded yet."""

    key: str
    raw: dict[str, Any]
    height: int
    width: int
    planes: dict[str, Any]  # json "planes": field → {"dtype", "shape"}
    crowd: np.ndarray  # (max instance index + 1,) bool, crowd flag per instance index
    dist_factor: int  # stored dist.zst unit → the batch's 1/DIST_SCALE px
    depth: str  # "none", "disp" or "depth" (data.depth)

    @property
    def image_bytes(self) -> bytes:
        return next(self.raw[name] for name in IMAGE_FIELDS if self.raw.get(name) is not None)


def _read_meta(meta: Any) -> tuple[int, int, dict[str, Any], list[int], list[int], int]:
    """(height, width, planes, instance index of each segment, the crowd ones, dist scale) of a sample
    json; TypeError, ValueError, AttributeError, KeyError or OverflowError when it breaks the contract."""
    height, width = int(meta["height"]), int(meta["width"])
    planes = meta["planes"]
    if not isinstance(planes, dict):
        raise TypeError("'planes' is not an object")
    segments = meta.get("segments", [])
    indices = [int(s.get("ins", 0)) for s in segments]
    crowd = [index for index, s in zip(indices, segments) if index > 0 and s.get("iscrowd")]
    return height, width, planes, indices, crowd, int(meta["params"]["dist_scale"])


def parse_sample(raw: dict[str, Any], depth: str = "none") -> ParsedSample:
    """Check a raw sample's key, prep version and fields, and read its size, crowd flags and distance scale."""
    key = check_sample_key(raw["__key__"], f"shard {raw.get('__url__', '?')}")
    if not any(raw.get(name) is not None for name in IMAGE_FIELDS):
        raise ValueError(f"sample {key}: no jpg or png image")
    url = raw.get("__url__", "?")
    if "json" not in raw:  # also what a tar cut at a member boundary looks like
        raise ValueError(f"sample {key}: shard {url} has no json for it (a truncated shard?)")
    try:
        meta = json.loads(raw["json"])
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"sample {key}: unreadable json ({type(exc).__name__}: {exc})") from None
    check_prep_version(meta if isinstance(meta, dict) else {}, f"sample {key} of shard {url}")
    needed = [*LABEL_FIELDS] + ([f"{depth}.zst"] if depth != "none" else [])
    missing = [name for name in needed if name not in raw]
    if missing:
        hint = f" (data.depth = {depth!r})" if f"{depth}.zst" in missing else ""
        raise ValueError(f"sample {key}: shard {url} has no {', '.join(missing)} for it{hint}")
    try:
        height, width, planes, indices, crowd_indices, scale = _read_meta(meta)
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as exc:
        raise ValueError(f"sample {key}: json breaks the shard contract ({type(exc).__name__}: {exc})") from None
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):  # a damaged json would otherwise size a batch of terabytes
        raise ValueError(f"sample {key}: json claims {height}×{width} pixels (1..{MAX_SIDE} on a side)")
    max_ins = max(indices, default=0)
    if max_ins > INT16_MAX:
        raise ValueError(f"sample {key}: {max_ins} instances, more than the loader's int16 maps hold ({INT16_MAX})")
    if scale not in DIST_SCALES:
        raise ValueError(f"sample {key}: dist_scale {scale} is not one of {DIST_SCALES}")
    crowd = np.zeros(max(max_ins, 0) + 1, dtype=bool)
    crowd[crowd_indices] = True
    return ParsedSample(key, raw, height, width, planes, crowd, DIST_SCALE // scale, depth)


def _plane(sample: ParsedSample, name: str, dtypes: tuple[type, ...] = (np.uint8, np.uint16)) -> np.ndarray:
    """A label plane's pixels (read-only), checked against the sample's size and the dtypes allowed."""
    try:
        pixels = decode_plane(sample.raw[name], sample.planes.get(name))
    except PlaneError as exc:
        raise ValueError(f"sample {sample.key}: cannot decode {name}: {exc}") from None
    if pixels.shape != (sample.height, sample.width):
        raise ValueError(f"sample {sample.key}: {name} is {pixels.shape}, expected a {sample.height}×{sample.width} map")
    if pixels.dtype.type not in dtypes:
        raise ValueError(f"sample {sample.key}: {name} is {pixels.dtype}, expected {' or '.join(np.dtype(d).name for d in dtypes)}")
    return pixels


def _distance_into(out: np.ndarray, stored: np.ndarray, factor: int) -> None:
    """dist.zst values × `factor` → int16 1/DIST_SCALE px, saturating at 32767 / 64 = 512 px (where every
    EDS weight is already wmin); one pass."""
    if stored.dtype == np.uint8 and factor * 255 <= INT16_MAX:  # the default: a widening multiply, no clip
        np.multiply(stored, factor, out=out, dtype=np.int16, casting="unsafe")
    elif factor == 1:
        np.minimum(stored, INT16_MAX, out=out, casting="unsafe")
    else:
        np.copyto(out, np.minimum(stored.astype(np.int32) * factor, INT16_MAX), casting="unsafe")


def decode_into(sample: ParsedSample, out: dict[str, np.ndarray]) -> None:
    """Decode every field of `sample` into `out`: image (h, w, 3) uint8 RGB, sem (h, w) uint8, ins and
    dist (h, w) int16, and with data.depth `depth` or `disp` (h, w) float32 plus `depth_valid` bool;
    writable arrays of exactly these shapes and dtypes (views into a batch buffer, as a rule)."""
    key = sample.key
    try:  # OpenCV raises on some damaged inputs (an empty buffer) and returns None on others
        bgr = cv2.imdecode(np.frombuffer(sample.image_bytes, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is None:
        raise ValueError(f"sample {key}: cannot decode the image")
    if bgr.shape[:2] != (sample.height, sample.width):
        raise ValueError(f"sample {key}: the image is {bgr.shape[0]}×{bgr.shape[1]}, its json says {sample.height}×{sample.width}")
    image = out["image"]
    if cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=image) is not image:  # OpenCV made its own array instead
        raise RuntimeError(f"OpenCV did not write into the batch buffer ({image.shape}, strides {image.strides})")
    np.copyto(out["sem"], _plane(sample, "sem.zst", (np.uint8,)))  # train ids are 8-bit (255 = void)
    # int16 halves what workers hand to the trainer: instance indices are < 2^15 (parse_sample checks)
    ins = _plane(sample, "ins.zst")
    np.copyto(out["ins"], ins.view(np.int16) if ins.dtype == np.uint16 else ins, casting="unsafe")  # same bits: a plain copy
    _distance_into(out["dist"], _plane(sample, "dist.zst"), sample.dist_factor)
    if sample.depth == "depth":  # depth.zst: millimetres, 0 = no measurement
        stored = _plane(sample, "depth.zst", (np.uint16,))
        np.divide(stored, 1000.0, out=out["depth"], dtype=np.float32, casting="unsafe")
        np.greater(stored, 0, out=out["depth_valid"])
    elif sample.depth == "disp":
        np.divide(_plane(sample, "disp.zst", (np.uint16,)), DISP_SCALE, out=out["disp"], dtype=np.float32, casting="unsafe")
        out["depth_valid"][:] = True
