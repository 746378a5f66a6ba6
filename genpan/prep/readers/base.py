"""The record types every reader yields, and the reader protocol.

A reader lists cheap `SampleRef`s (paths + annotation, no pixels) so a driver can assign samples to
shards up front, then `load(ref)` reads one sample in a worker and returns a `Sample`, or a
`SampleError` naming the file and the reason when the input is bad. Readers never raise for a bad
sample: the caller quarantines the error record and goes on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    isthing: bool
    train_id: int  # contiguous 0..C-1; 255 = not trained


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's files are, plus its JSON annotation; picklable and cheap."""

    key: str
    dataset: str
    image_path: str
    label_path: str | None = None
    depth_path: str | None = None
    segments: tuple[dict[str, Any], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. expected height/width, image id
    problem: str | None = None  # found while listing (duplicate id, ...): load() reports it


@dataclass
class Sample:
    key: str
    dataset: str
    image_bytes: bytes  # exactly as in the source
    image_ext: str  # "jpg" or "png"
    height: int
    width: int
    pan_ids: np.ndarray | None  # (H, W) int32 segment ids, 0 = void; None without panoptic labels
    segments: list[dict[str, Any]]  # COCO segments_info entries (id, category_id, iscrowd, area, bbox)
    depth_m: np.ndarray | None  # (H, W) float32 metric depth in metres, 0 = no measurement
    source_path: str
    image_hash: str
    label_hash: str  # "" when there is no label
    depth_hash: str  # "" when there is no depth
    # segment_index_map(pan_ids, [s["id"] for s in segments]) when the reader already built it to validate
    # the label (targets reuse it instead of a second pass over the map)
    dense_index: np.ndarray | None = None

    @property
    def source_hash(self) -> str:
        """One hash over everything the sample was built from."""
        return sha256_hex(f"{self.image_hash}:{self.label_hash}:{self.depth_hash}".encode())


@dataclass(frozen=True)
class SampleError:
    key: str
    dataset: str
    source_path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source_path}: {self.reason}"


class Reader(Protocol):
    name: str
    categories: list[Category]

    def refs(self) -> list[SampleRef]: ...

    def load(self, ref: SampleRef) -> Sample | SampleError: ...


def iterate(reader: Reader) -> Iterator[Sample | SampleError]:
    """Load every sample of a reader in order (single process)."""
    for ref in reader.refs():
        yield reader.load(ref)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def make_key(name: str) -> str:
    """A WebDataset-safe key: no dots (everything after a dot is an extension), no slashes."""
    key = _KEY_CHARS.sub("_", name)
    if not key:
        raise ValueError(f"cannot make a sample key from {name!r}")
    return key


def contiguous_train_ids(categories: list[dict[str, Any]]) -> list[Category]:
    """COCO convention: train ids 0..C-1 in order of category id."""
    cats = sorted(categories, key=lambda c: int(c["id"]))
    return [Category(int(c["id"]), str(c.get("name", c["id"])), bool(c.get("isthing", 0)), i) for i, c in enumerate(cats)]
