"""Reused shared-memory batch buffers of the DataLoader workers.

A batch written into fresh shared memory pays one page fault per 4 KiB on first touch; on the 2-core VM
that measures 3.7 ms per 4 MiB against 0.19 ms for writing a buffer already mapped (2026-12-07,
docs/performance.md), more than the JPEG decode of the batch. So each worker keeps a few buffers and
writes a batch into one the trainer has let go of:

- `flags` (workers × slots, uint8) is shared memory made by the trainer's process before the workers
  start; a 1 means the batch in that buffer may still be in use.
- The worker takes a buffer whose flag is 0, sets it to 1 and tags the batch with its (worker, slot).
  When every buffer is taken (the trainer holds more batches than the queue depth), it writes into a
  fresh buffer instead: a consumer that keeps batches costs memory, never a wait or a race.
- The trainer's process drops the tag and, through `weakref.finalize` on the batch's storage (every field
  is a view of it, and torch keeps one Python object per storage), sets the flag back to 0 once the last
  view is gone. With pinned memory the batch it sees is the pinned copy, which outlives the buffer.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch
from torch import Tensor

SLOT_KEY = "buffer_slot"  # the batch's (worker, slot) tag between the worker and the trainer's process
GRANULE = 1 << 16  # capacities rounded up to 64 KiB with a quarter of headroom, so a slightly larger batch fits


def new_flags(workers: int, slots: int) -> Tensor:
    return torch.zeros(workers, slots, dtype=torch.uint8).share_memory_()


def _shared(nbytes: int) -> Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


class BufferRing:
    """One worker's buffers (its row of the shared flags)."""

    def __init__(self, flags: Tensor, worker: int) -> None:
        self.worker = worker
        self.flags = flags[worker].numpy()
        self.buffers: list[Tensor | None] = [None] * len(self.flags)
        self.last_slot = -1

    def allocate(self, nbytes: int) -> Tensor:
        free = [i for i, flag in enumerate(self.flags) if flag == 0]
        fits = [i for i in free if (b := self.buffers[i]) is not None and b.numel() >= nbytes]
        if fits:
            slot = min(fits, key=lambda i: self.buffers[i].numel())  # type: ignore[union-attr]
        elif free:  # replace the smallest free buffer by one that fits
            slot = min(free, key=lambda i: -1 if self.buffers[i] is None else self.buffers[i].numel())  # type: ignore[union-attr]
            self.buffers[slot] = _shared(-(-(nbytes + nbytes // 4) // GRANULE) * GRANULE)
        else:
            self.last_slot = -1
            return _shared(nbytes)
        self.flags[slot] = 1
        self.last_slot = slot
        return self.buffers[slot][:nbytes]  # type: ignore[index]

    def tag(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Mark the batch just collated with the buffer it lives in (none: a fresh buffer)."""
        if self.last_slot >= 0:
            batch[SLOT_KEY] = (self.worker, self.last_slot)
        return batch


def _release(flags: np.ndarray, worker: int, slot: int) -> None:
    # runs after the storage's last reference is dropped (an acq_rel atomic in c10), so no read of the
    # batch is reordered past this store; the worker writes the buffer only after reading the 0
    flags[worker, slot] = 0


def release_when_dropped(batch: dict[str, Any], flags: Tensor) -> dict[str, Any]:
    """Trainer side: untag the batch and hand its buffer back to the worker once the batch is garbage."""
    tag = batch.pop(SLOT_KEY, None)
    if tag is not None:
        storage = next(v for v in batch.values() if isinstance(v, Tensor)).untyped_storage()
        weakref.finalize(storage, _release, flags.numpy(), *tag).atexit = False
    return batch
