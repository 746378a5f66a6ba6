"""Label-plane codecs for the shards: bytes per sample and decode time at COCO-like sizes.

    python bench/label_codec.py                  # the two real COCO val2017 samples + 40 synthetic scenes
    python bench/label_codec.py --scenes 100 --repeats 5

The planes of one sample (sem uint8, ins uint16, dist uint8, as prep writes them) are built from real
COCO panoptic ground truth (tests/data/coco_panoptic, panopticapi's sample data) and from synthetic scenes
of 480-640 px, then stored with each codec:
- png-cv2-N:  PNG written and read by OpenCV (libpng), zlib level N, OpenCV's default filter choice;
- png-cv2-N-none: the same with the None filter only (long runs of equal bytes stay runs for zlib);
- zstd-N:     the raw array compressed with zstandard level N, dtype and shape kept beside it.
Per codec: bytes per sample, encode and decode ms per sample (best of --repeats, 1 thread), each codec's
decode time over png-cv2-1's, and that every codec round-trips the planes exactly. The last line names
the ratio of zstd-3's decode time to OpenCV PNG's:
RESULT zstd_decode_over_png=<ratio>
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from genpan.coco_panoptic import load_panoptic_json, read_panoptic_png
from genpan.prep.readers.base import contiguous_train_ids
from genpan.prep.synthetic import SceneConfig, make_scene
from genpan.prep.targets import build_targets, encode_distance

COCO_SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco_panoptic"
Planes = list[np.ndarray]


def real_planes() -> list[Planes]:
    """sem, ins, dist of the real COCO samples kept in tests/data."""
    data = load_panoptic_json(COCO_SAMPLES / "annotations" / "panoptic_val2017.json")
    cats = contiguous_train_ids(data["categories"])
    train_of, things = {c.id: c.train_id for c in cats}, {c.id for c in cats if c.isthing}
    out = []
    for ann in data["annotations"]:
        pan = read_panoptic_png(COCO_SAMPLES / "annotations" / "panoptic_val2017" / ann["file_name"])
        t = build_targets(pan, ann["segments_info"], train_of, things)
        out.append([t.sem, t.ins, encode_distance(t.dist)])
    return out


def synthetic_planes(count: int, seed: int) -> list[Planes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        scene = make_scene(rng, SceneConfig(min_size=480, max_size=640))
        t = build_targets(scene.pan_ids, scene.segments, {c: c for c in range(256)}, set(range(1, 256)))
        out.append([t.sem, t.ins, encode_distance(t.dist)])
    return out


def png_codec(level: int, none_filter: bool) -> tuple[Callable, Callable]:
    params = [cv2.IMWRITE_PNG_COMPRESSION, level] + ([cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE] if none_filter else [])

    def encode(plane: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".png", plane, params)
        assert ok
        return buf.tobytes()

    def decode(blob: bytes, like: np.ndarray) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)

    return encode, decode


def zstd_codec(level: int) -> tuple[Callable, Callable]:
    import zstandard

    compressor, decompressor = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()

    def encode(plane: np.ndarray) -> bytes:
        return compressor.compress(np.ascontiguousarray(plane).tobytes())

    def decode(blob: bytes, like: np.ndarray) -> np.ndarray:
        return np.frombuffer(decompressor.decompress(blob), like.dtype).reshape(like.shape)

    return encode, decode


def measure(samples: list[Planes], encode: Callable, decode: Callable, repeats: int) -> tuple[float, float, float, bool]:
    """(bytes, encode ms, decode ms) per sample and whether every plane round-trips exactly."""
    best_enc = best_dec = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        blobs = [[encode(p) for p in planes] for planes in samples]
        best_enc = min(best_enc, time.perf_counter() - start)
        start = time.perf_counter()
        decoded = [[decode(b, p) for b, p in zip(bs, planes)] for bs, planes in zip(blobs, samples)]
        best_dec = min(best_dec, time.perf_counter() - start)
    exact = all(np.array_equal(d, p) and d.dtype == p.dtype for ds, ps in zip(decoded, samples) for d, p in zip(ds, ps))
    n = len(samples)
    return sum(len(b) for bs in blobs for b in bs) / n, 1e3 * best_enc / n, 1e3 * best_dec / n, exact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=40, help="synthetic 480-640 px scenes besides the real samples")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    try:
        import zstandard  # noqa: F401
    except ImportError:
        print("error: this benchmark needs zstandard (pip install zstandard)", file=sys.stderr)
        return 2
    sets = {"real COCO (2)": real_planes(), f"synthetic ({args.scenes})": synthetic_planes(args.scenes, args.seed)}
    codecs = {
        "png-cv2-1": png_codec(1, False),
        "png-cv2-1-none": png_codec(1, True),
        "png-cv2-3": png_codec(3, False),
        "zstd-1": zstd_codec(1),
        "zstd-3": zstd_codec(3),
        "zstd-9": zstd_codec(9),
    }
    ratio = float("nan")
    for title, samples in sets.items():
        pixels = np.mean([p[0].size for p in samples])
        print(f"\n{title}: sem+ins+dist planes, mean {pixels / 1e3:.0f} kpx per sample")
        print(f"{'codec':16s} {'bytes/sample':>12s} {'encode ms':>10s} {'decode ms':>10s} {'decode/png':>11s} exact")
        rows = {name: measure(samples, enc, dec, args.repeats) for name, (enc, dec) in codecs.items()}
        base = rows["png-cv2-1"][2]
        for name, (size, enc_ms, dec_ms, exact) in rows.items():
            print(f"{name:16s} {size:12.0f} {enc_ms:10.3f} {dec_ms:10.3f} {dec_ms / base:11.2f} {exact}")
        if title.startswith("synthetic"):
            ratio = rows["zstd-3"][2] / base
    print(f"RESULT zstd_decode_over_png={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
