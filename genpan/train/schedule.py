"""Learning-rate schedule: linear warmup, then half a cosine from the peak lr to a floor (paper 5.1)."""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Multiplier of the peak lr at optimizer step `step` (0-based), for `torch.optim.lr_scheduler.LambdaLR`.

    lr(step) = peak·(step + 1)/warmup                                   for step < warmup
             = floor + (peak − floor)·½(1 + cos(π·t)),  t = (step − warmup)/(total − warmup)   after,
    t clamped to [0, 1]. A plain object (not a closure) so LambdaLR's state_dict saves it.
    """

    def __init__(self, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> None:
        self.peak_lr, self.min_lr = peak_lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        t = min(max(t, 0.0), 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.peak_lr


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's lr = its initial lr (peak · lr_scale of layer decay) × the schedule's multiplier."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
