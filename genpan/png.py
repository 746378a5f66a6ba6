"""PNG codec for the shards' label maps: prep's output PNGs and the loader's decode.

libpng spends most of a label map's decode in zlib's inflate, which is slow on the long runs these
files are made of. `decode_png` parses the chunks itself, inflates with zlib-ng (≈10× faster than zlib
on these streams; stdlib zlib if the package is missing, same bytes) and undoes the scanline filters
None, Sub and Up with numpy: what this project writes (None, `encode_gray_png`) and what OpenCV writes
(Sub) never touch libpng. Average/Paeth rows (PIL's files, e.g. COCO's ground truth) need a sequential
unfilter: the stream is inflated here and handed to libpng as stored deflate blocks written by hand (one
copy of the rows), so libpng only unfilters. Rows that repeat the row above (Up-filtered, all zero: a
label map where no boundary moves, 30-40 % of PIL's rows) are left out of what libpng gets and put back
with np.repeat (`_decode_without_repeats`, when ≥ 20 % of rows repeat): 23-29 % less time per
PIL-written synthetic label map, ~18 % of it from the hand-written stored blocks alone. A numpy
unfilter of the Paeth rows was tried and is slower: PIL's Paeth rows hang from each other through runs
of Up rows (~24 dependent batches per file), and numpy's uint8 running sums (~5 ns a byte) lose to
libpng.
Palette, gray+alpha, interlaced and < 8-bit files go to OpenCV as they are. Every path gives the array
libpng gives.

`decode_png` returns PNG channel order (gray, RGB, RGBA; gray+alpha comes out as RGBA, as OpenCV
expands it), uint8 or native-endian uint16.
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
_COLOUR_TYPE = {n: colour for colour, n in CHANNELS.items()}
NONE, SUB, UP = 0, 1, 2


def _chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + _inflater.crc32(kind + body).to_bytes(4, "big")


class PNGError(ValueError):
    """The bytes are not a decodable PNG."""


def decode_png(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """PNG bytes → array in PNG channel order; raises PNGError on anything undecodable."""
    return _png_order(*decode_png_any_order(data))


def _png_order(array: np.ndarray, reversed_colour: bool) -> np.ndarray:
    """OpenCV's BGR(A) back to PNG's RGB(A) order where `reversed_colour`."""
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
    return _decode_sequential_filters(buffer, inflated)


def _decode_sequential_filters(buffer: memoryview, inflated: tuple[np.ndarray, int, int, int, int]) -> tuple[np.ndarray, bool]:
    """libpng's decode of a file with Average/Paeth rows, from its rows already inflated (`_inflate_rows`);
    (array, reversed_colour) as `decode_png_any_order`."""
    # Average/Paeth rows need libpng's sequential unfilter; hand it the stream already inflated (stored
    # deflate blocks), so that zlib-ng does the inflate: a third less time than libpng alone. Before
    # that, rows that repeat the one above are taken out (libpng's time is per byte it gets; the IHDR
    # is intact here, `_inflate_rows` checked it, so the shortened file's new IHDR hides no damage)
    collapsed = _decode_without_repeats(*inflated)
    if collapsed is not None:
        return collapsed
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


def _read_ihdr(buffer: memoryview) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) of an intact IHDR; PNGError otherwise. The
    checksum is checked before the sizes are used: a damaged header could ask for any buffer, and libpng
    refuses it too."""
    if len(buffer) < 33 or buffer[:8] != SIGNATURE or buffer[12:16] != b"IHDR":
        raise PNGError("not a PNG (no IHDR)")
    if _inflater.crc32(buffer[12:29]) != int.from_bytes(buffer[29:33], "big"):
        raise PNGError("corrupt PNG header (IHDR checksum)")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", buffer[16:29])
    if width == 0 or height == 0:
        raise PNGError("PNG of zero width or height")
    return width, height, depth, colour, interlace


def _inflate_rows(buffer: memoryview) -> tuple[np.ndarray, int, int, int, int] | None:
    """(filtered rows (H, 1 + W·bpp) uint8, width, height, channels, bit depth) of a PNG the fast paths
    can take (8/16-bit gray/RGB(A), not interlaced); None otherwise."""
    try:
        width, height, depth, colour, interlace = _read_ihdr(buffer)
    except PNGError:
        return None
    channels = CHANNELS.get(colour)
    if channels is None or depth not in (8, 16) or interlace:
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
        # the size is known: one output buffer instead of a growing one (2.5x faster here). One byte
        # more than the rows, or the end-of-stream marker would still find the buffer full and grow it
        raw = _inflater.decompress(idat[0] if len(idat) == 1 else b"".join(idat), bufsize=height * stride + 1)
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
    return memoryview(_stored_png_of(bytes(buffer[8:33]), rows))  # IHDR: length, type, 13 bytes, CRC


_IEND = _chunk(b"IEND", b"")
_STORED_BLOCK = 65535  # the most bytes one stored deflate block holds


def _stored_png_of(ihdr: bytes, rows: np.ndarray) -> bytes:
    """PNG bytes of the filtered `rows` (contiguous uint8) under the IHDR chunk `ihdr`, as
    stored deflate blocks: written by hand and joined once (zlib's level 0 plus chunk concatenation
    copied the rows four times); libpng still checks both checksums, so they are computed."""
    body = memoryview(rows).cast("B") if rows.flags.c_contiguous else memoryview(np.ascontiguousarray(rows)).cast("B")
    size = len(body)
    pieces: list[bytes | memoryview] = [b"\x78\x01"]  # zlib header: deflate, 32K window, no dictionary
    for start in range(0, size, _STORED_BLOCK):
        n = min(_STORED_BLOCK, size - start)
        pieces.append(struct.pack("<BHH", start + n == size, n, n ^ 0xFFFF))  # BFINAL, BTYPE 00, LEN, NLEN
        pieces.append(body[start : start + n])
    pieces.append(_inflater.adler32(body).to_bytes(4, "big"))
    crc = _inflater.crc32(b"IDAT")
    for piece in pieces:
        crc = _inflater.crc32(piece, crc)
    length = sum(len(p) for p in pieces)
    return b"".join(
        [SIGNATURE, ihdr, length.to_bytes(4, "big"), b"IDAT", *pieces, crc.to_bytes(4, "big"), _IEND]
    )


def _pixel_view(rows: np.ndarray, width: int, height: int, channels: int, depth: int) -> np.ndarray | None:
    """The unfiltered samples of None/Sub/Up rows in file byte order (16-bit as big-endian ">u2"); for a
    None-filtered file a read-only view of the inflated rows, no copy. None for Average/Paeth rows."""
    filters = rows[:, 0]
    pixels = rows[:, 1:].reshape(height, width, channels * depth // 8)
    if not filters.any():  # filter None throughout (this project's label maps): the rows are the pixels
        out = pixels
    elif filters.max() > UP:
        return None
    else:
        out = _unfilter(pixels, filters)
    if depth == 16:
        out = out.view(">u2")  # PNG samples are big-endian
    return out[..., 0] if channels == 1 else out


def _from_rows(rows: np.ndarray, width: int, height: int, channels: int, depth: int) -> np.ndarray | None:
    out = _pixel_view(rows, width, height, channels, depth)
    if out is None:
        return None
    if out.dtype.byteorder == ">":
        return out.astype(np.uint16)  # native order, contiguous, writable: one pass
    # a None-filtered image is still a view of the inflated bytes: hand out a writable, contiguous copy
    return np.array(out, order="C") if not out.flags.writeable or not out.flags.c_contiguous else out


def png_size(data: bytes | memoryview) -> tuple[int, int]:
    """(height, width) from the IHDR of PNG bytes, without decoding; PNGError when there is none."""
    width, height, *_ = _read_ihdr(memoryview(data).cast("B"))
    return height, width


def decode_png_view(data: bytes | memoryview) -> np.ndarray:
    """The pixels `decode_png` gives, possibly as a read-only strided view of the inflated bytes with
    16-bit samples big-endian (">u2"): for a caller that converts them into its own buffer at once, which
    then costs one pass instead of a copy out of the rows plus its own (the loader's batch slots)."""
    buffer = memoryview(data).cast("B")
    inflated = _inflate_rows(buffer)
    if inflated is None:
        return _png_order(*_decode_opencv(buffer))
    view = _pixel_view(*inflated)
    return _png_order(*_decode_sequential_filters(buffer, inflated)) if view is None else view


_RGB_BYTES = np.arange(3)


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


# below this share of repeated rows, leaving them out does not pay for the np.repeat that puts them back
# (measured: break-even near 0.15-0.25 on 384² PIL files)
MIN_REPEATS = 0.2


def _decode_without_repeats(
    rows: np.ndarray, width: int, height: int, channels: int, depth: int
) -> tuple[np.ndarray, bool] | None:
    """libpng's decode of a file with Average/Paeth rows, given only its rows that are not repeats
    (array, reversed_colour as `decode_png_any_order`); None when too few rows repeat.

    An Up row of zero bytes reconstructs to the row above it, so leaving it out changes no other row:
    libpng unfilters the rest (the row above of each is still the true one) and np.repeat puts the
    repeats back. Label maps: 30-40 % of PIL's rows where segments continue unchanged downwards.
    """
    sample = rows[::8]  # every 8th row first: files with few repeats skip the full scan
    if ((sample[:, 0] == UP) & (sample[:, 1:].max(axis=1) == 0)).mean() < MIN_REPEATS / 2:
        return None
    repeats = (rows[:, 0] == UP) & (rows[:, 1:].max(axis=1) == 0)
    repeats[0] = False  # an Up row of zeros at the top is a row of zeros: libpng decodes it too
    keep = np.flatnonzero(~repeats)
    if keep.size > (1 - MIN_REPEATS) * height:
        return None
    header = struct.pack(">IIBBBBB", width, keep.size, depth, _COLOUR_TYPE[channels], 0, 0, 0)
    kept, reversed_colour = _decode_opencv(memoryview(_stored_png_of(_chunk(b"IHDR", header), rows[keep])))
    return np.repeat(kept, np.diff(keep, append=height), axis=0), reversed_colour


def _decode_opencv(buffer: memoryview) -> tuple[np.ndarray, bool]:
    try:
        array = cv2.imdecode(np.frombuffer(buffer, np.uint8), cv2.IMREAD_UNCHANGED) if len(buffer) else None
    except cv2.error:  # OpenCV raises on some damaged inputs and returns None on others
        array = None
    if array is None:
        raise PNGError("not a decodable PNG")
    return array, array.ndim == 3 and array.shape[2] in (3, 4)
