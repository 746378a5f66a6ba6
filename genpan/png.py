"""PNG codec for the hot paths: the loader's label maps, prep's output PNGs, PQ's panoptic PNGs.

libpng spends most of a label map's decode in zlib's inflate, which is slow on the long runs these
files are made of. `decode_png` parses the chunks itself, inflates with zlib-ng (≈10× faster than zlib
on these streams; stdlib zlib if the package is missing, same bytes) and undoes the scanline filters
None, Sub and Up with numpy: what this project writes (None, `encode_gray_png`) and what OpenCV writes
(Sub) never touch libpng. Average/Paeth rows (PIL's files, e.g. COCO's ground truth) need a sequential
unfilter: the stream is inflated here and handed to libpng as stored deflate blocks, so libpng only
unfilters. Palette, gray+alpha, interlaced and < 8-bit files go to OpenCV as they are. Every path gives
the array libpng gives.

`decode_png` returns PNG channel order (gray, RGB, RGBA; gray+alpha comes out as RGBA, as OpenCV
expands it), uint8 or native-endian uint16. `rgb_runs_fast` reads an OpenCV-written RGB file as
horizontal runs without building the pixel map (eval/pq.py).
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

try:  # a dependency; stdlib zlib stays as the fallback for installs without it (same output either way)
    from zlib_ng import zlib_ng as _inflater
except ImportError:  # pragma: no cover - exercised where zlib-ng is absent
    _inflater = zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type → samples per pixel. Not here: palette (3), and gray+alpha (4), which OpenCV expands to
# BGRA, so that one shape comes out of either path.
CHANNELS = {0: 1, 2: 3, 6: 4}
NONE, SUB, UP = 0, 1, 2


def _chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + _inflater.crc32(kind + body).to_bytes(4, "big")


class PNGError(ValueError):
    """The bytes are not a decodable PNG."""


def decode_png(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """PNG bytes → array in PNG channel order; raises PNGError on anything undecodable."""
    array, reversed_colour = decode_png_any_order(data)
    if reversed_colour and array.shape[2] == 3:
        return np.ascontiguousarray(array[..., ::-1])
    if reversed_colour:
        return np.ascontiguousarray(array[..., [2, 1, 0, 3]])
    return array


def decode_png_any_order(data: bytes | bytearray | memoryview | np.ndarray) -> tuple[np.ndarray, bool]:
    """(array, reversed_colour): as `decode_png`, but colour images that OpenCV decoded stay in its
    BGR(A) order (reversed_colour True), sparing a copy to callers that can index either order."""
    buffer = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else memoryview(np.ascontiguousarray(data)).cast("B")
    inflated = _inflate_rows(buffer)
    if inflated is None:
        return _decode_opencv(buffer)
    fast = _from_rows(*inflated)
    if fast is not None:
        return fast, False
    # Average/Paeth rows need libpng's sequential unfilter; hand it the stream already inflated (stored
    # deflate blocks), so that zlib-ng does the inflate: a third less time than libpng alone
    return _decode_opencv(_stored_png(buffer, inflated[0]))


def encode_gray_png(array: np.ndarray, level: int) -> bytes:
    """(H, W) uint8 or uint16 → PNG bytes: scanline filter None, deflated by zlib-ng at `level` (0-9).

    Unfiltered because label maps compress as well without a filter and decoding is then a bare inflate;
    zlib-ng because it deflates these maps 2-3x faster than OpenCV's zlib at the same level.
    """
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16) or 0 in array.shape:
        raise ValueError(f"encode_gray_png needs a non-empty (H, W) uint8 or uint16 array, got {array.dtype} {array.shape}")
    if not 0 <= level <= 9:
        raise ValueError(f"PNG compression level must be 0..9, got {level}")
    h, w = array.shape
    depth = 8 * array.dtype.itemsize
    rows = np.zeros((h, 1 + w * array.dtype.itemsize), np.uint8)  # column 0: filter type None
    rows[:, 1:].view(">u2" if depth == 16 else np.uint8)[:] = array

    header = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", _inflater.compress(rows, level)) + _chunk(b"IEND", b"")


def _inflate_rows(buffer: memoryview) -> tuple[np.ndarray, int, int, int, int] | None:
    """(filtered rows (H, 1 + W·bpp) uint8, width, height, channels, bit depth) of a PNG the fast paths
    can take (8/16-bit gray/RGB(A), not interlaced); None otherwise."""
    if len(buffer) < 33 or buffer[:8] != SIGNATURE or buffer[12:16] != b"IHDR":
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", buffer[16:29])
    channels = CHANNELS.get(colour)
    if channels is None or depth not in (8, 16) or interlace or width == 0 or height == 0:
        return None
    idat, pos = [], 8
    while pos + 8 <= len(buffer):
        length = int.from_bytes(buffer[pos : pos + 4], "big")
        kind = bytes(buffer[pos + 4 : pos + 8])
        if kind == b"IDAT":
            idat.append(buffer[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    if not idat:
        return None
    stride = 1 + width * channels * depth // 8
    try:
        raw = _inflater.decompress(idat[0] if len(idat) == 1 else b"".join(idat))
    except Exception:  # a corrupt stream: let OpenCV produce (or refuse) the result
        return None
    if len(raw) != height * stride:
        return None
    return np.frombuffer(raw, np.uint8).reshape(height, stride), width, height, channels, depth


def _decode_fast(buffer: memoryview) -> np.ndarray | None:
    """The None/Sub/Up path; None when the file needs the general decoder."""
    inflated = _inflate_rows(buffer)
    return None if inflated is None else _from_rows(*inflated)


def _stored_png(buffer: memoryview, rows: np.ndarray) -> memoryview:
    """The same image as one IDAT of stored (uncompressed) deflate blocks, with the original IHDR."""
    ihdr = bytes(buffer[8:33])  # length, type, 13 bytes, CRC
    return memoryview(SIGNATURE + ihdr + _chunk(b"IDAT", _inflater.compress(rows.data, 0)) + _chunk(b"IEND", b""))


def _from_rows(rows: np.ndarray, width: int, height: int, channels: int, depth: int) -> np.ndarray | None:
    filters = rows[:, 0]
    if filters.max() > UP:
        return None
    pixels = rows[:, 1:].reshape(height, width, channels * depth // 8)
    out = _unfilter(pixels, filters)
    if depth == 16:
        out = out.view(">u2").astype(np.uint16)  # PNG samples are big-endian
    out = out[..., 0] if channels == 1 else out
    # a None-filtered image is still a view of the inflated bytes: hand out a writable, contiguous copy
    return np.array(out, order="C") if not out.flags.writeable or not out.flags.c_contiguous else out


def rgb_runs_fast(data: bytes | memoryview) -> tuple[tuple[int, int], np.ndarray, np.ndarray] | None:
    """Horizontal runs of an 8-bit RGB PNG whose rows are all Sub-filtered (OpenCV's files), read
    without reconstructing the pixels: ((H, W), run starts as flat pixel indices, R + 256·G + 256²·B of
    each run); None for any other PNG (use `decode_png`).

    A Sub-filtered pixel stores its difference to the left neighbour, so it is all-zero exactly inside a
    run: the run starts are the non-zero pixels (plus each row's first), and a run's value is the running
    sum of the differences at the starts of its row. Every row starts a run.
    """
    inflated = _inflate_rows(memoryview(data).cast("B"))
    if inflated is None:
        return None
    rows, width, height, channels, depth = inflated
    filters = rows[:, 0]
    # one pixel per row: None and Sub store the same bytes (and libpng writes None there)
    if channels != 3 or depth != 8 or not ((filters == SUB).all() or (width == 1 and (filters <= SUB).all())):
        return None
    diff = rows[:, 1:].reshape(height, width, 3)
    # a pixel's three bytes read as one little-endian word (plus the next byte, masked off): one test per
    # pixel instead of three. The last row's last word would end past the buffer: that row tests bytes.
    changed = np.empty((height, width), dtype=bool)
    words = np.ndarray((height - 1, width), dtype="<u4", buffer=rows, offset=1, strides=(rows.shape[1], 3))
    np.not_equal(words & 0xFFFFFF, 0, out=changed[:-1])
    last = diff[-1]
    changed[-1] = (last[:, 0] != 0) | (last[:, 1] != 0) | (last[:, 2] != 0)
    changed[:, 0] = True
    starts = np.flatnonzero(changed)
    steps = diff.reshape(-1, 3)[starts].astype(np.int64)
    running = np.cumsum(steps, axis=0)
    row_first = np.flatnonzero(starts % width == 0)  # one per row, in row order
    before_row = np.zeros((height, 3), np.int64)
    before_row[1:] = running[row_first[1:] - 1]
    rgb = (running - before_row[starts // width]) & 255
    ids = rgb[:, 0] | (rgb[:, 1] << 8) | (rgb[:, 2] << 16)
    return (height, width), starts, ids


def _unfilter(pixels: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Reconstruct bytes (H, W, bpp) or (H, W) from None/Sub/Up-filtered rows; uint8 sums wrap mod 256 as PNG's do."""
    if (filters == NONE).all():  # this project's label maps: the inflated bytes are the pixels
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] == 1:  # one byte per pixel: numpy's running sums are fastest along a plain 2-D row
        return _unfilter(pixels[..., 0], filters)[..., None]
    if (filters == SUB).all():  # OpenCV's default: rows are independent running sums
        return np.cumsum(pixels, axis=1, dtype=np.uint8)
    out = np.array(pixels)  # writable copy; None rows are final as they are
    sub = filters == SUB
    if sub.any():
        out[sub] = np.cumsum(pixels[sub], axis=1, dtype=np.uint8)
    up = filters == UP
    if up.any():
        # a run of Up rows adds each row to the one above: with C = running sum down the rows,
        # recon[r] = C[r] − C[s − 1], s the last non-Up row at or above r (C[−1] = 0: zeros above the image)
        running = np.cumsum(out, axis=0, dtype=np.uint8)
        rows = np.arange(len(filters))
        last_plain = np.maximum.accumulate(np.where(up, -1, rows))
        base = last_plain - 1
        start = np.where(base >= 0, base, 0)
        offset = np.where((base >= 0).reshape(-1, *[1] * (out.ndim - 1)), running[start], 0).astype(np.uint8)
        out = running - offset
    return out


def _decode_opencv(buffer: memoryview) -> tuple[np.ndarray, bool]:
    array = cv2.imdecode(np.frombuffer(buffer, np.uint8), cv2.IMREAD_UNCHANGED) if len(buffer) else None
    if array is None:
        raise PNGError("not a decodable PNG")
    return array, array.ndim == 3 and array.shape[2] in (3, 4)
