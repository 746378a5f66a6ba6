"""PQ figures for the report: per-class bars and PQ / matched IoU by object size (paper Figures 4–5).

Matplotlib with the Agg backend, so the figures render on machines without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from genpan.eval.pq_buckets import SizeBucket  # noqa: E402

THING_COLOUR, STUFF_COLOUR = "#1f77b4", "#ff7f0e"


def plot_pq_by_class(per_class: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Horizontal bars of PQ per counted category, best first, coloured by thing/stuff."""
    rows = sorted((r for r in per_class if r["counted"]), key=lambda r: r["pq"])
    height = max(2.5, 0.22 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(7, height))
    y = np.arange(len(rows))
    ax.barh(y, [100 * r["pq"] for r in rows], color=[THING_COLOUR if r["isthing"] else STUFF_COLOUR for r in rows])
    ax.set_yticks(y, [str(r["name"]) for r in rows], fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("PQ (%)")
    ax.set_title("PQ by class (blue: things, orange: stuff)")
    if not rows:
        ax.text(50, 0, "no category with TP+FP+FN > 0", ha="center")
    fig.tight_layout()
    return _save(fig, path)


def plot_pq_by_size(runs: Mapping[str, Sequence[SizeBucket]] | Sequence[SizeBucket], path: str | Path) -> Path:
    """Thing PQ and mean matched IoU per size bucket; pass {run name: buckets} to compare runs."""
    if not isinstance(runs, Mapping):
        runs = {"": runs}
    names = [b.name for b in next(iter(runs.values()), [])]
    x = np.arange(len(names))
    width = 0.8 / max(1, len(runs))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for panel, (ax, field, label) in enumerate(zip(axes, ("pq", "mean_iou"), ("PQ (%)", "mean IoU of matches (%)"), strict=True)):
        for k, (run, buckets) in enumerate(runs.items()):
            values = [100 * getattr(b, field) for b in buckets]
            ax.bar(x + (k - (len(runs) - 1) / 2) * width, values, width, label=run or None)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel(label)
        ax.set_xlabel("object size (GT area; FP: predicted area)" if panel == 0 else "object size (GT area)")
        if len(runs) > 1:
            ax.legend(fontsize=8)
    fig.suptitle("Things by object size")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss_curves(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Every loss term of a training log (metrics.jsonl records) against the step, log scale."""
    terms = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k not in NOT_LOSSES})
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    for term in terms:
        values = [r.get(term) for r in records]
        pts = [(s, v) for s, v in zip(steps, values) if isinstance(v, (int, float)) and v > 0]
        if pts:
            ax.plot(*zip(*pts), label=term, lw=2.0 if term == "total" else 1.0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training losses")
    if terms:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


NOT_LOSSES = {"step", "lr", "images_per_s", "epoch", "time", "seconds", "grad_norm"}
