"""Export a trained checkpoint to a `torch.export` program (`.pt2`) and/or ONNX, for any batch and image size.

    python eval/export.py --checkpoint runs/coco/final.pt --out export/model        # model.pt2 + model.onnx
    python eval/export.py --checkpoint final.pt --out export/model --format onnx --decode 80

The artefact takes `images` (B, 3, H, W) float32 RGB in [0, 1], H and W any multiples of the backbone's patch p
(14 DINOv2, 16 DINOv3; dynamic, as is B), and returns `sem` (B, C, h, w) logits, `inst` (B, 4L, h, w) and, with a
depth head, `depth` (B, 1, h, w) in [0, 1]; h = 8·H/p. With `--decode G` the uv-grid decode of paper 5.1 runs inside the graph and the outputs
are `sem_id` (B, h, w) int64 train ids, `inst_cell` (B, h, w) int64 = v_idx·G + u_idx (the grid cell of the
nearest instance code, G + G argmin) and `depth` (B, h, w). Beside each artefact, `<artefact>.json` holds
the model config, the category table (train id → category id, isthing) and the output names, which
`eval/predict.py --backend export|onnx --artefact ...` reads.

The DINOv2 position-table resize is re-expressed as two bicubic interpolation matrices (genpan/eval/exported.py), so the
programs carry no guard on the image size; genpan/eval/exported.py explains why the eager module would specialise.
DINOv3's RoPE tables are computed in the graph from `arange` of the symbolic patch grid, with no branch on it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim, ExportedProgram

from genpan.atomic import atomic_write_text
from genpan.coco_panoptic import load_panoptic_json
from genpan.eval.exported import ExportPredictor
from genpan.eval.predict import InferenceMeta, load_checkpoint_for_inference, normalise_categories

FORMATS = ("pt2", "onnx")
DEFAULT_OPSET = 18
MAX_GRID = 256  # patches per side the dynamic shapes allow: 3584 px at patch 14, 4096 px at 16


def dynamic_shapes(patch_size: int = 14, max_grid: int = MAX_GRID) -> dict[str, dict[int, Any]]:
    """Batch 1..4096 and H, W = p·k for k in 2..max_grid."""
    batch = Dim("batch", min=1, max=4096)
    grid_h, grid_w = Dim("grid_h", min=2, max=max_grid), Dim("grid_w", min=2, max=max_grid)
    return {"images": {0: batch, 2: patch_size * grid_h, 3: patch_size * grid_w}}


def example_input(predictor: ExportPredictor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A batch of 2 (batch 1 would be specialised as a constant) at a non-square, non-native size."""
    cfg = predictor.model.cfg
    p = cfg.patch_size
    side = cfg.img_size // p
    h, w = size or (p * max(2, side - 1), p * (side + 1))
    return torch.rand(2, 3, h, w)


def export_program(predictor: ExportPredictor, example: torch.Tensor | None = None) -> ExportedProgram:
    """`torch.export` of the predictor with dynamic batch and image size."""
    example = example_input(predictor) if example is None else example
    with torch.no_grad():
        return torch.export.export(predictor, (example,), dynamic_shapes=dynamic_shapes(predictor.patch_size))


def export_onnx(predictor: ExportPredictor, path: str | Path, example: torch.Tensor | None = None,
                opset: int = DEFAULT_OPSET, verbose: bool = False) -> Path:
    """ONNX through the dynamo exporter (opset ≥ 17), input `images`, outputs named as `predictor.output_names`."""
    if opset < 17:
        raise ValueError(f"--opset must be at least 17 (LayerNormalization, GroupNorm decompositions), got {opset}")
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install 'genpan[onnx]' onnxscript") from None
    example = example_input(predictor) if example is None else example
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with torch.no_grad(), quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            predictor, (example,), input_names=["images"], output_names=predictor.output_names,
            dynamic_shapes=dynamic_shapes(predictor.patch_size), opset_version=opset, dynamo=True, external_data=False,
        )
        program.save(str(path))
    return path


def write_artefact_meta(path: Path, meta: InferenceMeta, predictor: ExportPredictor, fmt: str) -> Path:
    data = {
        **meta.to_json(),
        "format": fmt,
        "decode_grid": predictor.decode_grid,
        "inputs": {"images": f"float32 (B, 3, H, W) RGB in [0, 1]; H, W multiples of {predictor.patch_size}"},
        "outputs": predictor.output_names,
        "train_to_category": meta.train_to_category,
    }
    return atomic_write_text(path.with_name(path.name + ".json"), json.dumps(data, indent=1))


def export_checkpoint(checkpoint: str | Path, out: str | Path, formats: Sequence[str] = FORMATS, decode_grid: int = 0,
                      categories: Sequence[Any] | None = None, opset: int = DEFAULT_OPSET) -> list[Path]:
    """Export `checkpoint` to `out`.pt2 and/or `out`.onnx (+ a .json each); returns the artefact paths."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--format must be among {FORMATS}, got {list(formats)}")
    model, meta = load_checkpoint_for_inference(checkpoint, categories)
    predictor = ExportPredictor(model, decode_grid)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = out.with_name(f"{out.name}.{fmt}")
        if fmt == "pt2":
            torch.export.save(export_program(predictor), str(path))
        else:
            export_onnx(predictor, path, opset=opset)
        write_artefact_meta(path, meta, predictor, fmt)
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="trainer checkpoint: final.pt, checkpoints/step-N or its shared.pt")
    p.add_argument("--out", type=Path, required=True, help="output path without suffix: writes OUT.pt2 / OUT.onnx and OUT.<fmt>.json")
    p.add_argument("--format", choices=FORMATS + ("both",), default="both", help="pt2, onnx or both (default both)")
    p.add_argument("--decode", type=int, default=0, metavar="G",
                   help="put the uv-grid decode (G×G grid, G + G argmin) in the graph: outputs sem_id, inst_cell, depth "
                        "(default 0: raw sem, inst, depth, which eval/predict.py needs)")
    p.add_argument("--categories", type=Path, help="COCO panoptic JSON giving the category table when the checkpoint has none")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, at least 17 (default {DEFAULT_OPSET})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.decode and args.decode < 2:
            raise ValueError(f"--decode must be 0 or a grid size >= 2, got {args.decode}")
        categories = None
        if args.categories is not None:
            categories = normalise_categories(load_panoptic_json(args.categories)["categories"], str(args.categories))
        formats = FORMATS if args.format == "both" else (args.format,)
        paths = export_checkpoint(args.checkpoint, args.out, formats, args.decode, categories, args.opset)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path} and {path.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
