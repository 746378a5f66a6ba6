"""Label planes in the shards: raw little-endian arrays compressed with zstd (the `zstandard` package).

A plane is stored as `zstd(array.tobytes())`; its dtype and shape live in the sample json
(`"planes": {"sem.zst": {"dtype": "|u1", "shape": [H, W]}, ...}`), so a reader needs nothing else.
zstd was chosen over PNG by `bench/label_codec.py` (docs/architecture.md, "Label planes"): on COCO's
real panoptic maps it stores ~20 % fewer bytes than OpenCV's PNG and decodes ~8× faster.

The output is a pure function of the array, the level and the zstd library version (one thread, no
dictionary, the content size in the frame header), so re-runs of prep give byte-identical shards.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import zstandard

DEFAULT_LEVEL = 3
MAX_LEVEL = 22
PLANE_DTYPES = ("|u1", "<u2")  # what prep writes: uint8 and little-endian uint16 maps
_local = threading.local()  # zstd contexts are not thread-safe; one pair per thread, reused


class PlaneError(ValueError):
    """A plane that cannot be decoded into the dtype and shape its json declares."""


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True, threads=0)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def encode_plane(array: np.ndarray, level: int = DEFAULT_LEVEL) -> tuple[bytes, dict[str, Any]]:
    """(compressed bytes, its json description {"dtype", "shape"}) of a uint8/uint16 map."""
    if not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level must be 1..{MAX_LEVEL}, got {level}")
    stored = np.ascontiguousarray(array, dtype=np.asarray(array).dtype.newbyteorder("<"))
    if stored.dtype.str not in PLANE_DTYPES:
        raise ValueError(f"label planes are uint8 or uint16, got {array.dtype}")
    return _compressor(level).compress(stored.tobytes()), {"dtype": stored.dtype.str, "shape": list(stored.shape)}


def decode_plane(data: bytes, description: Any) -> np.ndarray:
    """The array a plane holds (read-only, native byte order on little-endian machines); PlaneError
    when the description is malformed, the bytes are not a zstd frame, or their size disagrees."""
    try:
        dtype = np.dtype(description["dtype"])
        shape = tuple(int(n) for n in description["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PlaneError(f"malformed plane description {description!r} ({type(exc).__name__})") from None
    if dtype.str not in PLANE_DTYPES or any(n < 0 for n in shape):
        raise PlaneError(f"plane description {description!r} is not a uint8/uint16 map")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow, and cheaper than np.prod per plane
    try:
        # the frame's declared size is checked before anything is allocated: a damaged header may claim terabytes
        declared = zstandard.frame_content_size(data)
        if declared != expected:
            raise PlaneError(f"holds {declared} bytes, its description {dtype.str} {list(shape)} needs {expected}")
        raw = _decompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise PlaneError(f"not a valid zstd plane ({exc})") from None
    if len(raw) != expected:  # a frame shorter than its header says is a ZstdError above; this is a guard
        raise PlaneError(f"decoded to {len(raw)} bytes, its description {dtype.str} {list(shape)} needs {expected}")
    return np.frombuffer(raw, dtype).reshape(shape)
