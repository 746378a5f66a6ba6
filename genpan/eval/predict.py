"""Inference (paper 5.1): a trained model on a COCO panoptic split, a shard set or an image folder →
COCO panoptic predictions (`panoptic_{name}.json` + `panoptic_{name}/*.png`) that `eval/pq.py` scores.

    python eval/predict.py --checkpoint runs/coco/final.pt --coco-json coco/annotations/panoptic_val2017.json \\
        --out preds/
    python eval/predict.py --backend onnx --artefact model.onnx --images photos/ --out preds/ --name photos
    python eval/predict.py --checkpoint final.pt --coco-root data/synthetic --split val --save-raw --out preds/

Also written: `depth_{name}/*.png` (uint16 millimetres = sigmoid output × --depth-max) when the model has a
depth head, and with --save-raw `raw_{name}/*.npz` (eval/sweep.py's format: sem, inst, image_id,
train_to_category) for sweeping post-processing thresholds without rerunning the model.

Bad inputs and interruptions. An unreadable, empty, truncated or non-image input is skipped with one line
naming it; the run goes on, and the skipped inputs are listed with their reasons in `skipped.json` beside
the outputs (`--strict` stops at the first one instead). Every output file is written atomically and each
finished image is recorded in `.state_{name}/` after its PNGs, so a killed run, started again with the
same command, predicts only what is missing (`--force` redoes everything); the JSON is written last, in
the input's order, and is the same as an uninterrupted run's. Exit status: 0 all done; 3 done, some
inputs skipped; 2 bad arguments or an error that stopped the run.

Modes. `resize` (default): the short side goes to --size (default: the training crop's short side), both sides
rounded to multiples of the backbone's patch p (14 DINOv2, 16 DINOv3, from the model config); post-processing
runs at the model's output resolution (8/p of the input: 8/14, or 1/2 for DINOv3) and
the id map is resized back to the original image size (nearest), because PQ is scored at GT resolution.
`slide`: --size × --size windows at stride (1 − --overlap)·size over the image scaled to --slide-short-side.
Semantic logits and depth are averaged with a tent weight (highest at a window's centre). Instance codes
cannot be averaged: each window's codes say where a centroid is *relative to that window* (u = −1 at its left
edge). So each window's codes are decoded to a centroid on a fine grid (2G), moved to image coordinates,
re-encoded as γ(u_img), γ(v_img) scaled by the code's projection (so a weak, void-like output stays weak), and
every pixel takes the code of the window whose centre it is nearest (largest tent weight). The cost: an object
cut by that window's border gets the centroid of its visible part, and can split where the chosen window
changes; an overlap at least as large as the objects avoids it. Hence resize stays the default.

Pipeline. Worker threads read and resize the next images; the main thread groups them by size and runs
the forward pass; one worker post-processes batch k (`postprocess_outputs`, on the outputs' device, on a
side CUDA stream for CUDA outputs) while the model runs batch k+1, and another writes batch k-1's files.
At most MAX_IN_FLIGHT batches wait between the stages; an error in a worker stops the run.

Backends: `torch` (the checkpoint, eager), `export` (a `.pt2` from eval/export.py), `onnx` (onnxruntime).
All three run the same post-processing and write the same files. Checkpoints: the trainer's `final.pt`,
a `checkpoints/step-N` folder (or its `shared.pt`): {"model": state dict, "config": JSON of the TrainConfig};
categories come from the checkpoint when it has them, else from the input split or shards, else --categories.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from genpan.atomic import atomic_write_bytes, atomic_write_text
from genpan.coco_panoptic import encode_panoptic_png, load_panoptic_json
from genpan.config import from_dict, load_config, to_dict
from genpan.eval.overlays import overlay_picture, write_png
from genpan.eval.postprocess import PostprocessConfig, as_pe_embeddings, decode_embeddings, grid_centres, postprocess_batch, resize_id_map
from genpan.labels import pe_target
from genpan.prep.readers.base import contiguous_train_ids
from genpan.prep.readers.image_header import image_info
from genpan.train.checkpoint import read_checkpoint
from genpan.train.model import ModelConfig, PanopticModel, build_model

PATCH = 14  # the DINOv2 default; the model config's patch_size is used where a model is known
BACKENDS = ("torch", "export", "onnx")
EXIT_SKIPPED = 3  # done, but some inputs could not be read (listed in skipped.json)
MODES = ("resize", "slide")


# ------------------------------------------------------------------------------------ model + metadata
@dataclass
class InferenceMeta:
    """What inference needs besides weights: the model config, the category table and the input size."""

    model: ModelConfig
    categories: list[dict[str, Any]]  # id, name, isthing, train_id (contiguous 0..C-1)
    input_size: int  # short side of the training crop, px
    source: str = ""
    inst_encoding: str = "pe"  # how the instance head encodes centroids (the loss config's inst_encoding)
    num_harmonics: int = 4
    uv_bins: int = 80

    @property
    def train_to_category(self) -> list[int]:
        by_train = {int(c["train_id"]): int(c["id"]) for c in self.categories if 0 <= int(c["train_id"]) < 255}
        return [by_train[t] for t in range(len(by_train))]

    @property
    def thing_train_ids(self) -> set[int]:
        return {int(c["train_id"]) for c in self.categories if c["isthing"] and 0 <= int(c["train_id"]) < 255}

    def to_json(self) -> dict[str, Any]:
        return {"model": to_dict(self.model), "categories": self.categories, "input_size": self.input_size, "source": self.source,
                "inst_encoding": self.inst_encoding, "num_harmonics": self.num_harmonics, "uv_bins": self.uv_bins}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> InferenceMeta:
        try:
            model = from_dict(ModelConfig, data["model"], f"{where}: model")
            return cls(model, normalise_categories(data.get("categories") or [], where), int(data["input_size"]), str(data.get("source", "")),
                       str(data.get("inst_encoding", "pe")), int(data.get("num_harmonics", 4)), int(data.get("uv_bins", 80)))
        except KeyError as exc:
            raise ValueError(f"{where}: missing field {exc.args[0]!r}") from None


def normalise_categories(categories: Sequence[Any], where: str) -> list[dict[str, Any]]:
    """Category dicts or shard rows [id, name, isthing, train_id] → dicts; without train ids, COCO's contiguous order."""
    rows = []
    for c in categories:
        if isinstance(c, (list, tuple)) and len(c) == 4:
            rows.append({"id": int(c[0]), "name": str(c[1]), "isthing": int(bool(c[2])), "train_id": int(c[3])})
        elif isinstance(c, dict) and "id" in c:
            rows.append({"id": int(c["id"]), "name": str(c.get("name", c["id"])), "isthing": int(bool(c.get("isthing", 0))),
                         "train_id": int(c["train_id"]) if "train_id" in c else -1})
        else:
            raise ValueError(f"{where}: a category must be a dict with 'id' or an [id, name, isthing, train_id] row, got {c!r}")
    if rows and any(r["train_id"] < 0 for r in rows):
        rows = [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "train_id": c.train_id} for c in contiguous_train_ids(rows)]
    return rows


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checkpoint_for_inference(path: str | Path, categories: Sequence[Any] | None = None) -> tuple[PanopticModel, InferenceMeta]:
    """Model (eval mode, CPU) and metadata from a trainer checkpoint: `final.pt`, a `step-N` folder or its `shared.pt`.

    Accepted payload: {"model": state dict, "config": TrainConfig as a dict or JSON string, optional "categories"
    (dicts or [id, name, isthing, train_id] rows)}. `categories` (e.g. from the input split) is used when the
    checkpoint has none. Raises FileNotFoundError / ValueError naming the file.
    """
    path = Path(path)
    payload = read_checkpoint(path, "--checkpoint")
    if "config" not in payload:
        raise ValueError(f"{path}: not a genpan checkpoint (needs 'model' weights and 'config')")
    config = payload["config"]
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: the stored config is not JSON ({exc})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{path}: the stored config has no [model] section")
    model_cfg = from_dict(ModelConfig, config["model"], f"{path}: model")
    crop = (config.get("data") or {}).get("size") or [model_cfg.img_size]
    cats = normalise_categories(payload.get("categories") or categories or [], str(path))
    if not cats:
        raise ValueError(f"{path}: the checkpoint has no category table; pass --categories (a COCO panoptic JSON)")
    loss = config.get("loss") or {}
    meta = InferenceMeta(model_cfg, cats, int(min(crop)), str(path), str(loss.get("inst_encoding", "pe")),
                         int(loss.get("num_harmonics", 4)), int(loss.get("uv_bins", 80)))
    check_categories(meta, str(path))
    model = build_model(model_cfg)
    try:
        model.load_state_dict(_strip_prefixes(dict(payload["model"])))
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the stored model config: {str(exc).splitlines()[0]}") from None
    return model.eval(), meta


def check_categories(meta: InferenceMeta, where: str) -> None:
    n = len(meta.train_to_category)
    if n != meta.model.num_classes:
        raise ValueError(f"{where}: {n} trained categories but the model predicts {meta.model.num_classes} classes")


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Item:
    """One image to predict: its id for the JSON, its PNG name and where its bytes are."""

    image_id: Any
    file_name: str  # prediction PNG name
    path: str  # file, or "tar::member"
    height: int = 0
    width: int = 0


@dataclass
class Source:
    name: str
    items: list[Item]
    categories: list[dict[str, Any]] = field(default_factory=list)


def coco_source(json_path: Path, image_dir: Path | None) -> Source:
    data = load_panoptic_json(json_path)
    split = json_path.stem.removeprefix("panoptic_")
    image_dir = image_dir or json_path.parent.parent / split
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir} (set --image-dir)")
    anns = {a["image_id"]: a for a in data["annotations"]}
    items = []
    for img in data.get("images") or []:
        ann = anns.get(img["id"])
        png = ann["file_name"] if ann else Path(img["file_name"]).with_suffix(".png").name
        items.append(Item(img["id"], png, str(image_dir / img["file_name"]), int(img.get("height", 0)), int(img.get("width", 0))))
    if not items:
        raise ValueError(f"{json_path}: no 'images' listed")
    return Source(split, items, normalise_categories(data["categories"], str(json_path)))


def folder_source(root: Path) -> Source:
    from genpan.prep.readers.folder import ImageFolderReader

    refs = ImageFolderReader(root).refs()
    if not refs:
        raise ValueError(f"no .jpg/.png images under {root}")
    return Source("pred", [Item(r.key, f"{r.key}.png", r.image_path) for r in refs])


def shard_source(spec: str) -> Source:
    from genpan.prep.shards import check_sample_key
    from genpan.train.shard_urls import local_path, resolve_shards

    items, categories = [], []
    for url in resolve_shards(spec):
        path = local_path(url)
        if path is None:  # images are read back by member: a pipe or HTTP stream cannot seek
            raise ValueError(f"--shards {spec}: predict reads local shards (a folder, pattern or file: URL), got {url}")
        url = str(path)
        with tarfile.open(url) as tar:
            for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
                key, _, ext = member.name.partition(".")
                check_sample_key(key, f"{url} member {member.name!r}")
                if ext == "json" and not categories:  # every sample carries the shard set's category table
                    categories = normalise_categories(json.loads(tar.extractfile(member).read()).get("categories") or [], url)
                if ext in ("jpg", "png"):
                    items.append(Item(key, f"{key}.png", f"{url}::{member.name}"))
    if not items:
        raise ValueError(f"no images in shards {spec}")
    return Source("pred", items, categories)


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file or a `tar::member`; ValueError naming it when undecodable."""
    if "::" in path:
        url, member = path.split("::", 1)
        with tarfile.open(url) as tar:
            data = tar.extractfile(member).read()
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image not found: {path}")
        data = Path(path).read_bytes()
    try:
        image_info(data)  # a non-image, an empty or a truncated file, from its header and end marker
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: not a decodable image")
    return np.ascontiguousarray(img[..., ::-1])


def fit_size(h: int, w: int, short: int, patch: int = PATCH) -> tuple[int, int]:
    """Size with the short side ≈ `short`, the aspect kept, both sides multiples of `patch` (at least one patch)."""
    scale = short / min(h, w)
    return max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch)


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if (h, w) == img.shape[:2]:
        return img
    interp = cv2.INTER_AREA if h * w < img.shape[0] * img.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def to_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """(B, 3, H, W) float32 RGB in [0, 1]: the input every backend takes."""
    return np.stack([im.transpose(2, 0, 1) for im in images]).astype(np.float32) / 255.0


def prefetch(pool: ThreadPoolExecutor, fn, items: Sequence[Any], ahead: int) -> Iterator[Any]:
    """fn over items in order, at most `ahead` running in the pool (Executor.map would load them all at once)."""
    queue: deque = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) > ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


# ---------------------------------------------------------------------------------------------- backends
class Backend:
    """Callable (B, 3, H, W) float32 → {"sem", "inst"[, "depth"]} as numpy float32.

    `forward` is the same as tensors: a backend whose model runs in torch keeps them on its device, so
    post-processing starts there without a copy to the host (and without waiting for the copy)."""

    names: list[str]

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def forward(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self(batch).items()}


class TorchBackend(Backend):
    def __init__(self, model: torch.nn.Module, device: str, bf16: bool = False) -> None:
        self.model, self.device, self.bf16 = model.to(device).eval(), torch.device(device), bf16

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in self.forward(batch).items()}

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x)
        return {k: v.float() for k, v in out.items()}


class PEAdapter(Backend):
    """A model trained with an appendix C baseline encoding ("rgb", "uvcls") seen through PE embeddings,
    so post-processing, sliding windows and --save-raw treat every encoding alike."""

    def __init__(self, inner: Backend, meta: InferenceMeta) -> None:
        self.inner, self.meta = inner, meta

    def _as_pe(self, inst: np.ndarray) -> np.ndarray:
        m = self.meta
        return np.stack([as_pe_embeddings(x, m.inst_encoding, m.num_harmonics, m.uv_bins) for x in inst])

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        out = self.inner(batch)
        out["inst"] = self._as_pe(out["inst"])
        return out

    def forward(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        out = self.inner.forward(batch)
        inst = out["inst"]
        out["inst"] = torch.from_numpy(self._as_pe(inst.cpu().numpy())).to(inst.device)
        return out


class ExportBackend(Backend):
    def __init__(self, path: Path, names: list[str], device: str) -> None:
        program = torch.export.load(str(path))
        self.module, self.names, self.device = program.module().to(device), names, torch.device(device)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in self.forward(batch).items()}

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        out = self.module(torch.from_numpy(batch).to(self.device, non_blocking=True))
        return {k: v.float() for k, v in zip(self.names, out)}


class OnnxBackend(Backend):
    def __init__(self, path: Path, names: list[str], device: str, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError("--backend onnx needs onnxruntime: pip install 'genpan[onnx]'") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.names = names

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, {"images": batch})))


def read_artefact_meta(path: Path) -> tuple[InferenceMeta, dict[str, Any]]:
    """The sidecar `<artefact>.json` that eval/export.py writes: inference metadata + the artefact's outputs."""
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    side = path.with_name(path.name + ".json")
    if not side.is_file():
        raise FileNotFoundError(f"metadata not found: {side} (written by eval/export.py beside the artefact)")
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{side}: not valid JSON ({exc})") from None
    return InferenceMeta.from_json(data, str(side)), data


def open_backend(kind: str, checkpoint: Path | None, artefact: Path | None, device: str, categories, bf16=False, threads=0):
    """(backend, meta) for --backend; the exported artefacts must hold the raw outputs (not --decode)."""
    if kind not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {kind!r}")
    if kind == "torch":
        if checkpoint is None:
            raise ValueError("--backend torch needs --checkpoint")
        model, meta = load_checkpoint_for_inference(checkpoint, categories)
        return TorchBackend(model, device, bf16), meta
    if artefact is None:
        raise ValueError(f"--backend {kind} needs --artefact (a file written by eval/export.py)")
    meta, data = read_artefact_meta(artefact)
    if not meta.categories and categories:
        meta.categories = normalise_categories(categories, str(artefact))
    check_categories(meta, str(artefact))
    if data.get("decode_grid"):
        raise ValueError(f"{artefact}: exported with --decode; predict.py post-processes raw outputs, export without it")
    names = list(data.get("outputs") or [])
    if kind == "export":
        return ExportBackend(artefact, names, device), meta
    return OnnxBackend(artefact, names, device, threads), meta


# -------------------------------------------------------------------------------------------- sliding window
def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window origins covering [0, length): multiples of the stride (a multiple of the patch), the last flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride)) + [length - window]
    return sorted(set(starts))


def tent(n: int) -> np.ndarray:
    """Weight along one window axis: 1 at the border pixels, rising linearly to the centre."""
    i = np.arange(n)
    return np.minimum(i + 1, n - i).astype(np.float32)


def reencode_in_image(inst: np.ndarray, y0: int, x0: int, out_h: int, out_w: int, grid: int) -> np.ndarray:
    """A window's codes (4L, s_h, s_w) → codes of the same centroids in image coordinates (4L, s_h, s_w).

    Decode to the nearest point of a `grid`² lattice in window coordinates (u ∈ [−1, 1] across the window),
    shift and scale to the image, re-encode with pe_target (paper eq. 2-3) and scale by the projection of
    the original code on its nearest code (dot / ‖code‖²), so near-zero (void) outputs stay near zero.
    """
    c, sh, sw = inst.shape
    L = c // 4
    dec = decode_embeddings(inst, grid)
    centres = grid_centres(grid)
    u_win, v_win = centres[dec.a.numpy()], centres[dec.b.numpy()]
    x_px = x0 + (u_win + 1.0) / 2.0 * sw  # centroid, output-pixel edge coordinates of the whole image
    y_px = y0 + (v_win + 1.0) / 2.0 * sh
    u_img, v_img = 2.0 * x_px / out_w - 1.0, 2.0 * y_px / out_h - 1.0
    strength = (dec.agreement.numpy() * np.sqrt(dec.norm2.numpy())) / np.sqrt(2.0 * L)  # (e·code)/‖code‖²
    code = pe_target(u_img, v_img, np.ones_like(u_img, bool), L) * strength[:, None]
    return code.T.reshape(c, sh, sw).astype(np.float32)


def predict_sliding(backend: Backend, img: np.ndarray, window: int, overlap: float, batch: int, grid: int,
                    patch: int = PATCH) -> dict[str, np.ndarray]:
    """Stitched outputs at 8/p of `img` (already sized to multiples of the patch p); see the module docstring."""
    H, W = img.shape[:2]
    wh, ww = min(window, H), min(window, W)
    stride = max(patch, int(round(window * (1.0 - overlap) / patch)) * patch)
    boxes = [(y, x) for y in window_starts(H, wh, stride) for x in window_starts(W, ww, stride)]
    oh, ow, sh, sw = H * 8 // patch, W * 8 // patch, wh * 8 // patch, ww * 8 // patch
    weight = tent(sh)[:, None] * tent(sw)[None, :]
    acc: dict[str, np.ndarray] = {}
    total = np.zeros((oh, ow), np.float32)
    best = np.full((oh, ow), -1.0, np.float32)
    for start in range(0, len(boxes), batch):
        chunk = boxes[start : start + batch]
        out = backend(to_batch([img[y : y + wh, x : x + ww] for y, x in chunk]))
        for k, (y, x) in enumerate(chunk):
            oy, ox = y * 8 // patch, x * 8 // patch
            region = (slice(oy, oy + sh), slice(ox, ox + sw))
            for name in ("sem", "depth"):
                if name in out:
                    acc.setdefault(name, np.zeros((out[name].shape[1], oh, ow), np.float32))
                    acc[name][(slice(None),) + region] += out[name][k] * weight
            total[region] += weight
            code = reencode_in_image(out["inst"][k], oy, ox, oh, ow, 2 * grid)
            acc.setdefault("inst", np.zeros((code.shape[0], oh, ow), np.float32))
            take = weight > best[region]
            acc["inst"][(slice(None),) + region] = np.where(take, code, acc["inst"][(slice(None),) + region])
            best[region] = np.maximum(best[region], weight)
    for name in ("sem", "depth"):
        if name in acc:
            acc[name] /= total
    return acc


# ------------------------------------------------------------------------------------------------ writing
def depth_png_mm(depth01: np.ndarray, size: tuple[int, int], depth_max_m: float) -> bytes:
    depth = cv2.resize(depth01.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    mm = np.clip(np.round(depth * depth_max_m * 1000.0), 0, 65535).astype(np.uint16)
    ok, buf = cv2.imencode(".png", mm)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a depth PNG")
    return buf.tobytes()


@dataclass
class Settings:
    out: Path
    name: str
    mode: str = "resize"
    size: int = 0  # 0: the training crop's short side
    slide_short_side: int = 0  # 0: the image's own short side
    overlap: float = 1 / 3
    batch_size: int = 4
    depth_max: float = 10.0
    save_raw: bool = False
    progress: bool = True
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    strict: bool = False  # stop at the first unreadable input instead of skipping it
    overlays: bool = False  # also write overlay_{name}/*.png: the photo with its segmentation over it
    force: bool = False  # redo images a previous run already predicted


@dataclass
class PredictionRun:
    json_path: Path
    predicted: int
    resumed: int
    skipped: list[dict[str, str]]


def _run_fingerprint(meta: InferenceMeta, s: Settings) -> str:
    """What decides an image's outputs: a run resumes only over outputs made with the same."""
    keys = {"model": meta.source, "mode": s.mode, "size": s.size, "slide_short_side": s.slide_short_side, "overlap": s.overlap,
            "depth_max": s.depth_max, "save_raw": s.save_raw, "overlays": s.overlays, "postprocess": to_dict(s.postprocess)}
    return json.dumps(keys, sort_keys=True, default=str)


def _open_state(s: Settings, fingerprint: str) -> Path:
    """The folder of per-image records (`.state_{name}/`): each finished image's annotation, written
    after its PNGs, so a killed run resumes where it stopped and its JSON is assembled from them."""
    state = s.out / f".state_{s.name}"
    record = state / "run.json"
    if s.force and state.exists():
        shutil.rmtree(state)
    if record.is_file() and record.read_text() != fingerprint:
        raise ValueError(f"{s.out} holds predictions '{s.name}' made with another model or other settings; "
                         "pass --force to redo them (or choose another --out / --name)")
    state.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, fingerprint)
    return state


def _state_file(state: Path, item: Item) -> Path:
    return state / f"{item.file_name}.json"


MAX_IN_FLIGHT = 2  # batches of outputs held between the forward pass and the finished files


def postprocess_outputs(sem: Any, inst: Any, train_to_category: Sequence[int], thing_train_ids: set[int],
                        config: PostprocessConfig) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
    """A batch of outputs, sem (B, C, h, w) and inst (B, 4L, h, w) on any device → one (id map, segments)
    per image. Every prediction goes through here, whatever the mode or backend."""
    return postprocess_batch(sem, inst, train_to_category, thing_train_ids, config)


def _cuda_ready(out: dict[str, Any]) -> torch.cuda.Event | None:
    """An event after the forward pass that made `out`, on the stream it ran on; None for host outputs."""
    t = next((v for v in out.values() if isinstance(v, torch.Tensor) and v.is_cuda), None)
    if t is None:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return event


class PostWorker:
    """Post-processing in its own thread and, for CUDA outputs, on its own CUDA stream: its kernels
    interleave with the next forward pass, and its host syncs wait for its own work only, not for the
    forward pass queued behind it on the main stream."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, out: dict[str, Any], ready: torch.cuda.Event | None, train_to_category: Sequence[int],
                 thing_train_ids: set[int], config: PostprocessConfig,
                 to_host: Sequence[str] = ()) -> tuple[list[tuple[np.ndarray, list[dict[str, Any]]]], dict[str, np.ndarray]]:
        """(one (id map, segments) per image, the outputs named in `to_host` as numpy)."""
        with torch.inference_mode():  # the outputs are inference tensors; inference mode is per thread
            if ready is None:
                return self._run(out, train_to_category, thing_train_ids, config, to_host)
            device = out["sem"].device
            if device not in self.streams:
                self.streams[device] = torch.cuda.Stream(device)
            stream = self.streams[device]
            stream.wait_event(ready)
            for v in out.values():  # made on the main stream: not to be reused while this stream reads them
                if isinstance(v, torch.Tensor) and v.is_cuda:
                    v.record_stream(stream)
            with torch.cuda.stream(stream):
                return self._run(out, train_to_category, thing_train_ids, config, to_host)

    @staticmethod
    def _run(out: dict[str, Any], train_to_category: Sequence[int], thing_train_ids: set[int], config: PostprocessConfig,
             to_host: Sequence[str]) -> tuple[list[tuple[np.ndarray, list[dict[str, Any]]]], dict[str, np.ndarray]]:
        results = postprocess_outputs(out["sem"], out["inst"], train_to_category, thing_train_ids, config)
        return results, {name: _numpy(out[name]) for name in to_host if name in out}


def _numpy(x: Any) -> np.ndarray:
    return x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def run_prediction(backend: Backend, meta: InferenceMeta, source: Source, settings: Settings) -> PredictionRun:
    """Predict every item of `source`; returns the written JSON path, the counts and the skipped inputs.

    An unreadable, truncated or non-image input is skipped with one line naming it (or, with
    `settings.strict`, raises ValueError). Images whose outputs a previous run with the same settings
    finished are not predicted again (unless `settings.force`). The JSON is written last, atomically,
    from the per-image records, in the source's order: it never disagrees with the PNG folder.
    """
    s = settings
    if s.mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {s.mode!r}")
    size = s.size or meta.input_size
    patch = meta.model.patch_size
    if size % patch and s.mode == "slide":
        raise ValueError(f"--size must be a multiple of {patch} for sliding windows, got {size}")
    pan_dir, depth_dir, raw_dir = (s.out / f"{kind}_{s.name}" for kind in ("panoptic", "depth", "raw"))
    json_path = s.out / f"panoptic_{s.name}.json"
    skipped_path = s.out / "skipped.json"
    s.out.mkdir(parents=True, exist_ok=True)
    state = _open_state(s, _run_fingerprint(meta, s))
    json_path.unlink(missing_ok=True)  # until this run's JSON is written, none: never a stale one beside new PNGs
    pan_dir.mkdir(parents=True, exist_ok=True)
    t2c, things = meta.train_to_category, meta.thing_train_ids
    names = {int(c["id"]): str(c["name"]) for c in meta.categories}
    done = {i for i, item in enumerate(source.items) if _state_file(state, item).is_file()}
    todo = [(i, item) for i, item in enumerate(source.items) if i not in done]
    skipped: list[dict[str, str]] = []
    predicted = 0

    if meta.inst_encoding != "pe":
        backend = PEAdapter(backend, meta)

    def write_batch(group: list[tuple[Item, tuple[int, int]]], posted: Future) -> int:
        """The files of one post-processed batch; each image's record last, once its PNGs are on disk."""
        results, host = posted.result()  # post-processing's exception, if any, surfaces here and then in the main thread
        for k, ((item, orig), (pan, segments)) in enumerate(zip(group, results, strict=True)):
            pan, segments = resize_id_map(pan, segments, orig)
            atomic_write_bytes(pan_dir / item.file_name, encode_panoptic_png(pan))
            depth = host["depth"][k][0] if "depth" in host else None
            if depth is not None:
                atomic_write_bytes(depth_dir / item.file_name, depth_png_mm(depth, orig, s.depth_max))
            if s.save_raw:
                from genpan.eval.sweep import save_outputs

                raw_dir.mkdir(parents=True, exist_ok=True)
                save_outputs(raw_dir / Path(item.file_name).with_suffix(".npz"), item.image_id, host["sem"][k], host["inst"][k], t2c)
            if s.overlays:
                if depth is not None:
                    depth = cv2.resize(depth.astype(np.float32), (orig[1], orig[0]), interpolation=cv2.INTER_LINEAR)
                write_png(s.out / f"overlay_{s.name}" / item.file_name,
                          overlay_picture(read_rgb(item.path), (pan, segments), names, None, depth))
            record = {"annotation": {"image_id": item.image_id, "file_name": item.file_name, "segments_info": segments},
                      "image": {"id": item.image_id, "file_name": Path(item.path.split("::")[-1]).name,
                                "height": orig[0], "width": orig[1]}}
            atomic_write_text(_state_file(state, item), json.dumps(record))  # last: the image counts as done only now
        return len(group)

    def load(item: Item) -> tuple[np.ndarray, tuple[int, int]] | str:
        try:
            img = read_rgb(item.path)
        except (ValueError, OSError, cv2.error) as exc:  # the reason, for the skip line and skipped.json
            if s.strict:
                raise ValueError(f"{exc} (--strict stops at the first bad input)") from None
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        orig = img.shape[:2]
        if s.mode == "resize":
            return resize_rgb(img, fit_size(*orig, size, patch)), orig
        short = s.slide_short_side or min(orig)
        return resize_rgb(img, fit_size(*orig, short, patch)), orig

    # Three stages run at once: the main thread feeds the model batch k+1 while one worker post-processes
    # batch k and another writes batch k-1's files. At most MAX_IN_FLIGHT batches of outputs wait between
    # them, so memory stays bounded and a worker's exception stops the run within a few batches.
    in_flight: deque[Future] = deque()
    post_worker = PostWorker()
    to_host = ("depth",) + (("sem", "inst") if s.save_raw else ())  # copied to the host by the post-processing worker

    def collect(limit: int) -> None:
        nonlocal predicted
        while len(in_flight) > limit:
            predicted += in_flight.popleft().result()

    def submit(group: list[tuple[Item, tuple[int, int]]], out: dict[str, Any]) -> None:
        posted = post_pool.submit(post_worker, out, _cuda_ready(out), t2c, things, s.postprocess, to_host)
        in_flight.append(write_pool.submit(write_batch, group, posted))
        collect(MAX_IN_FLIGHT)

    pending: dict[tuple[int, int], list[tuple[Item, tuple[int, int], np.ndarray]]] = {}

    def flush(shape: tuple[int, int]) -> None:
        group = pending.pop(shape)
        submit([(item, orig) for item, orig, _ in group], backend.forward(to_batch([g[2] for g in group])))

    # decode/resize the next images, post-process and write in worker threads while the model runs
    with (ThreadPoolExecutor(max_workers=2) as pool, ThreadPoolExecutor(max_workers=1) as post_pool,
          ThreadPoolExecutor(max_workers=1) as write_pool):
        loaded = prefetch(pool, load, [item for _, item in todo], ahead=4 * s.batch_size)
        bar = tqdm(zip(todo, loaded), total=len(todo), desc="predict", unit="img", disable=not s.progress)
        for (_, item), got in bar:
            if isinstance(got, str):
                skipped.append({"path": item.path, "reason": got})
                tqdm.write(f"skipped: {got}" if item.path in got else f"skipped: {item.path}: {got}", file=sys.stderr)
                continue
            img, orig = got
            if s.mode == "slide":
                out = predict_sliding(backend, img, size, s.overlap, s.batch_size, s.postprocess.grid_size, patch)
                submit([(item, orig)], {k: v[None] for k, v in out.items()})
                continue
            pending.setdefault(img.shape[:2], []).append((item, orig, img))
            if len(pending[img.shape[:2]]) >= s.batch_size:
                flush(img.shape[:2])
        for shape in list(pending):
            flush(shape)
        collect(0)

    records = [json.loads(_state_file(state, item).read_text()) for item in source.items if _state_file(state, item).is_file()]
    result = {
        "info": {"description": f"genpan predictions ({meta.source})"},
        "images": [r["image"] for r in records],
        "annotations": [r["annotation"] for r in records],
        "categories": [{k: c[k] for k in ("id", "name", "isthing")} for c in sorted(meta.categories, key=lambda c: c["id"])],
    }
    if skipped:
        atomic_write_text(skipped_path, json.dumps(skipped, indent=1))
    else:
        skipped_path.unlink(missing_ok=True)
    atomic_write_text(json_path, json.dumps(result))
    return PredictionRun(json_path, predicted, len(done), skipped)


# ------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/predict.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--backend", choices=BACKENDS, default="torch",
                       help="torch: eager PyTorch from --checkpoint; export: a .pt2 program; onnx: onnxruntime (default torch)")
    model.add_argument("--checkpoint", type=Path, help="trainer checkpoint: final.pt, a checkpoints/step-N folder or its shared.pt")
    model.add_argument("--artefact", type=Path, help="model.pt2 or model.onnx from eval/export.py (with its .json beside it)")
    model.add_argument("--categories", type=Path,
                       help="COCO panoptic JSON whose categories define the train ids, for checkpoints without a table")
    model.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    model.add_argument("--bf16", action="store_true", help="torch backend: run under bf16 autocast")
    model.add_argument("--threads", type=int, default=0, help="CPU threads for torch / onnxruntime (0 = library default)")
    data = p.add_argument_group("input (one of)")
    data.add_argument("--coco-json", type=Path, help="COCO panoptic JSON of the split (images listed there)")
    data.add_argument("--image-dir", type=Path, help="images of --coco-json (default: the COCO layout, root/{split}/)")
    data.add_argument("--coco-root", type=Path, help="COCO-layout root with annotations/panoptic_{split}.json (with --split)")
    data.add_argument("--split", help="split name for --coco-root, e.g. val2017")
    data.add_argument("--shards", help="a directory of *.tar shards or a brace pattern")
    data.add_argument("--images", type=Path, help="a folder of .jpg/.png images (searched recursively)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="output folder (created)")
    out.add_argument("--name", help="output name: panoptic_{name}.json (default: the split name, else 'pred')")
    out.add_argument("--save-raw", action="store_true", help="also write raw_{name}/*.npz (sem, inst) for eval/sweep.py")
    out.add_argument("--overlays", action="store_true", help="also write overlay_{name}/*.png: each photo with its segmentation, outlines and a legend")
    out.add_argument("--strict", action="store_true", help="stop at the first unreadable input (default: skip it, list it in skipped.json, exit 3)")
    out.add_argument("--force", action="store_true", help="predict again the images an earlier run in --out already finished")
    out.add_argument("--depth-max", type=float, default=10.0,
                     help="metres that the depth head's output 1.0 stands for (default 10, NYUv2; paper 5.1)")
    run = p.add_argument_group("inference")
    run.add_argument("--mode", choices=MODES, default="resize", help="resize (default) or slide (sliding windows)")
    run.add_argument("--size", type=int, default=0,
                     help="resize: short side in px, rounded to the patch (14, DINOv3 16); slide: window side (a multiple of it); default: training crop")
    run.add_argument("--slide-short-side", type=int, default=0, help="slide: image short side before windowing (default: original)")
    run.add_argument("--overlap", type=float, default=1 / 3, help="slide: window overlap fraction in [0, 1) (default 1/3)")
    run.add_argument("--batch-size", type=int, default=4, help="images (or windows) per forward pass (default 4)")
    run.add_argument("--postprocess-config", type=Path, help="TOML of PostprocessConfig values (e.g. eval/sweep.py's best.toml)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def make_source(args: argparse.Namespace) -> Source:
    given = [n for n in ("coco_json", "coco_root", "shards", "images") if getattr(args, n) is not None]
    if len(given) != 1:
        raise ValueError("give exactly one input: --coco-json, --coco-root with --split, --shards or --images")
    if args.coco_json is not None:
        return coco_source(args.coco_json, args.image_dir)
    if args.coco_root is not None:
        if not args.split:
            raise ValueError("--coco-root needs --split")
        json_path = args.coco_root / "annotations" / f"panoptic_{args.split}.json"
        if not json_path.is_file():
            raise FileNotFoundError(f"split {args.split!r} not found: {json_path}")
        return coco_source(json_path, args.image_dir or args.coco_root / args.split)
    if args.shards is not None:
        return shard_source(args.shards)
    if not args.images.is_dir():
        raise FileNotFoundError(f"image folder not found: {args.images}")
    return folder_source(args.images)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1 or not 0.0 <= args.overlap < 1.0 or args.depth_max <= 0:
            raise ValueError("--batch-size must be >= 1, --overlap in [0, 1), --depth-max > 0")
        if args.threads:
            torch.set_num_threads(args.threads)
        source = make_source(args)
        categories = source.categories
        if args.categories is not None:
            categories = normalise_categories(load_panoptic_json(args.categories)["categories"], str(args.categories))
        backend, meta = open_backend(args.backend, args.checkpoint, args.artefact, args.device, categories, args.bf16, args.threads)
        post = load_config(PostprocessConfig, args.postprocess_config) if args.postprocess_config else PostprocessConfig()
        settings = Settings(args.out, args.name or source.name, args.mode, args.size, args.slide_short_side, args.overlap,
                            args.batch_size, args.depth_max, args.save_raw, not args.no_progress, post, strict=args.strict, force=args.force, overlays=args.overlays)
        run = run_prediction(backend, meta, source, settings)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path = run.json_path
    resumed = f", {run.resumed} from an earlier run" if run.resumed else ""
    print(f"predictions written to {json_path} and {json_path.parent / ('panoptic_' + settings.name)}/ "
          f"({run.predicted} predicted{resumed})")
    if run.skipped:
        print(f"{len(run.skipped)} input(s) skipped, listed with their reasons in {json_path.parent / 'skipped.json'}:", file=sys.stderr)
        for entry in run.skipped:
            print(f"  {entry['path']}: {entry['reason']}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
