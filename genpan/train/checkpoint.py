"""Atomic, checksummed training checkpoints in `step-N` folders.

    {out}/checkpoints/step-00000120/
        shared.pt        model, optimizer, scheduler, scaler, step (rank 0; the same on every rank)
        rank-0.pt ...    per-rank RNG states (python, numpy, torch, cuda, augmentation generator) and data position
        checksums.json   sha256 of every file, written last
    {out}/final.pt       model weights + config + categories, and final.pt.sha256 beside it

Every rank writes its own file into `.step-N.tmp`; after a barrier rank 0 writes the shared state and the
checksums, then renames the folder to `step-N` (a rename is atomic), so a crash leaves either a complete
checkpoint or a temporary folder that is ignored. Loading walks from the newest folder down: a missing
or mismatching checksum (a truncated or corrupt file) is reported and the previous checkpoint is used.
The folder must be on a filesystem every node sees.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genpan.atomic import atomic_write_bytes, atomic_write_text

STEP_DIR = re.compile(r"^step-(\d+)$")
SHARED_NAME = "shared.pt"
CHECKSUMS_NAME = "checksums.json"
SIDECAR_SUFFIX = ".sha256"  # final.pt.sha256 beside final.pt


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def serialise(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


# -- RNG state (weights_only-loadable: tensors, ints, lists, tuples) ------------------------------------
def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- saving ---------------------------------------------------------------------------------------------
def save_checkpoint(
    ckpt_root: Path,
    step: int,
    rank: int,
    world_size: int,
    shared: Callable[[], dict[str, Any]],
    rank_state: dict[str, Any],
    barrier: Callable[[], None],
    keep: int,
) -> Path:
    """Write checkpoint `step` collectively (every rank calls this). `shared` is called on every rank
    (it may gather sharded state) but only rank 0's result is written. Returns the final folder."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".{step_dir_name(step)}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    atomic_write_bytes(tmp / rank_file(rank), serialise(rank_state))
    shared_state = shared()
    barrier()
    if rank == 0:
        atomic_write_bytes(tmp / SHARED_NAME, serialise(shared_state))
        names = [SHARED_NAME] + [rank_file(r) for r in range(world_size)]
        sums = {name: sha256_file(tmp / name) for name in names}
        atomic_write_text(tmp / CHECKSUMS_NAME, json.dumps({"step": step, "world_size": world_size, "sha256": sums}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune(ckpt_root, keep)
    barrier()
    return final


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete-looking step folders, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def prune(ckpt_root: Path, keep: int) -> None:
    for _, path in list_checkpoints(ckpt_root)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


# -- loading --------------------------------------------------------------------------------------------
def verify(folder: Path, rank: int) -> str | None:
    """None when the shared file and this rank's file match their recorded checksums, else the reason."""
    return verify_files(folder, (SHARED_NAME, rank_file(rank)))


def verify_files(folder: Path, names: tuple[str, ...]) -> str | None:
    """None when every named file of a step folder matches checksums.json, else the reason."""
    sums_path = folder / CHECKSUMS_NAME
    if not sums_path.is_file():
        return f"{CHECKSUMS_NAME} is missing"
    try:
        sums = json.loads(sums_path.read_text())["sha256"]
    except (ValueError, KeyError) as exc:
        return f"{CHECKSUMS_NAME} is unreadable ({exc})"
    for name in names:
        path = folder / name
        if name not in sums:
            return f"{name} is not listed in {CHECKSUMS_NAME} (saved with another world size?)"
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != sums[name]:
            return f"{name} does not match its sha256 (truncated or corrupt)"
    return None


def write_with_checksum(path: Path, data: bytes) -> None:
    """A single-file checkpoint (final.pt) and its `sha256sum`-format sidecar, each written atomically."""
    atomic_write_bytes(path, data)
    atomic_write_text(path.with_name(path.name + SIDECAR_SUFFIX), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """The payload of a trainer checkpoint, checksums verified first, loaded with weights_only.

    `path` is a `step-N` folder or its `shared.pt` (verified against the folder's checksums.json), or a
    single file such as `final.pt` (verified against `final.pt.sha256` when it has one; files from
    elsewhere may come without). Raises FileNotFoundError or ValueError with a one-line reason.
    """
    path = Path(path)
    folder = path if path.is_dir() else (path.parent if path.name == SHARED_NAME else None)
    file = folder / SHARED_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{what}: checkpoint not found: {file}")
    if folder is not None:
        problem = verify_files(folder, (SHARED_NAME,))
        if problem is not None:
            raise ValueError(f"{what}: checkpoint {folder} is unusable: {problem}")
    else:
        sidecar = file.with_name(file.name + SIDECAR_SUFFIX)
        if sidecar.is_file():
            recorded = sidecar.read_text().split()[:1]
            if recorded != [sha256_file(file)]:
                raise ValueError(f"{what}: {file} does not match {sidecar.name} (truncated or corrupt)")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused it: the file carries more than tensors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{what}: refusing to load a checkpoint that is not plain tensors and containers: {file} ({first})") from None
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"{what}: cannot read checkpoint {file}: {exc}") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"{what}: {file} holds no 'model' weights")
    return payload


@dataclass
class LoadedCheckpoint:
    step: int
    folder: Path
    shared: dict[str, Any]
    rank_state: dict[str, Any]


def load_latest(ckpt_root: Path, rank: int, log: Callable[[str], None] = print) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies, falling back (with a message) past bad ones; None if none."""
    for step, folder in list_checkpoints(ckpt_root):
        problem = verify(folder, rank)
        if problem is not None:
            log(f"warning: checkpoint {folder} is unusable: {problem}; trying the previous one")
            continue
        shared = torch.load(folder / SHARED_NAME, map_location="cpu", weights_only=True)
        rank_state = torch.load(folder / rank_file(rank), map_location="cpu", weights_only=True)
        return LoadedCheckpoint(step, folder, shared, rank_state)
    return None


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model weights from a step folder, a `shared.pt`, or a `final.pt` (for --init-from)."""
    return read_checkpoint(path, "--init-from")["model"]
