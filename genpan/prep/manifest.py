"""The manifest (`manifest.parquet` beside the shards) and the fingerprints a re-run compares with it.

One parquet table, a `kind` column telling the two row kinds apart:
- `sample` rows: key, shard, status ("ok" | "quarantined"), error, source_path, source_hash (the reader's
  hash of image + label + depth), image/label/depth hashes, fingerprint (what the planner compared).
- `shard` rows: shard (file name relative to the manifest), count (samples in the tar), quarantined,
  bytes, sha256, prep_version, inputs_digest (hash of the prep version, stored parameters and the
  fingerprints of the shard's samples: equal digest + equal checksum = the shard is current).
Run-level facts (prep version, parameters, parameter digest, dataset) are in the parquet schema metadata
under b"genpan". The file is written atomically (temp + fsync + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from genpan.atomic import atomic_write_bytes
from genpan.prep.readers.base import SampleRef, canonical_json
from genpan.prep.shards import relative_source

MANIFEST_NAME = "manifest.parquet"
HASH_CACHE_NAME = ".file_hashes.json"
OK, QUARANTINED = "ok", "quarantined"


@dataclass
class SampleRow:
    key: str
    shard: str
    status: str
    error: str | None = None
    source_path: str = ""
    source_hash: str = ""
    image_hash: str = ""
    label_hash: str = ""
    depth_hash: str = ""
    fingerprint: str = ""


@dataclass
class ShardRow:
    shard: str
    count: int
    quarantined: int
    bytes: int
    sha256: str
    prep_version: str
    inputs_digest: str


@dataclass
class Manifest:
    samples: list[SampleRow] = field(default_factory=list)
    shards: list[ShardRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def shard_by_name(self) -> dict[str, ShardRow]:
        return {s.shard: s for s in self.shards}

    def samples_by_key(self) -> dict[str, SampleRow]:
        return {s.key: s for s in self.samples}


_STRING_COLUMNS = ["key", "shard", "status", "error", "source_path", "source_hash", "image_hash", "label_hash",
                   "depth_hash", "fingerprint", "sha256", "prep_version", "inputs_digest"]
_INT_COLUMNS = ["count", "quarantined", "bytes"]
SCHEMA = pa.schema(
    [pa.field("kind", pa.string(), nullable=False)]
    + [pa.field(c, pa.string()) for c in _STRING_COLUMNS]
    + [pa.field(c, pa.int64()) for c in _INT_COLUMNS]
)


def _utf8(value: Any) -> Any:
    """Parquet strings are UTF-8: a file name that is not (kept by Python as surrogate escapes) is stored
    with its undecodable bytes written as \\xNN, so one odd name never fails the whole manifest."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def manifest_table(manifest: Manifest) -> pa.Table:
    rows: list[dict[str, Any]] = [{"kind": "shard", **asdict(s)} for s in sorted(manifest.shards, key=lambda s: s.shard)]
    rows += [{"kind": "sample", **asdict(s)} for s in sorted(manifest.samples, key=lambda s: s.key)]
    columns = {name: [_utf8(r.get(name)) for r in rows] for name in SCHEMA.names}
    meta = {b"genpan": json.dumps(manifest.meta, sort_keys=True).encode()}
    return pa.Table.from_pydict(columns, schema=SCHEMA.with_metadata(meta))


def write_manifest(path: str | Path, manifest: Manifest) -> Path:
    sink = pa.BufferOutputStream()
    pq.write_table(manifest_table(manifest), sink, compression="zstd")
    return atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_manifest(path: str | Path) -> Manifest | None:
    """The manifest at `path`, or None when there is none yet; ValueError naming the file when unreadable."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable parquet manifest ({exc}); delete it to rebuild every shard") from None
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}")
    raw_meta = (table.schema.metadata or {}).get(b"genpan", b"{}")
    manifest = Manifest(meta=json.loads(raw_meta))
    sample_names = [f.name for f in fields(SampleRow)]
    shard_names = [f.name for f in fields(ShardRow)]
    for row in table.to_pylist():
        if row["kind"] == "sample":
            manifest.samples.append(SampleRow(**{n: row[n] for n in sample_names}))
        elif row["kind"] == "shard":
            manifest.shards.append(ShardRow(**{n: row[n] for n in shard_names}))
    return manifest


# -- change detection -----------------------------------------------------------------------------------
class FileHashCache:
    """sha256 of source files, reused while (size, mtime_ns) is unchanged so a cron run mostly just stats."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, list[Any]] = {}
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (ValueError, OSError):
                self.entries = {}  # a cache: losing it costs time, not correctness
        self._loaded = dict(self.entries)

    def hash_files(self, paths: Iterable[str], threads: int = 8) -> dict[str, str]:
        unique = sorted({p for p in paths if p})
        with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL on large buffers
            return dict(zip(unique, pool.map(self._hash_one, unique)))

    def _hash_one(self, path: str) -> str:
        try:
            st = os.stat(path)
        except OSError:
            return "missing"
        cached = self.entries.get(path)
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return str(cached[2])
        sha = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    sha.update(block)
        except OSError:
            return "unreadable"
        digest = sha.hexdigest()
        self.entries[path] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def changed(self) -> bool:
        return self.entries != self._loaded

    def save(self) -> None:
        if self.changed():
            atomic_write_bytes(self.path, json.dumps(self.entries, sort_keys=True).encode())
            self._loaded = dict(self.entries)


def ref_fingerprint(ref: SampleRef, file_hashes: dict[str, str], data_root: str | Path | None) -> str:
    """Hash of everything a sample is built from, computable without decoding it."""
    paths = {"image": ref.image_path, "label": ref.label_path, "depth": ref.depth_path}
    payload = {
        "key": ref.key,
        "dataset": ref.dataset,
        "files": {k: [relative_source(p, data_root), file_hashes.get(p, "missing")] for k, p in paths.items() if p},
        "segments": list(ref.segments),
        "meta": ref.meta,
        "problem": ref.problem,
    }
    # default=str: reader meta may hold non-JSON values (numpy ints); their text is stable enough to compare.
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def shard_inputs_digest(params_digest: str, fingerprints: list[tuple[str, str]]) -> str:
    """Digest of one shard's inputs: the run parameters plus (key, fingerprint) of each sample, sorted."""
    return hashlib.sha256(canonical_json({"params": params_digest, "samples": sorted(fingerprints)})).hexdigest()
