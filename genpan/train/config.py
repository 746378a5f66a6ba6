"""The trainer's config schema: one dataclass per TOML section, defaults in code (genpan/config.py loads them).

    cfg = load_train_config("train/configs/tiny_cpu.toml", ["--optim.lr=1e-3"])

Sections: top-level `tasks`, [model] (genpan.train.model ModelConfig), [data] (genpan.train.data DataConfig), [loss]
(genpan.train.losses LossConfig), [optim], [schedule], [run].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from genpan.config import load_config
from genpan.train.data import DataConfig
from genpan.train.losses import LossConfig
from genpan.train.model import ModelConfig

TASKS = ("sem", "inst", "depth")


@dataclass
class OptimConfig:
    """AdamW with layer-wise lr decay (paper 5.1; 5e-4 → 1e-6, decay 0.6 in the authors' follow-up recipe).

    batch_size is the effective (global) batch: micro-steps per optimizer step =
    batch_size / (data.micro_batch × world size), which must divide exactly.
    """

    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    batch_size: int = 16
    grad_clip: float = 1.0  # max global grad norm; 0 = off

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.lr must be > 0 and optim.min_lr in [0, lr], got {self.lr}, {self.min_lr}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must lie in (0, 1], got {self.layer_decay}")
        if self.batch_size < 1 or len(self.betas) != 2:
            raise ValueError("optim.batch_size must be >= 1 and optim.betas has two values")


@dataclass
class ScheduleConfig:
    """Length and lr schedule: linear warmup then cosine to optim.min_lr.

    epochs × data epoch size / optim.batch_size optimizer steps, unless max_steps > 0 (then exactly that).
    warmup_steps > 0 wins over warmup_epochs.
    """

    epochs: float = 1.0
    max_steps: int = 0
    warmup_epochs: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.max_steps < 0 or self.warmup_epochs < 0 or self.warmup_steps < 0:
            raise ValueError("schedule.epochs must be > 0; max_steps, warmup_epochs, warmup_steps >= 0")


@dataclass
class RunConfig:
    """Where and how: output folder, seed, device, precision, distribution, logging and checkpoints.

    device: "auto" (cuda when present) | "cpu" | "cuda".  amp: "auto" (bf16 on cuda, fp32 on cpu) | "bf16" |
    "fp16" | "fp32".  backend: "auto" (nccl on cuda, gloo on cpu) | "nccl" | "gloo".
    fsdp: FSDP2 `fully_shard` per ViT block instead of DDP (for ViT-L/g).
    ckpt_every: optimizer steps between checkpoints (0 = only at the end); keep_checkpoints: newest kept.
    threads: torch CPU threads per process (0 = torch default).
    stop_after_step: debug; stop as if killed after this step (0 = off).
    save_rank_weights: debug; every rank writes its final weights (the DDP test compares them).
    """

    out: Path = Path("runs/tiny_cpu")
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    backend: str = "auto"
    fsdp: bool = False
    threads: int = 0
    log_every: int = 1
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True
    stop_after_step: int = 0
    save_rank_weights: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("device", self.device, ("auto", "cpu", "cuda")),
            ("amp", self.amp, ("auto", "bf16", "fp16", "fp32")),
            ("backend", self.backend, ("auto", "nccl", "gloo")),
        ):
            if value not in allowed:
                raise ValueError(f"run.{name} must be one of {allowed}, got {value!r}")
        if self.log_every < 1 or self.ckpt_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("run.log_every and run.keep_checkpoints must be >= 1, run.ckpt_every >= 0")


@dataclass
class TrainConfig:
    tasks: list[str] = field(default_factory=lambda: ["sem", "inst"])
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if "depth" in self.tasks:
            if not self.model.depth_head:
                raise ValueError("tasks has 'depth' but model.depth_head = false")
            wanted = "disp" if self.loss.depth_loss == "affine" else "depth"
            if self.data.depth != wanted:
                raise ValueError(f"loss.depth_loss = {self.loss.depth_loss!r} needs data.depth = {wanted!r}, got {self.data.depth!r}")
        if self.model.img_size % self.model.patch_size:
            raise ValueError("model.img_size must be a multiple of model.patch_size")
        patch = self.model.patch_size
        if any(s % patch for s in self.data.size):
            raise ValueError(f"data.size must be multiples of the backbone's patch {patch}, got {self.data.size}")


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
