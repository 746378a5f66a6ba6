"""Streaming loader over the WebDataset shards (shard contract in docs/architecture.md).

    cfg = DataConfig(shards="data/shards/synthetic/train", micro_batch=8, size=[112, 112])
    stream = BatchStream(cfg, rank=0, world_size=1, seed=0)
    batch = to_device(next(stream), device)        # padded CPU batch → device
    images, targets = augmenter(batch)             # genpan/train/augment.py, on the device

A stock `torch.utils.data.DataLoader` (pinned memory on GPU, persistent workers) over an IterableDataset
whose every worker runs a webdataset pipeline: shard URLs → `tarfile_to_samples` (webdataset's tar reader
and URL openers: local files, `file:`, `pipe:`, `http(s):`, ...) → shuffle buffer → parse the json →
batch → decode every field into the padded batch (genpan/train/samples.py, genpan/train/batch.py).
- Shards, `resampled = true` (default): each (rank, worker) draws shards with replacement
  (`wds.ResampledShards`, seeded per (seed, rank, worker, epoch)), and every worker yields the same number
  of batches per epoch, so every rank gets the same number of batches whatever the shard sizes (no rank
  waits on another at an epoch end). `resampled = false`: each (rank, worker) reads a disjoint slice of
  the shards (webdataset's split_by_node + split_by_worker, with rank and worker given explicitly), in a
  reshuffled order each round; needs shards ≥ world size × workers.
- One DataLoader iterator serves the whole run: each worker loops over epochs itself, and the DataLoader
  takes batch i from worker i mod workers, so (epoch, batch index) names one batch of the stream.
- Determinism and exact resume: every random choice comes from seeds mixed from (seed, rank, worker,
  epoch); a run resumed at (epoch, batch index) rebuilds the same stream, and each worker skips the raw
  samples of the batches it had already produced before decoding them (`BatchStream.state_dict` /
  `load_state_dict`).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import select
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from genpan.train.batch import collate, decode_sample
from genpan.train.batch_buffers import BufferRing, new_flags, release_when_dropped
from genpan.train.samples import parse_sample, wanted_fields
from genpan.train.shard_urls import check_prep_version, count_samples, first_sample_meta, local_path, resolve_shards, shard_categories

__all__ = ["DataConfig", "BatchStream", "ShardStream", "collate", "count_samples", "decode_sample", "mix_seed",
           "resolve_shards", "shard_categories", "to_device"]

DEPTH_TARGETS = ("none", "disp", "depth")
PREFETCH = 2  # batches each worker keeps ready


@dataclass
class DataConfig:
    """Schema of the `[data]` config section.

    shards: a folder of `*.tar` shards, a brace/glob pattern ("/data/coco-{000000..000099}.tar"), or URLs webdataset
    opens ("pipe:aws s3 cp s3://bucket/coco-{000000..000099}.tar -", "https://host/coco-{0000..0099}.tar", "file:...").
    micro_batch: images per rank per micro-step (the effective batch is set in [optim]).
    size: [H, W] of the augmented training images, multiples of the backbone's patch p (checked by TrainConfig;
    the loss grid is 8·H/p).
    scale_min / scale_max: the random scale on top of the factor that makes the image cover H×W.
    epoch_size: samples in one epoch; 0 = from manifest.parquet beside local shards, else counted in the tars
    (URL shards need it set).
    depth: "none", "disp" (disp.zst, affine-invariant loss) or "depth" (depth.zst metres, SILog).
    pad_dist: boundary distance (loss px) given to padding outside the image: far from any edge.
    """

    shards: str = "data/shards/synthetic/train"
    micro_batch: int = 8
    size: list[int] = field(default_factory=lambda: [112, 112])
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip_prob: float = 0.5
    shuffle_buffer: int = 256
    shuffle_initial: int = 64
    num_workers: int = 2
    resampled: bool = True
    epoch_size: int = 0
    depth: str = "none"
    pad_dist: float = 1000.0

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(s <= 0 for s in self.size):
            raise ValueError(f"data.size must be [H, W], positive, got {self.size}")
        if self.micro_batch < 1 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data.micro_batch and data.shuffle_buffer must be >= 1, data.num_workers >= 0")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"data.scale_min/scale_max need 0 < min <= max, got {self.scale_min}, {self.scale_max}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"data.flip_prob must lie in [0, 1], got {self.flip_prob}")
        if self.depth not in DEPTH_TARGETS:
            raise ValueError(f"data.depth must be one of {DEPTH_TARGETS}, got {self.depth!r}")


# -- the per-worker pipeline ----------------------------------------------------------------------------
def _local_members(path: Path, url: str, selected: Callable[[str], bool]) -> Iterator[dict[str, Any]]:
    """webdataset's member records (fname, data, __url__, then {} at the shard's end) of a local tar, read
    with tarfile's random access: the stream mode webdataset needs for URLs parses each member through a
    Python buffer and costs 2.3× the CPU (0.545 vs 0.240 ms per sample at 128-256 px, docs/performance.md)."""
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isreg() and selected(member.name):
                # a regular member's bytes lie contiguous at offset_data: one read, no file object per member
                tar.fileobj.seek(member.offset_data)  # type: ignore[union-attr]
                data = tar.fileobj.read(member.size)  # type: ignore[union-attr]
                if len(data) != member.size:
                    raise tarfile.ReadError(f"unexpected end of data in {member.name}")
                yield {"fname": member.name, "data": data, "__url__": url}
            tar.members = []  # a long shard's headers are not kept
    yield {}


def read_shards(shards: Iterator[dict[str, str]], fields: set[str]) -> Iterator[dict[str, Any]]:
    """Samples of each shard URL in turn (only the members in `fields`), grouped by webdataset; a shard
    that cannot be read is a one-line ValueError naming it."""
    def selected(name: str) -> bool:  # webdataset's field: everything after the first dot of the base name
        return name.rsplit("/", 1)[-1].partition(".")[2] in fields

    for shard in shards:
        url = shard["url"]
        path = local_path(url)
        try:
            if path is not None:
                yield from wds.tariterators.group_by_keys(_local_members(path, url, selected))
            else:
                yield from wds.tarfile_to_samples(select_files=selected)(iter([{"url": url}]))
        except ValueError:  # a sample-level error (e.g. a duplicate member) names itself
            raise
        except Exception as exc:  # tarfile, OS, pipe and HTTP errors: one line with the shard and the reason
            raise ValueError(f"shard {url}: cannot be read as a tar ({type(exc).__name__}: {exc})") from None


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    return int.from_bytes(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32).tobytes(), "little") >> 1


def disjoint_shards(urls: list[str], rank: int, world_size: int, worker: int, workers: int, rng: random.Random) -> Iterator[dict[str, str]]:
    """split_by_node + split_by_worker with an explicit rank and (logical) worker, repeated for ever in a
    freshly shuffled order each round. Explicit, not webdataset's nodesplitter: after a resume a physical
    worker plays another logical worker, which webdataset's worker_info-based split cannot know."""
    mine = urls[rank::world_size][worker::workers]
    if not mine:
        raise ValueError(
            f"data.resampled = false needs at least world size × workers = {world_size * workers} shards, got {len(urls)}"
        )
    while True:
        order = list(mine)
        rng.shuffle(order)
        yield from ({"url": u} for u in order)


def batches_consumed_by_worker(consumed: int, worker: int, workers: int) -> int:
    """The DataLoader takes batch i from worker i mod workers: how many of the first `consumed` were worker's."""
    return max(0, -(-(consumed - worker) // workers))


class ShardStream(torch.utils.data.IterableDataset):
    """Endless stream of collated batches from (start_epoch, start_index) on; each worker yields
    `batches_per_worker` per epoch."""

    def __init__(self, urls: list[str], cfg: DataConfig, rank: int, world_size: int, seed: int, batches_per_worker: int,
                 start_epoch: int = 0, start_index: int = 0, buffer_flags: Tensor | None = None) -> None:
        super().__init__()
        self.urls, self.cfg, self.rank, self.world_size, self.seed = urls, cfg, rank, world_size, seed
        self.batches_per_worker = batches_per_worker
        self.start_epoch, self.start_index = start_epoch, start_index  # start_index: batches of start_epoch already consumed
        self.buffer_flags = buffer_flags  # workers × slots, genpan/train/batch_buffers.py; None: a private buffer per batch
        self.trainer_pid = os.getpid()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        if info:
            cv2.setNumThreads(1)  # one decode per worker process; no thread pool fighting the trainer
            _share_batches_by_name()
            _exit_with(self.trainer_pid)
        # The DataLoader asks physical worker 0 first; after start_index batches the next one belongs to
        # logical worker start_index mod workers, so physical worker p plays logical (p + start_index) mod workers.
        worker = (physical + self.start_index) % workers
        skip = batches_consumed_by_worker(self.start_index, worker, workers)
        ring = BufferRing(self.buffer_flags, physical) if info and self.buffer_flags is not None else None
        for epoch in itertools.count(self.start_epoch):
            yield from self._epoch(worker, workers, epoch, skip, ring)
            skip = 0

    def _epoch(self, worker: int, workers: int, epoch: int, skip: int, ring: BufferRing | None) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        base = (self.seed, self.rank, worker, epoch)
        if cfg.resampled:
            shards: Any = wds.ResampledShards(self.urls, seed=mix_seed(*base, 1), worker_seed=lambda: 0, deterministic=True)
        else:
            rng = random.Random(mix_seed(*base, 1))
            shards = partial(disjoint_shards, self.urls, self.rank, self.world_size, worker, workers, rng)
        pipeline = wds.DataPipeline(
            shards,
            partial(read_shards, fields=wanted_fields(cfg.depth)),
            wds.shuffle(cfg.shuffle_buffer, min(cfg.shuffle_initial, cfg.shuffle_buffer), rng=random.Random(mix_seed(*base, 2))),
            # resume: drop the raw samples of batches already trained on, before paying for their decode
            lambda samples: itertools.islice(samples, skip * cfg.micro_batch, None),
            wds.map(partial(parse_sample, depth=cfg.depth)),  # the pixels are decoded into the batch
            wds.batched(cfg.micro_batch, collation_fn=partial(collate, allocate=ring.allocate) if ring else collate, partial=False),
            *([partial(map, ring.tag)] if ring else []),  # not wds.map: it would add a "__key__": None to the batch
        )
        yield from itertools.islice(pipeline, max(0, self.batches_per_worker - skip))


def _share_batches_by_name() -> None:
    """In a DataLoader worker: hand batches to the trainer's process by shared-memory file name. Under the
    default fd strategy every batch's fd travels over a fresh authenticated socket connection to the
    worker's resource-sharer thread; by name, the trainer opens the segment itself. Worker + trainer CPU
    per small image 1.07-1.32 -> 0.89-1.23 ms over alternated runs (docs/performance.md). The process is ours, so the
    process-wide setting touches nothing else; torch_shm_manager unlinks the segments of a killed worker."""
    if "file_system" in torch.multiprocessing.get_all_sharing_strategies():
        torch.multiprocessing.set_sharing_strategy("file_system")


def _exit_with(pid: int) -> None:
    """In a DataLoader worker: end this process when the trainer's process `pid` ends. torch's own watchdog
    compares the parent pid, but a forkserver worker's parent is the fork server, which every worker keeps
    alive: a SIGKILLed or OOM-killed trainer would leave its workers (and their shared memory) for ever."""
    if os.getppid() == pid:  # a direct child (fork, spawn): torch's watchdog sees the trainer go
        return

    def watch() -> None:
        try:
            with os.fdopen(os.pidfd_open(pid), "rb") as handle:  # Linux: readable once the process has ended
                select.select([handle], [], [])
        except (AttributeError, OSError):  # no pidfd here: poll
            try:
                while True:
                    os.kill(pid, 0)
                    time.sleep(1.0)
            except ProcessLookupError:
                pass
            except OSError:  # not ours to signal: nothing to watch
                return
        os._exit(0)

    threading.Thread(target=watch, name="genpan-trainer-watch", daemon=True).start()


def _worker_context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: spawn, the only clean start there
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["genpan.train.data"])  # workers fork from a server that has torch and cv2 imported
    return context


class BatchStream:
    """The trainer's view: `next(stream)` gives CPU batches forever, tracking (epoch, batch in epoch)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0, pin_memory: bool = False) -> None:
        self.cfg, self.rank, self.world_size, self.seed, self.pin_memory = cfg, rank, world_size, seed, pin_memory
        self.urls = resolve_shards(cfg.shards)
        # old shards fail here in one line, before any worker starts; the trainer reads the categories from it too
        self.first_meta = first_sample_meta(self.urls[0])
        check_prep_version(self.first_meta, f"shard {self.urls[0]}")
        self.epoch_size = cfg.epoch_size or count_samples(self.urls)
        workers = max(cfg.num_workers, 1)
        if not cfg.resampled and len(self.urls) < world_size * workers:
            raise ValueError(
                f"data.resampled = false needs at least world size × workers = {world_size * workers} shards, "
                f"got {len(self.urls)} in {cfg.shards}"
            )
        per_rank = max(1, self.epoch_size // (cfg.micro_batch * world_size))
        self.batches_per_worker = -(-per_rank // workers)
        self.batches_per_epoch = self.batches_per_worker * workers
        self.epoch, self.index = 0, 0
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._buffer_flags: Tensor | None = None

    def _loader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        # queue depth (prefetch 2) + the batch the trainer holds + the one it is about to drop
        self._buffer_flags = new_flags(cfg.num_workers, PREFETCH + 2) if cfg.num_workers else None
        dataset = ShardStream(self.urls, cfg, self.rank, self.world_size, self.seed, self.batches_per_worker, self.epoch, self.index,
                              self._buffer_flags)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=cfg.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=cfg.num_workers > 0,
            prefetch_factor=PREFETCH if cfg.num_workers else None,
            # fork copies a parent whose OpenCV/OpenMP thread pools may be live: a forked worker that touches
            # them hangs for ever (seen here: cv2.setNumThreads in the child). forkserver children start clean.
            multiprocessing_context=_worker_context() if cfg.num_workers else None,
        )

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = iter(self._loader())
        try:
            batch = next(self._iterator)
        except ValueError as exc:
            raise _worker_error(exc) from exc
        if self._buffer_flags is not None:
            batch = release_when_dropped(batch, self._buffer_flags)
        self.index += 1
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def close(self) -> None:
        """Stop the workers (a later `next` starts new ones at the current position)."""
        self._iterator = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.close()


def _worker_error(exc: ValueError) -> ValueError:
    """A ValueError a DataLoader worker raised (a damaged sample, as a rule) comes back with the worker's
    whole traceback in its message; keep the worker's own message, which names the sample and field."""
    text = str(exc)
    if "Original Traceback" not in text:  # raised in this process: as it is
        return exc
    last = text.rstrip().splitlines()[-1]
    name, sep, message = last.partition(": ")  # "ValueError: sample k2: ..." or "genpan....ShardFormatError: ..."
    if sep and name.rsplit(".", 1)[-1].endswith("Error"):
        last = message
    return ValueError(last + " (in a loader worker)")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
