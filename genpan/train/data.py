"""Streaming loader over the WebDataset shards (shard contract in docs/architecture.md).

    cfg = DataConfig(shards="data/shards/synthetic/train", micro_batch=8, size=[112, 112])
    stream = BatchStream(cfg, rank=0, world_size=1, seed=0)
    batch = to_device(next(stream), device)        # padded CPU batch → device
    images, targets = augmenter(batch)             # genpan/train/augment.py, on the device

Pipeline per DataLoader worker: shard source → tar → shuffle buffer → parse (sizes, json) → batch →
decode every field straight into the batch buffer (OpenCV JPEG, genpan.png label maps).
- Shard source, `resampled = true` (default): each (rank, worker) draws shards with replacement from its
  own seeded RNG, and `with_epoch` cuts the endless stream into equal per-worker epochs, so every rank
  gets the same number of batches whatever the shard sizes (no rank waits on another at an epoch end).
  `resampled = false`: `split_by_node` + `split_by_worker` give each (rank, worker) a disjoint slice of
  the shards, read round after round in a reshuffled order; needs shards ≥ world size × workers.
- Collation pads the variable-sized images of a batch to the batch maximum (void labels, zero image) and
  keeps each image's true size. No CPU resize: the random scale and crop happen on the training device
  in one `grid_sample` per batch (genpan/train/augment.py), and resizing on the CPU first would resample twice.
- Hand-over (with workers): each worker writes its batches into a few shared-memory slots it reuses
  (`SlotPool`) and sends only keys, layout and slot number (the slot's descriptor once); the trainer maps
  each slot once (`SlotReceiver`). A slot is free again when the last tensor viewing its batch is freed,
  so nothing the trainer can still read is overwritten; a worker with no free slot makes a new one.
  The image is stored HWC as decoded and handed out as a (B, 3, H, W) channels-last view.
- Determinism: every random choice comes from seeds derived from (seed, rank, worker, epoch), so a run
  resumed at (epoch, batch index) rebuilds the same stream and skips the consumed raw samples before
  decoding them (`BatchStream.state_dict` / `load_state_dict`).
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import multiprocessing
import os
import random
import tarfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch import Tensor

from genpan.labels import DIST_SCALE, DIST_SCALES, IGNORE
from genpan.png import PNGError, decode_png_view, png_size
from genpan.prep.shards import DISP_SCALE, check_sample_key
from genpan.train.tar_samples import tar_samples

DEPTH_TARGETS = ("none", "disp", "depth")
MANIFEST_NAME = "manifest.parquet"


@dataclass
class DataConfig:
    """Schema of the `[data]` config section.

    shards: a directory of `*.tar` shards or a brace pattern ("/data/coco-{000000..000099}.tar").
    micro_batch: images per rank per micro-step (the effective batch is set in [optim]).
    size: [H, W] of the augmented training images, multiples of the backbone's patch p (checked by TrainConfig;
    the loss grid is 8·H/p).
    scale_min / scale_max: the random scale on top of the factor that makes the image cover H×W.
    epoch_size: samples in one epoch; 0 = from manifest.parquet beside the shards, else counted in the tars.
    depth: "none", "disp" (disp.png, affine-invariant loss) or "depth" (depth.png metres, SILog).
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


# -- shard files --------------------------------------------------------------------------------------
def resolve_shards(spec: str) -> list[str]:
    """Shard paths of a directory (its *.tar, sorted) or a brace/glob pattern; FileNotFoundError names the spec."""
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar") if not p.name.startswith("."))
        if not urls:
            raise FileNotFoundError(f"data.shards: no *.tar shards in directory {spec}")
        return urls
    urls = sorted({m for pattern in braceexpand(spec) for m in (glob.glob(pattern) or [pattern])})
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"data.shards: shard file(s) not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return urls


def count_samples(urls: list[str]) -> int:
    """Samples in the shards: from manifest.parquet beside them when it lists them all, else by tar headers."""
    manifest = Path(urls[0]).parent / MANIFEST_NAME
    if manifest.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(manifest, columns=["kind", "shard", "count"]).to_pylist()
        counts = {Path(r["shard"]).name: int(r["count"]) for r in table if r["kind"] == "shard"}
        names = [Path(u).name for u in urls]
        if all(n in counts for n in names):
            return sum(counts[n] for n in names)
    total = 0
    for url in urls:
        with tarfile.open(url) as tar:
            total += len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return total


def shard_categories(urls: list[str]) -> list[list[Any]]:
    """The category table `[[id, name, isthing, train_id], ...]` stored in the first sample's json.

    Every sample of a shard set carries the same table (it is part of the prep parameter digest), so the
    first one speaks for all; [] when the shards hold none (e.g. depth-only NYUv2).
    """
    with tarfile.open(urls[0]) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                data = json.loads(tar.extractfile(member).read())
                return [list(c) for c in data.get("categories", [])]
    return []


# -- decoding (in the DataLoader workers) ---------------------------------------------------------------
# A sample is read in two steps: `parse_sample` reads what the batch layout needs (sizes from the PNG
# header, crowd flags and scales from the json) when the sample leaves the shuffle buffer, and
# `decode_into` decodes every field straight into its place in the batch buffer, converting to the batch
# dtype in the same pass. Decoding into per-sample arrays first and copying them into the batch cost a
# second (ins, dist: a third) pass over every map, a fifth of a worker's time at 128-256 px.
INT16_MAX = np.iinfo(np.int16).max
IMAGE_FIELDS = ("jpg", "png")
LABEL_FIELDS = ("sem.png", "ins.png", "dist.png")
MAX_SIDE = 1 << 15  # pixels on an image side the loader accepts (COCO ≤ 640, Cityscapes 2048)
Spec = dict[str, tuple[tuple[int, ...], torch.dtype, float]]  # field → (stored shape, dtype, void value)
Layout = dict[str, tuple[int, tuple[int, ...], torch.dtype]]  # field → (byte offset, stored shape, dtype)


@dataclass
class ParsedSample:
    """A raw sample whose header fields are read and checked; its pixels are not decoded yet."""

    key: str
    raw: dict[str, Any]
    height: int
    width: int
    crowd: np.ndarray  # (max instance index + 1,) bool, crowd flag per instance index
    dist_factor: int  # stored dist.png unit → the batch's 1/DIST_SCALE px
    depth: str  # "none", "disp" or "depth" (data.depth)

    @property
    def image_bytes(self) -> bytes:
        return _image_bytes(self.raw)


def _image_bytes(raw: dict[str, Any]) -> bytes | None:
    """The sample's image member (jpg, else png); None when it has neither."""
    return next((raw[name] for name in IMAGE_FIELDS if raw.get(name) is not None), None)


def _read_meta(meta: dict[str, Any]) -> tuple[list[int], list[int], int]:
    """(instance index of each segment, the crowd ones, dist.png scale) from a sample's json; TypeError,
    ValueError, AttributeError or OverflowError when its structure is not the shard contract's."""
    segments = meta.get("segments", [])
    indices = [int(s.get("ins", 0)) for s in segments]
    crowd = [index for index, s in zip(indices, segments) if index > 0 and s.get("iscrowd")]
    # dist.png's unit: json params.dist_scale (64 before PREP_VERSION 2, when shards did not record it)
    return indices, crowd, int(meta.get("params", {}).get("dist_scale", DIST_SCALE))


def parse_sample(raw: dict[str, Any], depth: str = "none") -> ParsedSample:
    """Check a raw sample's key and fields and read its size, crowd flags and distance scale."""
    key = check_sample_key(raw["__key__"], f"shard {raw.get('__url__', '?')}")
    if _image_bytes(raw) is None:
        raise ValueError(f"sample {key}: no jpg or png image")
    needed = [*LABEL_FIELDS, "json"] + ([f"{depth}.png"] if depth != "none" else [])
    missing = [name for name in needed if name not in raw]
    if missing:
        hint = f" (data.depth = {depth!r})" if f"{depth}.png" in missing else ""
        raise ValueError(f"sample {key}: the shard has no {', '.join(missing)}{hint}")
    try:
        height, width = png_size(raw["sem.png"])
    except PNGError as exc:
        raise ValueError(f"sample {key}: unreadable sem.png header ({exc})") from None
    if max(height, width) > MAX_SIDE:  # a corrupt header would otherwise size a batch of terabytes
        raise ValueError(f"sample {key}: sem.png claims {height}×{width} pixels, more than {MAX_SIDE} on a side")
    try:
        indices, crowd_indices, scale = _read_meta(json.loads(raw["json"]))
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"sample {key}: unreadable json ({type(exc).__name__}: {exc})") from None
    max_ins = max(indices, default=0)
    if max_ins > INT16_MAX:
        raise ValueError(f"sample {key}: {max_ins} instances, more than the loader's int16 maps hold ({INT16_MAX})")
    if scale not in DIST_SCALES:
        raise ValueError(f"sample {key}: dist_scale {scale} is not one of {DIST_SCALES}")
    crowd = np.zeros(max(max_ins, 0) + 1, dtype=bool)
    crowd[crowd_indices] = True
    return ParsedSample(key, raw, height, width, crowd, DIST_SCALE // scale, depth)


def _plane(sample: ParsedSample, name: str) -> np.ndarray:
    """A single-channel PNG field's pixels (possibly a read-only view, 16-bit big-endian), size-checked."""
    try:
        pixels = decode_png_view(sample.raw[name])
    except PNGError:
        raise ValueError(f"sample {sample.key}: cannot decode {name}") from None
    if pixels.ndim != 2 or pixels.shape != (sample.height, sample.width):
        raise ValueError(f"sample {sample.key}: {name} is {pixels.shape}, expected a single-channel "
                         f"{sample.height}×{sample.width} map")
    return pixels


def _distance_into(out: np.ndarray, stored: np.ndarray, factor: int) -> None:
    """dist.png values × `factor` → int16 1/DIST_SCALE px, saturating at 32767 / 64 = 512 px (where every
    EDS weight is already wmin); one pass."""
    if stored.dtype == np.uint8 and factor * 255 <= INT16_MAX:  # the default: a widening multiply, no clip
        np.multiply(stored, factor, out=out, dtype=np.int16, casting="unsafe")
    elif factor == 1:
        np.minimum(stored, INT16_MAX, out=out, casting="unsafe")
    else:
        np.copyto(out, np.minimum(stored.astype(np.int32) * factor, INT16_MAX), casting="unsafe")


def decode_into(sample: ParsedSample, out: dict[str, np.ndarray]) -> None:
    """Decode every field of `sample` into `out`: image (h, w, 3) uint8 RGB, sem (h, w) uint8, ins and
    dist (h, w) int16, and with data.depth `depth` or `disp` (h, w) float32 plus `depth_valid` bool;
    writable arrays of exactly these shapes and dtypes (views into a batch buffer, as a rule)."""
    key = sample.key
    try:  # OpenCV raises on some damaged inputs (an empty buffer) and returns None on others
        bgr = cv2.imdecode(np.frombuffer(sample.image_bytes, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is None:
        raise ValueError(f"sample {key}: cannot decode the image")
    if bgr.shape[:2] != (sample.height, sample.width):
        raise ValueError(f"sample {key}: the image is {bgr.shape[0]}×{bgr.shape[1]}, its labels "
                         f"{sample.height}×{sample.width}")
    image = out["image"]
    if cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=image) is not image:  # OpenCV made its own array instead
        raise RuntimeError(f"OpenCV did not write into the batch buffer ({image.shape}, strides {image.strides})")
    sem = _plane(sample, "sem.png")
    if sem.dtype != np.uint8:
        raise ValueError(f"sample {key}: sem.png is 16-bit; train ids are 8-bit (255 = void)")
    np.copyto(out["sem"], sem)
    # int16 halves what workers copy to the trainer: instance indices are < 2^15 (parse_sample checks)
    np.copyto(out["ins"], _plane(sample, "ins.png"), casting="unsafe")
    _distance_into(out["dist"], _plane(sample, "dist.png"), sample.dist_factor)
    if sample.depth == "depth":  # depth.png: millimetres, 0 = no measurement
        stored = _plane(sample, "depth.png")
        np.divide(stored, 1000.0, out=out["depth"], dtype=np.float32, casting="unsafe")
        np.greater(stored, 0, out=out["depth_valid"])
    elif sample.depth == "disp":
        np.divide(_plane(sample, "disp.png"), DISP_SCALE, out=out["disp"], dtype=np.float32, casting="unsafe")
        out["depth_valid"][:] = True


def _sample_specs(sample: ParsedSample, plane: tuple[int, ...]) -> Spec:
    """Field → (stored shape with `plane` = leading dims, dtype, void value) of a sample's decoded maps."""
    specs = {
        "image": ((*plane, 3), torch.uint8, 0),
        "sem": (plane, torch.uint8, IGNORE),
        "ins": (plane, torch.int16, 0),
        "dist": (plane, torch.int16, 0),
    }
    if sample.depth != "none":
        specs[sample.depth] = (plane, torch.float32, 0)
        specs["depth_valid"] = (plane, torch.bool, False)
    return specs


def decode_sample(raw: dict[str, Any], depth: str = "none") -> dict[str, Any]:
    """Raw tar members of one sample → numpy arrays: image (H, W, 3) RGB uint8, sem, ins, dist, crowd flags
    (and depth/disp + depth_valid); the loader itself decodes straight into its batches (`collate`)."""
    sample = parse_sample(raw, depth)
    specs = _sample_specs(sample, (sample.height, sample.width))
    out = {name: torch.empty(shape, dtype=dtype).numpy() for name, (shape, dtype, _) in specs.items()}
    decode_into(sample, out)
    return {"key": sample.key, **out, "crowd": sample.crowd}



def batch_specs(samples: list[ParsedSample]) -> Spec:
    """Field → (stored shape, dtype, padding value) of the padded batch of `samples`. The image is stored
    (B, Hc, Wc, 3), as decoded, and handed out as a (B, 3, Hc, Wc) channels-last view: a CHW copy
    cost more than the rest of the collate."""
    n = len(samples)
    plane = (n, max(s.height for s in samples), max(s.width for s in samples))
    depths = {s.depth for s in samples}
    if len(depths) > 1:
        raise ValueError(f"one batch mixes depth targets {sorted(depths)}")
    return {
        **_sample_specs(samples[0], plane),
        "size": ((n, 2), torch.long, 0),
        "crowd": ((n, max(len(s.crowd) for s in samples)), torch.bool, False),
    }


def batch_layout(specs: Spec) -> tuple[Layout, int]:
    """(field → (byte offset, stored shape, dtype), total bytes): each field 64-byte aligned in one buffer."""
    layout, total = {}, 0
    for name, (shape, dtype, _) in specs.items():
        layout[name] = (total, shape, dtype)
        total += -(-math.prod(shape) * dtype.itemsize // 64) * 64
    return layout, total


def layout_views(buffer: Tensor, layout: Layout) -> dict[str, Tensor]:
    """The fields in their stored shapes as views of the uint8 `buffer` (one storage for the batch)."""
    return {
        name: buffer[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, (offset, shape, dtype) in layout.items()
    }


def batch_fields(views: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stored views → the batch contract: image (B, 3, Hc, Wc) channels-last, the others as stored."""
    return {**views, "image": views["image"].permute(0, 3, 1, 2)}


def _pad(dst: np.ndarray, h: int, w: int, fill: float) -> None:
    """Set everything of dst (H, W, ...) outside its top-left h×w to `fill`: each byte is written once (a
    reused buffer holds the previous batch, and filling it all first would write the image area twice)."""
    if h < dst.shape[0]:
        dst[h:] = fill
    if w < dst.shape[1]:
        dst[:h, w:] = fill


def write_batch(views: dict[str, Tensor], specs: Spec, samples: list[ParsedSample]) -> None:
    """Decode the samples into the stored views, padding every field with its void value."""
    arrays = {name: view.numpy() for name, view in views.items()}
    maps = [name for name in specs if name not in ("size", "crowd")]
    for i, s in enumerate(samples):
        h, w = s.height, s.width
        arrays["size"][i] = (h, w)
        decode_into(s, {name: arrays[name][i, :h, :w] for name in maps})
        for name in maps:
            _pad(arrays[name][i], h, w, specs[name][2])
        crowd = arrays["crowd"][i]
        crowd[: len(s.crowd)] = s.crowd
        crowd[len(s.crowd) :] = False


def collate(samples: list[ParsedSample]) -> dict[str, Any]:
    """Decode and pad parsed samples to the batch's largest height and width (void labels, zero image);
    every field is a view of one fresh buffer (inside a DataLoader worker, `SlotPool.collate` is used)."""
    specs = batch_specs(samples)
    layout, total = batch_layout(specs)
    views = layout_views(torch.empty(total, dtype=torch.uint8), layout)
    write_batch(views, specs, samples)
    return {"key": [s.key for s in samples], **batch_fields(views)}


# -- batches in reused shared memory (worker → trainer) -------------------------------------------------
# A new shared segment per batch cost a worker a quarter of its time (creating it and page-faulting every
# page on first touch) and the trainer a socket round trip for its file descriptor. Instead each worker
# writes into a few slots it reuses; a slot's descriptor travels once, later batches name the slot.
# The trainer's batch tensors share one storage per batch; when the last of them (or of their views) is
# freed, the slot's flag drops to FREE and the worker may overwrite it. Nothing is recycled while a
# tensor of the batch is alive.
SLOT_HEADER = 64  # the slot's flag, alone on its cache line; the batch starts after it
FREE, IN_USE = 0, 1
SLOT_GRANULE = 1 << 16  # slot sizes rounded up to 64 KiB, with a quarter of headroom for larger batches


@dataclass
class SlotBatch:
    """What a worker sends per batch: keys and layout of a batch written into one of its slots."""

    receiver: int  # the BatchStream's SlotReceiver, which holds the trainer's mapping of the slots
    pool: int
    slot: int
    nbytes: int
    layout: Layout
    keys: list[str]
    storage: torch.UntypedStorage | None = None  # only on a slot's first trip: its file descriptor goes once
    retired: list[int] = field(default_factory=list)  # slots the worker dropped: the trainer unmaps them

    def open(self) -> dict[str, Any]:
        receiver = _RECEIVERS.get(self.receiver)
        if receiver is None:
            raise RuntimeError("a loader batch arrived for a BatchStream that no longer exists")
        return receiver.open(self)

    def pin_memory(self) -> dict[str, Any]:
        """The DataLoader's pin thread: copy out to pinned memory; the slot is free once this returns."""
        return {k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in self.open().items()}


class _Slot:
    def __init__(self, index: int, capacity: int) -> None:
        self.index, self.capacity = index, capacity
        self.storage = torch.UntypedStorage._new_shared(SLOT_HEADER + capacity)
        self.buffer = torch.empty(0, dtype=torch.uint8).set_(self.storage)
        self.flag = self.buffer[:8].numpy().view(np.int64)
        self.announced = False

    def free(self) -> bool:
        return int(self.flag[0]) == FREE


class SlotPool:
    """A DataLoader worker's reused shared-memory slots. A slot is taken only when the trainer has freed
    it; when none is free (the trainer holds more batches than the queue depth) a new one is made, so a
    consumer that keeps batches costs memory, never a deadlock."""

    def __init__(self, receiver: int) -> None:
        self.receiver = receiver
        self.id = int.from_bytes(os.urandom(8), "little") >> 1  # not from the seeded RNGs: the data stream stays as it was
        self.slots: list[_Slot] = []
        self.retired: list[int] = []
        self.created = 0

    def acquire(self, nbytes: int) -> _Slot:
        free = [s for s in self.slots if s.free()]
        fits = [s for s in free if s.capacity >= nbytes]
        if fits:
            slot = min(fits, key=lambda s: s.capacity)
        else:
            if free:  # a free slot too small for this batch: replace it rather than grow the pool
                self.slots.remove(free[0])
                self.retired.append(free[0].index)
            slot = _Slot(self.created, -(-(nbytes + nbytes // 4) // SLOT_GRANULE) * SLOT_GRANULE)
            self.created += 1
            self.slots.append(slot)
        slot.flag[0] = IN_USE
        return slot

    def collate(self, samples: list[ParsedSample]) -> SlotBatch:
        specs = batch_specs(samples)
        layout, total = batch_layout(specs)
        slot = self.acquire(total)
        write_batch(layout_views(slot.buffer[SLOT_HEADER : SLOT_HEADER + total], layout), specs, samples)
        message = SlotBatch(self.receiver, self.id, slot.index, total, layout, [s.key for s in samples],
                            None if slot.announced else slot.storage, self.retired)
        slot.announced, self.retired = True, []
        return message


def _release(flag: np.ndarray) -> None:
    # A plain store is enough on weakly ordered CPUs (ARM) too: this runs after the batch storage's last
    # reference was dropped by c10's intrusive_ptr decrement, an acq_rel atomic, so no read of the batch
    # can be reordered past this store; the worker reads the flag before it writes the slot and only
    # writes on a branch taken on the value read, and CPUs do not make stores visible speculatively.
    flag[0] = FREE


class SlotReceiver:
    """The trainer's side: maps each worker slot once and turns a SlotBatch into tensors over it."""

    def __init__(self) -> None:
        self.id = int.from_bytes(os.urandom(8), "little") >> 1
        self.mapped: dict[tuple[int, int], np.ndarray] = {}
        _RECEIVERS[self.id] = self

    def open(self, message: SlotBatch) -> dict[str, Any]:
        for index in message.retired:
            self.mapped.pop((message.pool, index), None)
        key = (message.pool, message.slot)
        if message.storage is not None:
            self.mapped[key] = torch.empty(0, dtype=torch.uint8).set_(message.storage).numpy()
        whole = self.mapped[key]
        data = whole[SLOT_HEADER : SLOT_HEADER + message.nbytes]
        # `data` lives exactly as long as the storage of the tensors below (torch.from_numpy holds it):
        # when the last view of the batch dies, the slot is handed back
        weakref.finalize(data, _release, whole[:8].view(np.int64)).atexit = False
        return {"key": message.keys, **batch_fields(layout_views(torch.from_numpy(data), message.layout))}

    def clear(self) -> None:
        """Forget the slots of finished workers (batches still alive keep their own mapping)."""
        self.mapped.clear()


_RECEIVERS: weakref.WeakValueDictionary[int, SlotReceiver] = weakref.WeakValueDictionary()


# -- the per-worker pipeline ----------------------------------------------------------------------------
def _samples_of_shards(shards: Iterator[dict[str, str]], depth: str) -> Iterator[dict[str, Any]]:
    fields = {*IMAGE_FIELDS, *LABEL_FIELDS, "json"} | ({f"{depth}.png"} if depth != "none" else set())
    for shard in shards:
        yield from tar_samples(shard["url"], fields)  # other members (depth maps not trained on) are skipped unread


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    return int.from_bytes(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32).tobytes(), "little") >> 1


def _resampled_shards(urls: list[str], rng: random.Random) -> Iterator[dict[str, str]]:
    while True:
        yield {"url": rng.choice(urls)}


def _disjoint_shards(urls: list[str], rank: int, world_size: int, worker: int, workers: int, rng: random.Random) -> Iterator[dict[str, str]]:
    """split_by_node + split_by_worker, repeated forever in a freshly shuffled order each round."""
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
    """Endless stream of collated batches; each worker yields `batches_per_worker` per epoch."""

    def __init__(self, urls: list[str], cfg: DataConfig, rank: int, world_size: int, seed: int, batches_per_worker: int,
                 receiver: int = 0) -> None:
        super().__init__()
        self.urls, self.cfg, self.rank, self.world_size, self.seed = urls, cfg, rank, world_size, seed
        self.receiver = receiver  # SlotReceiver id of the trainer process (workers write into reused slots)
        self.batches_per_worker = batches_per_worker
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already consumed (resume), over all workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        # A fresh DataLoader asks worker 0 first; after `skip_batches` the next batch belongs to logical
        # worker skip_batches mod workers, so physical worker p plays logical worker (p + skip) mod workers.
        worker = (physical + self.skip_batches) % workers
        skip = batches_consumed_by_worker(self.skip_batches, worker, workers)
        if skip >= self.batches_per_worker:
            return
        cv2.setNumThreads(1)  # one decode per worker process; no thread pool fighting the trainer
        base = [self.seed, self.rank, worker, self.epoch]
        shard_rng, shuffle_rng = random.Random(mix_seed(*base, 1)), random.Random(mix_seed(*base, 2))
        if self.cfg.resampled:
            source = _resampled_shards(self.urls, shard_rng)
        else:
            source = _disjoint_shards(self.urls, self.rank, self.world_size, worker, workers, shard_rng)
        cfg = self.cfg
        pipeline = wds.DataPipeline(
            lambda: source,
            lambda shards: _samples_of_shards(shards, cfg.depth),
            wds.shuffle(cfg.shuffle_buffer, min(cfg.shuffle_initial, cfg.shuffle_buffer), rng=shuffle_rng),
            # resume: drop the raw samples of batches already trained on, before paying for their decode
            lambda samples: itertools.islice(samples, skip * cfg.micro_batch, None),
            wds.map(lambda raw: parse_sample(raw, cfg.depth)),  # the pixels are decoded into the batch
            wds.batched(cfg.micro_batch, collation_fn=SlotPool(self.receiver).collate if info else collate, partial=False),
        ).with_epoch(nbatches=self.batches_per_worker - skip)
        yield from pipeline


def _worker_context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: spawn, the only clean start there
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["genpan.train.data"])  # workers fork from a server that has torch and cv2 imported
    return context


class BatchStream:
    """The trainer's view: `next(stream)` gives CPU batches forever, tracking (epoch, batch in epoch)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0, pin_memory: bool = False) -> None:
        self.cfg = cfg
        self.urls = resolve_shards(cfg.shards)
        self.epoch_size = cfg.epoch_size or count_samples(self.urls)
        workers = max(cfg.num_workers, 1)
        if not cfg.resampled and len(self.urls) < world_size * workers:
            raise ValueError(
                f"data.resampled = false needs at least world size × workers = {world_size * workers} shards, "
                f"got {len(self.urls)} in {cfg.shards}"
            )
        per_rank = max(1, self.epoch_size // (cfg.micro_batch * world_size))
        per_worker = -(-per_rank // workers)
        self.batches_per_epoch = per_worker * workers
        self.receiver = SlotReceiver()
        self.dataset = ShardStream(self.urls, cfg, rank, world_size, seed, per_worker, self.receiver.id)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=cfg.num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,  # workers re-read `epoch` and `skip_batches` at each new iterator
            prefetch_factor=2 if cfg.num_workers else None,
            # fork copies a parent whose OpenCV/OpenMP thread pools may be live: a forked worker that touches
            # them hangs for ever (seen here: cv2.setNumThreads in the child). forkserver children start clean.
            multiprocessing_context=_worker_context() if cfg.num_workers else None,
        )
        self.epoch, self.index = 0, 0
        self._iterator: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self.dataset.epoch, self.dataset.skip_batches = self.epoch, self.index
            self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.index = self.epoch + 1, 0
            self._drop_workers()
            return next(self)
        except ValueError as exc:
            raise _worker_error(exc) from exc
        if isinstance(batch, SlotBatch):
            batch = batch.open()
        self.index += 1
        if self.index >= self.batches_per_epoch:  # start the next epoch's workers on the next call
            self.epoch, self.index = self.epoch + 1, 0
            self._drop_workers()
        return batch

    def _drop_workers(self) -> None:
        self._iterator = None  # shuts the workers (and the pin thread) down before their slots are unmapped
        self.receiver.clear()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._drop_workers()


def _worker_error(exc: ValueError) -> ValueError:
    """A ValueError a DataLoader worker raised (a damaged sample, as a rule) comes back with the worker's
    whole traceback in its message; keep the worker's own message, which names the sample and field."""
    text = str(exc)
    if "Original Traceback" not in text:  # raised in this process: as it is
        return exc
    last = text.rstrip().splitlines()[-1]
    return ValueError(last.removeprefix("ValueError: ") + " (in a loader worker)")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
