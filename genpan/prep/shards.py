"""Shard samples and deterministic WebDataset tar shards (the "Shard sample" contract, docs/architecture.md).

One sample = the source image bytes untouched (`jpg` or `png`), the label planes as zstd-compressed raw
arrays (genpan/planes.py): `sem.zst` (uint8 train ids, 255 = void), `ins.zst` (uint16 instance index),
`dist.zst` (round(d·dist_scale), uint8 by default, d = px to the nearest segment boundary, clipped),
optional `depth.zst` (uint16 mm) and `disp.zst` (uint16 disparity·65535); and `json` (key, size, the
planes' dtype and shape, source path and hashes, segment table, prep version, parameters, categories).

Determinism: tar members are written in a fixed order (samples sorted by key, fields in FIELD_ORDER)
with mtime 0, uid/gid 0, empty owner names and mode 0644; planes are compressed with a fixed zstd level
on one thread. The same inputs, parameters and zstandard version therefore give byte-identical shards.

Shard assignment (`assign_shards`) is content-defined chunking over the sorted keys: a shard ends after
a key whose hash falls in a 1/samples_per_shard bucket (with a minimum and maximum size). The cut points
depend only on the keys near them, so adding, removing or editing one image changes one shard (two when
the new key is itself a cut point), while sorted-order chunks of a fixed size would shift every later
shard and `hash(key) % n` would tie the shard count to the dataset size forever.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from genpan.labels import DEFAULT_DIST_CLIP, DEFAULT_DIST_SCALE
from genpan.planes import DEFAULT_LEVEL, MAX_LEVEL, encode_plane
from genpan.prep.readers.base import Category, Sample, canonical_json
from genpan.prep.targets import build_targets, check_distance_storage, encode_distance

# bump when the bytes a shard holds for the same inputs change (2: dist scale/uint8; 3: zstd planes, not PNG)
PREP_VERSION = "3"
PLANE_FIELDS = ("sem.zst", "ins.zst", "dist.zst", "depth.zst", "disp.zst")
FIELD_ORDER = ("jpg", "png", *PLANE_FIELDS, "json")
DISP_SCALE = 65535  # disp.zst stores round(disparity·65535), disparity in [0, 1]
DEPTH_MM_MAX = 65535
TMP_MARK = ".tmp-"  # temporary shard files: .{name}.tmp-{pid}


@dataclass(frozen=True)
class ShardParams:
    """Everything besides the source files that decides a shard's bytes; stored in every sample's json."""

    dist_clip: float = DEFAULT_DIST_CLIP
    zstd_level: int = DEFAULT_LEVEL  # zstd level of the label planes; part of the byte-exact output
    write_depth: bool = True  # depth.zst when the reader gives metric depth
    teacher: str = ""  # identity of the disparity teacher ("" = no disp.zst)
    dist_scale: int = DEFAULT_DIST_SCALE  # dist.zst = round(min(d, dist_clip)·dist_scale); uint8 when ≤ 255

    def __post_init__(self) -> None:
        try:
            check_distance_storage(self.dist_clip, self.dist_scale)
        except ValueError as exc:
            raise ValueError(f"shards.dist_clip / shards.dist_scale: {exc}") from None
        if not 1 <= self.zstd_level <= MAX_LEVEL:
            raise ValueError(f"shards.zstd_level must be 1..{MAX_LEVEL}, got {self.zstd_level}")

    def stored(self) -> dict[str, Any]:
        return {**asdict(self), "disp_scale": DISP_SCALE}


def params_digest(params: ShardParams, categories: Sequence[Category]) -> str:
    """Hash of the prep version, stored parameters and category table: a change rebuilds every shard."""
    payload = {"prep_version": PREP_VERSION, "params": params.stored(), "categories": category_table(categories)}
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def category_table(categories: Sequence[Category]) -> list[list[Any]]:
    """Compact [id, name, isthing, train_id] rows (kept small: every sample carries it)."""
    return [[c.id, c.name, int(c.isthing), c.train_id] for c in categories]


# -- encoding one sample ------------------------------------------------------------------------------
def encode_depth_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metric depth (m, 0 = none) → uint16 mm, saturating at 65.535 m."""
    return np.clip(np.rint(np.asarray(depth_m, np.float64) * 1000.0), 0, DEPTH_MM_MAX).astype(np.uint16)


def encode_disparity(disp: np.ndarray) -> np.ndarray:
    """Disparity in [0, 1] → uint16 round(d·65535)."""
    return np.rint(np.clip(np.asarray(disp, np.float64), 0.0, 1.0) * DISP_SCALE).astype(np.uint16)


def decode_disparity(stored: np.ndarray) -> np.ndarray:
    return np.asarray(stored, np.float32) / np.float32(DISP_SCALE)


def encode_sample(
    sample: Sample,
    categories: Sequence[Category],
    params: ShardParams,
    disparity: np.ndarray | None = None,
    source_root: str | Path | None = None,
) -> dict[str, bytes]:
    """All fields of one shard sample (without the key); raises ValueError when targets cannot be built.

    A sample without panoptic labels (NYUv2 depth, an image folder) has no sem/ins/dist fields and
    `"panoptic": false` in its json.
    """
    fields: dict[str, bytes] = {sample.image_ext: sample.image_bytes}
    planes: dict[str, dict[str, Any]] = {}

    def add_plane(name: str, array: np.ndarray) -> None:
        fields[name], planes[name] = encode_plane(array, params.zstd_level)

    segments: list[dict[str, Any]] = []
    if sample.pan_ids is not None:
        train_id_of = {c.id: c.train_id for c in categories}
        things = {c.id for c in categories if c.isthing}
        targets = build_targets(sample.pan_ids, sample.segments, train_id_of, things, params.dist_clip, sample.dense_index)
        add_plane("sem.zst", targets.sem)
        add_plane("ins.zst", targets.ins)
        add_plane("dist.zst", encode_distance(targets.dist, params.dist_clip, params.dist_scale))
        segments = targets.segments
    if params.write_depth and sample.depth_m is not None:
        add_plane("depth.zst", encode_depth_mm(sample.depth_m))
    if params.teacher:
        if disparity is None:
            raise ValueError(f"no disparity from teacher {params.teacher}")
        if disparity.shape != (sample.height, sample.width):
            raise ValueError(f"teacher disparity is {disparity.shape}, image is {(sample.height, sample.width)}")
        add_plane("disp.zst", encode_disparity(disparity))
    meta = {
        "key": sample.key,
        "dataset": sample.dataset,
        "height": sample.height,
        "width": sample.width,
        "planes": planes,
        "image_field": sample.image_ext,
        "source_path": relative_source(sample.source_path, source_root),
        "hashes": {
            "image": sample.image_hash,
            "label": sample.label_hash,
            "depth": sample.depth_hash,
            "source": sample.source_hash,
        },
        "panoptic": sample.pan_ids is not None,
        "segments": segments,
        "prep_version": PREP_VERSION,
        "params": params.stored(),
        "categories": category_table(categories),
    }
    fields["json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return fields


def relative_source(path: str, root: str | Path | None) -> str:
    """Source path relative to the data root when inside it, so shards do not depend on the mount point."""
    if root is None or not path:
        return path
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return path


# -- tar writing --------------------------------------------------------------------------------------
class _HashingFile:
    """Write-through wrapper that hashes and counts what tarfile writes."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def field_order(field: str) -> int:
    return FIELD_ORDER.index(field) if field in FIELD_ORDER else len(FIELD_ORDER)


def write_tar(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[int, str]:
    """Write samples (key, fields), given in increasing key order, as a tar atomically; returns (bytes, sha256).

    Samples stream through (a shard never sits in memory whole); the fixed order is checked, not made.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingFile(raw)
            # GNU format: long names get deterministic longname headers (no pax timestamps).
            with tarfile.open(fileobj=hashing, mode="w", format=tarfile.GNU_FORMAT) as tar:  # type: ignore[call-overload]
                last = None
                for key, fields in samples:
                    if last is not None and key <= last:
                        raise ValueError(f"shard samples must come in increasing key order: {key!r} after {last!r}")
                    last = key
                    for field in sorted(fields, key=lambda f: (field_order(f), f)):
                        data = fields[field]
                        tar.addfile(_tar_info(f"{key}.{field}", len(data)), io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashing.size, hashing.sha.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


# -- stable assignment of samples to shards -------------------------------------------------------------
def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def assign_shards(keys: Iterable[str], samples_per_shard: int, prefix: str = "shard") -> dict[str, list[str]]:
    """Group keys into shards by content-defined chunking; returns {shard file name: sorted keys}.

    A shard ends after a key whose hash is 0 mod `samples_per_shard` once it holds at least a quarter of
    `samples_per_shard` keys, and is forced to end at three times that. A shard is named after its first
    key, so names survive edits elsewhere in the dataset.
    """
    if samples_per_shard < 1:
        raise ValueError(f"shards.samples_per_shard must be >= 1, got {samples_per_shard}")
    check_name_part(prefix, "shards.prefix")
    min_size, max_size = max(1, samples_per_shard // 4), 3 * samples_per_shard
    shards: dict[str, list[str]] = {}
    current: list[str] = []

    def close() -> None:
        if current:
            shards[f"{prefix}-{current[0]}.tar"] = list(current)
            current.clear()

    for key in sorted(set(keys)):
        current.append(key)
        if len(current) >= max_size or (len(current) >= min_size and _key_hash(key) % samples_per_shard == 0):
            close()
    close()
    return shards


_SAMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def check_sample_key(key: str, where: str) -> str:
    """Reading shards: a member's key must be a plain sample key ([A-Za-z0-9_-], as prep writes them), so
    a hostile tar with an absolute or `..` member name can never name a file outside an output folder."""
    if not _SAMPLE_KEY.fullmatch(key or ""):
        raise ValueError(f"{where}: tar member key {key!r} is not a plain sample key (absolute path, '..' or '/' refused)")
    return key


def check_name_part(name: str, what: str) -> str:
    """A file name part given by a user must not leave the output directory."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or "\0" in name:
        raise ValueError(f"{what} must be a plain file name part (no '/', '..', leading '.'), got {name!r}")
    return name


def inside(out_dir: str | Path, name: str) -> Path:
    """`out_dir/name`, refusing absolute names and any that resolve outside `out_dir`."""
    out = Path(out_dir).resolve()
    if not name or Path(name).is_absolute():
        raise ValueError(f"shard path {name!r} must be relative to the output directory {out}")
    path = (out / name).resolve()
    if path != out and out not in path.parents:
        raise ValueError(f"shard path {name!r} leaves the output directory {out}")
    return path
