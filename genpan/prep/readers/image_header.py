"""Image size and integrity from the encoded bytes, without decoding pixels.

Prep never re-encodes images, so it only needs their size and a check that the file is whole; parsing
the header (and checking the end marker) costs microseconds where a decode costs milliseconds.
"""

from __future__ import annotations

import struct

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers that carry the image size (not DHT C4, JPG C8, DAC CC).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_info(data: bytes) -> tuple[int, int, str]:
    """(height, width, extension) of a JPEG or PNG; ValueError when unknown, corrupt or truncated."""
    if data[:2] == b"\xff\xd8":
        return (*_jpeg_size(data), "jpg")
    if data[:8] == _PNG_SIG:
        return (*_png_size(data), "png")
    raise ValueError("not a JPEG or PNG file" if data else "empty file")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    # Trailing padding after the end-of-image marker is common and harmless.
    if b"\xff\xd9" not in data[-64:].rstrip(b"\x00\r\n "):
        raise ValueError("truncated JPEG (no end-of-image marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"corrupt JPEG (bad marker at byte {i})")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            if h == 0 or w == 0:
                raise ValueError("corrupt JPEG (zero image size)")
            return h, w
        if marker in (0xDA, 0xD9) or length < 2:
            break
        i += 2 + length
    raise ValueError("corrupt JPEG (no frame header)")


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ValueError("corrupt PNG (no IHDR chunk)")
    w, h = struct.unpack(">II", data[16:24])
    if b"IEND" not in data[-16:]:
        raise ValueError("truncated PNG (no IEND chunk)")
    if h == 0 or w == 0:
        raise ValueError("corrupt PNG (zero image size)")
    return h, w
