"""Where the shards are: `data.shards` → shard URLs, their sample count and the first sample's json.

`data.shards` is a local folder (its `*.tar`), a local brace or glob pattern, or any URL webdataset's
`gopen` opens, brace-expanded: `file:`, `pipe:` (a shell command writing the tar to stdout, e.g.
`pipe:aws s3 cp s3://bucket/coco-{000000..000099}.tar -`), `http(s):`, `gs:` and the other schemes it
knows. Local paths and `file:` URLs are checked up front; other URLs fail when a worker opens them.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds
from braceexpand import braceexpand

from genpan.prep.shards import PREP_VERSION

MANIFEST_NAME = "manifest.parquet"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # a scheme of two letters or more (not a Windows drive)


class ShardFormatError(ValueError):
    """Shards written by another prep version than this trainer reads."""


def local_path(url: str) -> Path | None:
    """The file a plain path or `file:` URL names; None for every other URL."""
    if not _URL.match(url):
        return Path(url)
    parsed = urlparse(url)
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else None


def _tars_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.tar") if not p.name.startswith("."))


def resolve_shards(spec: str) -> list[str]:
    """Shard URLs of `data.shards` (see the module docstring); FileNotFoundError names what is missing."""
    if not spec.strip():
        raise FileNotFoundError("data.shards is empty: give a shard folder, a pattern or URLs")
    if _URL.match(spec) and not spec.startswith("file:"):
        return list(braceexpand(spec))  # pipe:, http(s):, gs:, ... opened (and checked) by the workers
    if spec.startswith("file:"):
        urls = list(braceexpand(spec))
        folders = [p for p in map(local_path, urls) if p is not None and p.is_dir()]
        if len(urls) == 1 and folders:
            urls = [Path(p).resolve().as_uri() for p in _tars_in(folders[0])]
            if not urls:
                raise FileNotFoundError(f"data.shards: no *.tar shards in directory {spec}")
            return urls
    else:
        path = Path(spec)
        if path.is_dir():
            urls = _tars_in(path)
            if not urls:
                raise FileNotFoundError(f"data.shards: no *.tar shards in directory {spec}")
            return urls
        urls = sorted({m for pattern in braceexpand(spec) for m in (glob.glob(pattern) or [pattern])})
    missing = [u for u in urls if not local_path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"data.shards: shard file(s) not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return urls


def count_samples(urls: list[str]) -> int:
    """Samples in local shards: from manifest.parquet beside them when it lists them all, else by reading
    the tars' member names. Remote shards are not read end to end for a count: set data.epoch_size."""
    paths = [local_path(u) for u in urls]
    if any(p is None for p in paths):
        raise ValueError(f"data.epoch_size = 0 counts the samples, which needs local shards, got {urls[0]!r}: set "
                         "data.epoch_size to the number of samples (the 'count' column of prep's manifest.parquet sums to it)")
    manifest = paths[0].parent / MANIFEST_NAME
    if manifest.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(manifest, columns=["kind", "shard", "count"]).to_pylist()
        counts = {Path(r["shard"]).name: int(r["count"]) for r in table if r["kind"] == "shard"}
        if all(p.name in counts for p in paths):
            return sum(counts[p.name] for p in paths)
    keys = wds.DataPipeline(wds.SimpleShardList([str(p) for p in paths]),
                            wds.tarfile_to_samples(select_files=lambda name: name.endswith(".json")))
    return sum(1 for _ in keys)


def first_sample_meta(url: str) -> dict[str, Any]:
    """The json of the first sample of shard `url` (any URL); ValueError when it has none or it is unreadable."""
    samples = wds.tarfile_to_samples(select_files=lambda name: name.endswith(".json"))(iter([{"url": url}]))
    try:
        first = next(iter(samples), None)
    except Exception as exc:  # tarfile, OS and pipe errors alike: the user learns the shard and the reason
        raise ValueError(f"shard {url}: cannot be read as a tar ({type(exc).__name__}: {exc})") from None
    finally:
        samples.close()
    if first is None:
        raise ValueError(f"shard {url}: no sample json in it (is it a genpan shard?)")
    try:
        meta = json.loads(first["json"])
    except ValueError:
        raise ValueError(f"shard {url}: sample {first['__key__']} has an unreadable json") from None
    if not isinstance(meta, dict):
        raise ValueError(f"shard {url}: sample {first['__key__']} json is not an object")
    return meta


def check_prep_version(meta: dict[str, Any], where: str) -> None:
    """ShardFormatError, in one line, when a sample json comes from another prep version."""
    version = str(meta.get("prep_version", "?"))
    if version != PREP_VERSION:
        older = version.isdigit() and int(version) < int(PREP_VERSION)
        what = "label maps as PNG, " if older and int(version) < 3 else ""
        raise ShardFormatError(
            f"{where} was written by prep version {version} ({what}{'older' if older else 'not this one'}); this trainer "
            f"reads version {PREP_VERSION}: re-run prep/build_shards.py on the source data"
        )


def shard_categories(urls: list[str]) -> list[list[Any]]:
    """The category table `[[id, name, isthing, train_id], ...]` stored in the first sample's json.

    Every sample of a shard set carries the same table (it is part of the prep parameter digest), so the
    first one speaks for all; [] when the shards hold none (e.g. depth-only NYUv2).
    """
    return categories_of(first_sample_meta(urls[0]))


def categories_of(meta: dict[str, Any]) -> list[list[Any]]:
    """The category table of a sample json ([] when it holds none)."""
    return [list(c) for c in meta.get("categories", [])]
