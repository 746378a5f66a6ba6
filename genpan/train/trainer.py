"""The training loop: model, AdamW with layer decay, warmup + cosine, accumulation, DDP/FSDP2, checkpoints, logs.

One optimizer step = `accum` micro-steps of `data.micro_batch` images on every rank, so the effective batch
is micro_batch × accum × world size = optim.batch_size. Under DDP gradients are all-reduced only on the
last micro-step (`no_sync` before it). Losses are per-micro-batch means, so each is divided by `accum`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from genpan.atomic import atomic_write_bytes, atomic_write_text
from genpan.config import to_dict, write_resolved
from genpan.train.augment import DeviceAugmenter
from genpan.train.checkpoint import (
    capture_rng,
    list_checkpoints,
    load_latest,
    load_model_weights,
    restore_rng,
    save_checkpoint,
    serialise,
    write_with_checksum,
)
from genpan.train.config import TrainConfig
from genpan.train.data import BatchStream, mix_seed, to_device
from genpan.train.losses import compute_losses
from genpan.train.model import build_model, param_groups_layer_decay
from genpan.train.schedule import WarmupCosine, build_scheduler
from genpan.train.shard_urls import categories_of

METRICS_NAME = "metrics.jsonl"
FINAL_NAME = "final.pt"
RESOLVED_NAME = "config.resolved.toml"


def check_num_classes(categories: list[list[Any]], cfg: TrainConfig) -> None:
    """The semantic head must have one logit per train id of the shards' category table."""
    train_ids = {int(c[3]) for c in categories if int(c[3]) != 255}
    if "sem" in cfg.tasks and train_ids and len(train_ids) != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes = {cfg.model.num_classes} but the shards' category table has {len(train_ids)} train ids; "
            f"set --model.num_classes={len(train_ids)}"
        )


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(run_device: str) -> torch.device:
    if run_device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if run_device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device = 'cuda' but no CUDA device is available")
    return torch.device(run_device)


def setup_distributed(device_kind: str, backend: str) -> DistInfo:
    """Join the process group when launched by torchrun (RANK set), else a single process."""
    if "RANK" not in os.environ:
        return DistInfo()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if backend == "auto":
        backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, True)


def cleanup_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()  # a rank that leaves first can abort the others' gloo teardown
        dist.destroy_process_group()


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.data.micro_batch * world_size
    if cfg.optim.batch_size % per_step:
        raise ValueError(
            f"optim.batch_size {cfg.optim.batch_size} is not a multiple of data.micro_batch × world size = {per_step}"
        )
    return cfg.optim.batch_size // per_step


def schedule_lengths(cfg: TrainConfig, epoch_size: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps)."""
    steps_per_epoch = epoch_size / cfg.optim.batch_size
    total = cfg.schedule.max_steps or max(1, math.ceil(cfg.schedule.epochs * steps_per_epoch))
    warmup = cfg.schedule.warmup_steps or round(cfg.schedule.warmup_epochs * steps_per_epoch)
    return total, min(warmup, total)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_init_weights(model: nn.Module, path: Path, log: Callable[[str], None]) -> None:
    """--init-from: copy every weight whose name and shape match; name what is left out."""
    state = load_model_weights(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in usable)
    missing = sorted(k for k in own if k not in usable)
    model.load_state_dict(usable, strict=False)
    log(f"init from {path}: {len(usable)} tensors loaded"
        + (f"; not loaded (absent or other shape): {skipped[:8]}" if skipped else "")
        + (f"; kept at init: {missing[:8]}" if missing else ""))


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


class Trainer:
    """Builds everything from a TrainConfig and runs `fit()`; `log` prints on rank 0 only."""

    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool = False,
        init_from: Path | None = None,
        backbone_weights: Path | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        run = cfg.run
        if run.threads > 0:
            torch.set_num_threads(run.threads)
        self.device = resolve_device(run.device)
        self.dist = setup_distributed(self.device.type, run.backend)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.is_main = self.dist.rank == 0
        self.log = log if self.is_main else (lambda msg: None)
        self.out = Path(run.out)
        self.ckpt_root = self.out / "checkpoints"
        if not resume and list_checkpoints(self.ckpt_root):
            raise ValueError(f"run.out {self.out} already holds checkpoints: pass --resume, or choose another run.out")

        # data first: a missing shard folder fails before any model is built
        self.stream = BatchStream(cfg.data, self.dist.rank, self.dist.world_size, run.seed, pin_memory=self.device.type == "cuda")
        self.accum = accumulation_steps(cfg, self.dist.world_size)
        self.total_steps, warmup = schedule_lengths(cfg, self.stream.epoch_size)
        self.categories = categories_of(self.stream.first_meta)  # every sample carries the same table
        check_num_classes(self.categories, cfg)

        torch.manual_seed(run.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        if backbone_weights is not None:
            model.load_backbone(backbone_weights)
            self.log(f"backbone weights loaded from {backbone_weights}")
        if init_from is not None:
            load_init_weights(model, Path(init_from), self.log)
        for name, head in model.heads.items():  # heads of tasks not trained get no gradient: freeze them
            head.requires_grad_(name in cfg.tasks)
        model.to(self.device)
        self.raw_model = model
        self.model = self._wrap(model)

        opt = cfg.optim
        groups = param_groups_layer_decay(self.raw_model, opt.lr, opt.weight_decay, opt.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
        self.schedule = WarmupCosine(opt.lr, opt.min_lr, warmup, self.total_steps)
        self.scheduler = build_scheduler(self.optimizer, self.schedule)
        self.autocast_dtype = amp_dtype(run.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        size = tuple(cfg.data.size)
        self.augmenter = DeviceAugmenter(
            (size[0], size[1]),
            (cfg.data.scale_min, cfg.data.scale_max),
            cfg.data.flip_prob,
            seed=mix_seed(run.seed, self.dist.rank, 7),
            pad_value=tuple(cfg.model.pixel_mean),
            pad_dist=cfg.data.pad_dist,
            patch_size=cfg.model.patch_size,
        )
        seed_everything(run.seed + 1000 * self.dist.rank)  # per-rank dropout / drop-path streams
        self.step = 0
        loaded = load_latest(self.ckpt_root, self.dist.rank, self.log) if resume else None
        if resume and loaded is None:
            self.log(f"--resume: no usable checkpoint under {self.ckpt_root}; starting from step 0")
        if loaded is not None:
            self._restore(loaded.shared, loaded.rank_state)
            self.step = loaded.step
            self.log(f"resumed from {loaded.folder} (step {self.step}, epoch {self.stream.epoch})")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_resolved(cfg, self.out / RESOLVED_NAME)
        self.metrics = MetricsLog(self.out / METRICS_NAME, self.is_main, self.step if resume else None)

    # -- distribution ------------------------------------------------------------------------------------
    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return model
        if self.cfg.run.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.backbone.blocks:
                fully_shard(block)
            fully_shard(model)
            return model
        device_ids = [self.dist.local_rank] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def _sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        if not self.dist.distributed:
            return contextlib.nullcontext()
        if self.cfg.run.fsdp:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.model.no_sync()

    def _full_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Model and optimizer state, gathered to full tensors under FSDP (a collective: every rank calls it)."""
        if self.cfg.run.fsdp and self.dist.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=options),
                    get_optimizer_state_dict(self.model, self.optimizer, options=options))
        return self.raw_model.state_dict(), self.optimizer.state_dict()

    def _restore(self, shared: dict[str, Any], rank_state: dict[str, Any]) -> None:
        if self.cfg.run.fsdp and self.dist.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, shared["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, shared["optimizer"], options=options)
        else:
            self.raw_model.load_state_dict(shared["model"])
            self.optimizer.load_state_dict(shared["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
        self.scaler.load_state_dict(shared["scaler"])
        self.stream.load_state_dict(rank_state["data"])
        self.augmenter.load_state_dict(rank_state["augment"])
        restore_rng(rank_state["rng"])

    def save(self) -> Path:
        def shared() -> dict[str, Any]:
            model_state, optim_state = self._full_state()
            return {
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step,
                "config": json.dumps(to_dict(self.cfg)),
            }

        rank_state = {"rng": capture_rng(), "data": self.stream.state_dict(), "augment": self.augmenter.state_dict()}
        return save_checkpoint(
            self.ckpt_root, self.step, self.dist.rank, self.dist.world_size, shared, rank_state,
            self.dist.barrier, self.cfg.run.keep_checkpoints,
        )

    # -- the loop ------------------------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        for _ in range(self.accum):
            batch = to_device(next(self.stream), self.device)
            images, targets = self.augmenter(batch)
            yield images, targets

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the loss terms averaged over micro-steps (and ranks)."""
        self.model.train()
        sums: dict[str, Tensor] = {}
        for micro, (images, targets) in enumerate(self.micro_batches()):
            with self._sync_context(micro == self.accum - 1):
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    outputs = self.model(images)
                outputs = {k: v for k, v in outputs.items() if k in self.cfg.tasks}
                losses = compute_losses(outputs, targets, self.cfg.loss, self.cfg.tasks)
                self.scaler.scale(losses["total"] / self.accum).backward()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return {name: value / self.accum for name, value in sums.items()}

    def reduce(self, terms: dict[str, Tensor]) -> dict[str, float]:
        names = sorted(terms)
        stacked = torch.stack([terms[n] for n in names])
        if self.dist.distributed:
            dist.all_reduce(stacked)
            stacked /= self.dist.world_size
        return {f"loss_{n}": float(v) for n, v in zip(names, stacked.cpu().tolist())}

    def fit(self) -> Path:
        run = self.cfg.run
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main and run.progress),
                   desc="train", unit="step", dynamic_ncols=True)
        last_time, last_step = time.perf_counter(), self.step
        stopped = False
        while self.step < self.total_steps:
            lr = self.schedule.lr(self.step)
            terms = self.train_step()
            bar.update(1)
            if self.step % run.log_every == 0 or self.step == self.total_steps:
                losses = self.reduce(terms)
                now = time.perf_counter()
                images = (self.step - last_step) * self.cfg.optim.batch_size
                record = {"step": self.step, "epoch": self.stream.epoch, "lr": lr, **losses,
                          "images_per_s": images / max(now - last_time, 1e-9)}
                last_time, last_step = now, self.step
                self.metrics.write(record)
                bar.set_postfix(loss=f"{losses['loss_total']:.4f}", lr=f"{lr:.2e}")
            if run.ckpt_every and self.step % run.ckpt_every == 0 and self.step < self.total_steps:
                self.save()
            if run.stop_after_step and self.step >= run.stop_after_step:
                stopped = True
                break
        bar.close()
        if not stopped:
            self.finish()
        return self.out

    def finish(self) -> None:
        self.save()
        model_state, _ = self._full_state()
        if self.is_main:
            payload = {"model": model_state, "config": json.dumps(to_dict(self.cfg)), "step": self.step, "categories": self.categories}
            write_with_checksum(self.out / FINAL_NAME, serialise(payload))
            self.log(f"done: {self.step} steps; weights in {self.out / FINAL_NAME}")
        if self.cfg.run.save_rank_weights and not self.cfg.run.fsdp:  # FSDP ranks hold shards, not weights
            atomic_write_bytes(self.out / f"weights-rank{self.dist.rank}.pt", serialise(self.raw_model.state_dict()))

    def close(self) -> None:
        cleanup_distributed(self.dist)
