"""Pseudo-label cache: teacher disparity per image in a zarr store, and the Ray Data stage that fills it.

Layout: `{cache}.zarr/{teacher slug}/{sample key}` = uint16 array (H, W), round(disparity·65535), the
encoding disp.zst stores. The teacher group's attributes hold the full identity; each entry's attributes
hold the hash of the image it was computed from and, written last, `complete = true`. An entry without
the marker (a run killed mid-write) or with another image hash is treated as absent and recomputed, so a
half-written entry is never read as valid. Keys are image ids and the group is the teacher identity:
re-sharding, or changing any other prep parameter, never reruns the teacher.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zarr

from genpan.prep.readers.base import SampleError, SampleRef
from genpan.prep.shards import decode_disparity, encode_disparity


def teacher_slug(identity: str) -> str:
    """A folder name for a teacher identity: readable prefix + hash (identities hold '/')."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", identity)[:40]
    return f"{readable}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


class DepthCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _root(self, mode: str) -> zarr.Group:
        return zarr.open_group(str(self.path), mode=mode)  # type: ignore[arg-type]

    def ensure_teacher(self, identity: str) -> None:
        """Create the teacher's group up front so concurrent writers only ever add arrays below it."""
        root = self._root("a")
        slug = teacher_slug(identity)
        group = root[slug] if slug in root else root.create_group(slug)
        if group.attrs.get("identity") != identity:
            group.attrs.update({"identity": identity})

    def get(self, key: str, identity: str, image_hash: str | None = None) -> np.ndarray | None:
        """Cached disparity in [0, 1] (float32), or None when absent, incomplete or for another image."""
        try:
            arr = zarr.open_array(str(self.path), path=f"{teacher_slug(identity)}/{key}", mode="r")  # type: ignore[arg-type]
            attrs = arr.attrs.asdict()
            if attrs.get("complete") is not True or (image_hash is not None and attrs.get("image_hash") != image_hash):
                return None
            return decode_disparity(arr[...])
        except Exception:  # missing or torn entry: recompute rather than trust it
            return None

    def has(self, key: str, identity: str, image_hash: str | None = None) -> bool:
        try:
            arr = zarr.open_array(str(self.path), path=f"{teacher_slug(identity)}/{key}", mode="r")  # type: ignore[arg-type]
            attrs = arr.attrs.asdict()
        except Exception:
            return False
        return attrs.get("complete") is True and (image_hash is None or attrs.get("image_hash") == image_hash)

    def put(self, key: str, identity: str, image_hash: str, disparity: np.ndarray) -> None:
        """Write the array, then mark it complete (the marker is the last thing written)."""
        stored = encode_disparity(disparity)
        arr = zarr.create_array(
            str(self.path),  # type: ignore[arg-type]
            name=f"{teacher_slug(identity)}/{key}",
            shape=stored.shape,
            dtype="uint16",
            chunks=stored.shape,
            overwrite=True,
        )
        arr[...] = stored
        arr.attrs.update({"image_hash": image_hash, "complete": True})


def decode_rgb(image_bytes: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("image is not decodable")
    return np.ascontiguousarray(img[..., ::-1])


class TeacherBatchWorker:
    """Ray Data callable class: loads the teacher once per actor, then predicts and caches batch by batch."""

    def __init__(self, reader_box: list[Any], teacher_kind: str, checkpoint: str, input_size: int, cache_path: str, identity: str) -> None:
        import ray

        from genpan.prep.teachers import make_teacher

        self.reader = ray.get(reader_box[0]) if isinstance(reader_box[0], ray.ObjectRef) else reader_box[0]
        teacher = make_teacher(teacher_kind, checkpoint, input_size)
        if teacher is None or teacher.identity != identity:
            raise RuntimeError(f"teacher identity changed while running: {identity} vs {teacher and teacher.identity}")
        self.teacher = teacher
        self.cache = DepthCache(cache_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys, statuses, images, hashes, depths, todo = [], [], [], [], [], []
        for blob in batch["ref"]:
            ref: SampleRef = pickle.loads(blob)
            keys.append(ref.key)
            sample = self.reader.load(ref)
            if isinstance(sample, SampleError):
                statuses.append(f"skipped: {sample}")
                continue
            try:
                images.append(decode_rgb(sample.image_bytes))
            except ValueError as exc:
                statuses.append(f"skipped: {sample.source_path}: {exc}")
                continue
            depths.append(sample.depth_m)
            hashes.append(sample.image_hash)
            todo.append(len(statuses))
            statuses.append("ok")
        if images:
            for i, disp, image_hash in zip(todo, self.teacher(images, depths), hashes):
                self.cache.put(keys[i], self.teacher.identity, image_hash, disp)
        return {"key": np.array(keys, dtype=object), "status": np.array(statuses, dtype=object)}


def fill_cache(
    refs: Sequence[SampleRef],
    reader: Any,
    teacher_kind: str,
    checkpoint: str,
    input_size: int,
    identity: str,
    cache_path: str | Path,
    batch_size: int = 8,
    num_gpus: float | None = None,
    concurrency: int = 1,
) -> dict[str, str]:
    """Run the teacher over `refs` as a Ray Data actor pool (`map_batches`), caching every result.

    `num_gpus=None` gives each actor one GPU when the cluster has GPUs. Returns {key: "ok" | "skipped: why"}.
    """
    import ray

    if not refs:
        return {}
    DepthCache(cache_path).ensure_teacher(identity)
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    reader_ref = ray.put(reader)
    ds = ray.data.from_items([{"ref": pickle.dumps(r)} for r in refs])
    ds = ds.map_batches(
        TeacherBatchWorker,
        fn_constructor_kwargs={
            "reader_box": [reader_ref],
            "teacher_kind": teacher_kind,
            "checkpoint": checkpoint,
            "input_size": input_size,
            "cache_path": str(Path(cache_path).resolve()),
            "identity": identity,
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=num_gpus,
        concurrency=concurrency,
    )
    return {str(row["key"]): str(row["status"]) for row in ds.take_all()}
