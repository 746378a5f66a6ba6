"""Depth teachers: map a batch of images to disparity in [0, 1] (paper sec. 5.1, "Relative depth with pseudo labels").

A teacher has an `identity` string (what made the labels: model, weights, input size) that keys the
pseudo-label cache and is stored in every shard's parameters, so a new teacher rebuilds the shards.

- `GroundTruthDepthTeacher`: disparity from the record's own metric depth (NYUv2, the synthetic set):
  d = 1/depth normalised to [0, 1] by dividing by its largest value (nearest pixel = 1); pixels without a
  measurement are 0. Cheap: it runs inside the shard tasks and needs no cache.
- `DepthAnythingV2Teacher`: Depth Anything V2 through the `transformers` implementation (an optional
  extra: `pip install transformers`), loaded from a local checkpoint directory (config.json +
  model.safetensors, e.g. a downloaded `depth-anything/Depth-Anything-V2-Large-hf`). Its relative
  disparity is min-max normalised per image; the affine-invariant loss (eq. 6-8) ignores scale and shift.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
PATCH = 14


class Teacher(Protocol):
    identity: str
    needs_images: bool  # False: works from the metric depth alone (no image decode)

    def __call__(self, images: Sequence[np.ndarray], depths: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """RGB uint8 (H, W, 3) images (and metric depths in m) → float32 (H, W) disparity in [0, 1]."""
        ...


def disparity_from_depth(depth_m: np.ndarray) -> np.ndarray:
    """Metric depth (m, 0 = no measurement) → 1/depth divided by its maximum; 0 where unmeasured."""
    depth = np.asarray(depth_m, np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros(depth.shape, np.float32)
    if valid.any():
        inv = 1.0 / depth[valid]
        out[valid] = (inv / inv.max()).astype(np.float32)
    return out


def normalise_min_max(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.zeros(x.shape, np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


class GroundTruthDepthTeacher:
    identity = "ground-truth-depth/v1"
    needs_images = False

    def __call__(self, images: Sequence[np.ndarray], depths: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        if depths is None or any(d is None for d in depths):
            raise ValueError("the ground-truth depth teacher needs metric depth for every image")
        return [disparity_from_depth(d) for d in depths if d is not None]


def checkpoint_digest(checkpoint_dir: str | Path) -> str:
    """Hash of a checkpoint directory's config and weight files (so other weights get another identity)."""
    root = Path(checkpoint_dir)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"teacher.checkpoint: {root} has no config.json (expected a transformers checkpoint directory)")
    weights = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not weights:
        raise FileNotFoundError(f"teacher.checkpoint: {root} has no *.safetensors or *.bin weights")
    sha = hashlib.sha256()
    for path in [root / "config.json", *weights]:
        sha.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
    return sha.hexdigest()[:16]


def depth_anything_identity(checkpoint_dir: str | Path, input_size: int) -> str:
    return f"depth-anything-v2/{checkpoint_digest(checkpoint_dir)}/in{input_size}"


def network_input_shape(h: int, w: int, input_size: int) -> tuple[int, int]:
    """Keep the aspect ratio, shorter side >= input_size, both sides multiples of the patch (DA-V2 style)."""
    scale = input_size / min(h, w)
    return max(PATCH, int(round(h * scale / PATCH)) * PATCH), max(PATCH, int(round(w * scale / PATCH)) * PATCH)


class DepthAnythingV2Teacher:
    needs_images = True

    def __init__(self, checkpoint_dir: str | Path, input_size: int = 518, device: str = "auto") -> None:
        try:
            import torch
            from transformers import DepthAnythingForDepthEstimation
        except ImportError as exc:
            raise ImportError(f"the Depth Anything V2 teacher needs the optional extra: pip install transformers ({exc})") from None
        if input_size < PATCH:
            raise ValueError(f"teacher.input_size must be >= {PATCH}, got {input_size}")
        self.identity = depth_anything_identity(checkpoint_dir, input_size)
        self.input_size = input_size
        self._torch = torch
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        model = DepthAnythingForDepthEstimation.from_pretrained(str(checkpoint_dir), local_files_only=True)
        self.model = model.to(self.device).eval()

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        h, w = network_input_shape(image.shape[0], image.shape[1], self.input_size)
        resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
        return ((resized - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)  # 3 h w

    def __call__(self, images: Sequence[np.ndarray], depths: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        torch = self._torch
        inputs = [self._prepare(img) for img in images]
        out: list[np.ndarray | None] = [None] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            by_shape.setdefault(x.shape, []).append(i)
        for idx in by_shape.values():  # images of one network shape form one forward pass
            batch = torch.from_numpy(np.stack([inputs[i] for i in idx])).to(self.device)
            with torch.inference_mode():
                pred = self.model(pixel_values=batch).predicted_depth  # B h w, relative disparity
            pred = pred.float().cpu().numpy()
            for j, i in enumerate(idx):
                h, w = images[i].shape[:2]
                full = cv2.resize(pred[j], (w, h), interpolation=cv2.INTER_LINEAR)
                out[i] = normalise_min_max(full)
        return [o for o in out if o is not None]


def make_teacher(kind: str, checkpoint: str = "", input_size: int = 518, device: str = "auto") -> Teacher | None:
    """Teacher from config values; None for kind "none"."""
    if kind == "none":
        return None
    if kind == "ground_truth":
        return GroundTruthDepthTeacher()
    if kind == "depth_anything_v2":
        if not checkpoint:
            raise ValueError("teacher.checkpoint must name a local Depth Anything V2 checkpoint directory")
        return DepthAnythingV2Teacher(checkpoint, input_size, device)
    raise ValueError(f"teacher.kind must be none, ground_truth or depth_anything_v2, got {kind!r}")


def teacher_identity(kind: str, checkpoint: str = "", input_size: int = 518) -> str:
    """The identity a teacher will have, without loading its weights ("" for no teacher)."""
    if kind == "none":
        return ""
    if kind == "ground_truth":
        return GroundTruthDepthTeacher.identity
    if kind == "depth_anything_v2":
        if not checkpoint:
            raise ValueError("teacher.checkpoint must name a local Depth Anything V2 checkpoint directory")
        return depth_anything_identity(checkpoint, input_size)
    raise ValueError(f"teacher.kind must be none, ground_truth or depth_anything_v2, got {kind!r}")

