"""genpan/png.py against OpenCV's libpng decoder on every PNG form this project meets."""

from __future__ import annotations

import io
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

import genpan.png as png
from genpan.png import PNGError, decode_png

FILTERS = {
    "none": cv2.IMWRITE_PNG_FILTER_NONE,
    "sub": cv2.IMWRITE_PNG_FILTER_SUB,
    "up": cv2.IMWRITE_PNG_FILTER_UP,
    "paeth": cv2.IMWRITE_PNG_FILTER_PAETH,
    "avg": cv2.IMWRITE_PNG_FILTER_AVG,
}


def opencv_reference(data: bytes) -> np.ndarray:
    """libpng's decode, reordered from OpenCV's BGR(A) to PNG order."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array.ndim == 3 and array.shape[2] == 3:
        return array[..., ::-1]
    if array.ndim == 3 and array.shape[2] == 4:
        return array[..., [2, 1, 0, 3]]
    return array


def label_like(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Blocky maps (long runs, as label maps have) with noise in a corner (short runs)."""
    h, w = shape[:2]
    coarse = rng.integers(0, np.iinfo(dtype).max, ((h + 6) // 7, (w + 6) // 7) + shape[2:], endpoint=True).astype(dtype)
    out = np.repeat(np.repeat(coarse, 7, 0), 7, 1)[:h, :w].copy()
    out[: h // 3, : w // 3] = rng.integers(0, np.iinfo(dtype).max, out[: h // 3, : w // 3].shape, endpoint=True).astype(dtype)
    return out


@pytest.mark.parametrize("filter_name", list(FILTERS))
@pytest.mark.parametrize("dtype,channels", [(np.uint8, 1), (np.uint16, 1), (np.uint8, 3), (np.uint8, 4), (np.uint16, 3)])
def test_matches_libpng_for_every_opencv_filter(filter_name: str, dtype: np.dtype, channels: int) -> None:
    rng = np.random.default_rng(hash((filter_name, channels, np.dtype(dtype).itemsize)) % 2**32)
    for h, w in [(1, 1), (1, 17), (23, 1), (37, 53), (64, 64)]:
        array = label_like(rng, (h, w) if channels == 1 else (h, w, channels), dtype)
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, FILTERS[filter_name]]
        data = cv2.imencode(".png", array, params)[1].tobytes()
        decoded = decode_png(data)
        np.testing.assert_array_equal(decoded, opencv_reference(data))
        assert decoded.dtype == dtype and decoded.flags.writeable and decoded.flags.c_contiguous


def test_fast_path_covers_none_sub_up_and_leaves_paeth_to_opencv() -> None:
    array = label_like(np.random.default_rng(0), (40, 40), np.uint16)
    for name, expect_fast in [("none", True), ("sub", True), ("up", True), ("paeth", False), ("avg", False)]:
        data = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_FILTER, FILTERS[name]])[1].tobytes()
        assert (png._decode_fast(memoryview(data)) is not None) == expect_fast, name


def test_mixed_filter_rows_as_pil_writes_them() -> None:
    """PIL picks a filter per row (None/Sub/Up/Average/Paeth); rows of None/Sub/Up only stay on the fast path."""
    rng = np.random.default_rng(1)
    for _ in range(10):
        rgb = label_like(rng, (50, 61, 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        np.testing.assert_array_equal(decode_png(buffer.getvalue()), rgb)


def test_row_filters_mixed_by_hand() -> None:
    """Every None/Sub/Up row sequence (Up after Sub after None ...) reconstructs exactly: a PNG written here."""
    rng = np.random.default_rng(2)
    h, w = 12, 9
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    filters = rng.integers(0, 3, h)
    rows, previous = [], np.zeros((w, 3), np.uint8)
    for r in range(h):
        row = image[r]
        if filters[r] == 1:
            encoded = row - np.vstack([np.zeros((1, 3), np.uint8), row[:-1]])
        elif filters[r] == 2:
            encoded = row - previous
        else:
            encoded = row
        rows.append(bytes([int(filters[r])]) + encoded.astype(np.uint8).tobytes())
        previous = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    data = png.SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    assert png._decode_fast(memoryview(data)) is not None
    np.testing.assert_array_equal(decode_png(data), image)
    np.testing.assert_array_equal(opencv_reference(data), image)


def test_stdlib_zlib_gives_the_same_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    array = label_like(np.random.default_rng(3), (30, 31), np.uint16)
    data = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_FILTER, FILTERS["none"]])[1].tobytes()
    fast = decode_png(data)
    monkeypatch.setattr(png, "_inflater", zlib)
    np.testing.assert_array_equal(decode_png(data), fast)


def test_bad_bytes_raise_png_error() -> None:
    good = cv2.imencode(".png", np.arange(64, dtype=np.uint8).reshape(8, 8))[1].tobytes()
    for bad in [b"", b"not a png at all", good[:40], good[:8] + b"\0" * 30]:
        with pytest.raises(PNGError):
            decode_png(bad)
    corrupt = bytearray(good)
    corrupt[60:70] = b"\xff" * 10  # inside the IDAT stream: inflate fails, OpenCV refuses too
    with pytest.raises(PNGError):
        decode_png(bytes(corrupt))


def test_rgb_runs_of_opencv_files_match_the_decoded_map() -> None:
    from genpan.coco_panoptic import PanopticRuns, decode_panoptic_png
    from genpan.png import rgb_runs_fast

    rng = np.random.default_rng(6)
    for h, w in [(1, 1), (1, 30), (30, 1), (17, 23), (64, 80)]:
        rgb = label_like(rng, (h, w, 3), np.uint8)
        rgb[rng.random((h, w)) < 0.05] = 0  # void pixels and runs of zero differences
        data = cv2.imencode(".png", rgb[..., ::-1])[1].tobytes()  # OpenCV: every row Sub-filtered
        shape, starts, ids = rgb_runs_fast(data)
        expected = PanopticRuns.of_map(decode_panoptic_png(data))
        assert shape == (h, w)
        np.testing.assert_array_equal(starts, expected.starts)
        np.testing.assert_array_equal(ids, expected.ids)
    gray = cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()
    paeth = cv2.imencode(".png", rgb, [cv2.IMWRITE_PNG_FILTER, FILTERS["paeth"]])[1].tobytes()
    assert rgb_runs_fast(gray) is None and rgb_runs_fast(paeth) is None


def test_rgb_run_pairs_match_the_runs_of_both_decoded_maps() -> None:
    """rgb_run_pair_fast against the runs of the two maps libpng decodes: sizes whose buffers end on and
    off an 8-byte word, one-pixel images, rows ending in the colour the next row starts with, void
    (all-zero) pixels at row starts, ids with every byte used."""
    from genpan.coco_panoptic import decode_panoptic_png, row_run_starts
    from genpan.png import rgb_run_pair_fast

    rng = np.random.default_rng(9)
    shapes = [(1, 1), (1, 2), (2, 1), (1, 30), (30, 1), (3, 5), (8, 7), (17, 23), (64, 80), (5, 255)]
    for h, w in shapes:
        a = label_like(rng, (h, w, 3), np.uint8)
        b = a.copy()
        b[rng.random((h, w)) < 0.1] = rng.integers(0, 256, 3, dtype=np.uint8)  # the other map differs here and there
        a[rng.random((h, w)) < 0.05] = 0
        b[:, 0] = 0  # every row of the second map starts on void: its first bytes are zero
        a[1:, 0] = a[:-1, -1]  # a row starts with the colour the row above ends with: still a new run
        data_a, data_b = (cv2.imencode(".png", m[..., ::-1])[1].tobytes() for m in (a, b))
        shape, starts, ids_a, ids_b = rgb_run_pair_fast(data_a, data_b)
        map_a, map_b = decode_panoptic_png(data_a), decode_panoptic_png(data_b)
        expected = row_run_starts(map_a, map_b)
        assert shape == (h, w)
        np.testing.assert_array_equal(starts, expected)
        np.testing.assert_array_equal(ids_a, map_a.ravel()[expected])
        np.testing.assert_array_equal(ids_b, map_b.ravel()[expected])
        if h * w > 1:
            high = np.full((h, w, 3), 255, np.uint8)  # id 256³ − 1 everywhere but one pixel
            high[-1, -1] = (1, 128, 255)
            data_h = cv2.imencode(".png", high[..., ::-1])[1].tobytes()
            shape, starts, ids_h, ids_a2 = rgb_run_pair_fast(data_h, data_a)
            map_h = decode_panoptic_png(data_h)
            np.testing.assert_array_equal(starts, row_run_starts(map_h, map_a))
            np.testing.assert_array_equal(ids_h, map_h.ravel()[starts])
    other = cv2.imencode(".png", np.zeros((4, 5, 3), np.uint8))[1].tobytes()
    paeth = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8), [cv2.IMWRITE_PNG_FILTER, FILTERS["paeth"]])[1].tobytes()
    square = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()
    assert rgb_run_pair_fast(square, other) is None  # sizes differ
    assert rgb_run_pair_fast(square, paeth) is None and rgb_run_pair_fast(paeth, square) is None


def test_gray_alpha_and_palette_come_out_as_opencv_gives_them() -> None:
    rng = np.random.default_rng(7)
    gray = label_like(rng, (9, 11), np.uint8)
    for image in [Image.fromarray(np.stack([gray, 255 - gray], -1), mode="LA"), Image.fromarray(gray).convert("P")]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        np.testing.assert_array_equal(decode_png(buffer.getvalue()), opencv_reference(buffer.getvalue()))


def test_encoder_round_trips_through_libpng() -> None:
    from genpan.png import encode_gray_png

    rng = np.random.default_rng(8)
    for dtype in (np.uint8, np.uint16):
        for h, w in [(1, 1), (1, 9), (13, 1), (31, 47)]:
            array = label_like(rng, (h, w), dtype)
            for level in (0, 1, 6, 9):
                data = encode_gray_png(array, level)
                np.testing.assert_array_equal(opencv_reference(data), array)  # a PNG libpng accepts, CRCs included
                np.testing.assert_array_equal(decode_png(data), array)
                assert png._decode_fast(memoryview(data)) is not None
    for bad in [np.zeros((2, 2), np.int32), np.zeros((2, 2, 3), np.uint8), np.zeros((0, 4), np.uint8)]:
        with pytest.raises(ValueError):
            encode_gray_png(bad, 1)
    with pytest.raises(ValueError):
        encode_gray_png(np.zeros((2, 2), np.uint8), 10)
