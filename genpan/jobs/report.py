"""The run report of the main job: PQ (eval/pq.py's library on the prediction files), PQ by size,
depth metrics, loss curves, qualitative overlays and the run's identity, in one folder.

    python jobs/report.py --run runs/demo            # the demo's layout: data/, train/, predictions/
    python jobs/report.py --gt-json … --gt-dir … --pred-json … --pred-dir … --image-dir … \
        [--metrics train/metrics.jsonl] [--checkpoint train/final.pt] [--depth-gt-dir … --depth-pred-dir …] --out report/

The PQ numbers are exactly those `python eval/pq.py` prints for the same files (same function).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import cv2

from genpan.coco_panoptic import load_panoptic_json, read_panoptic_png
from genpan.eval.depth import depth_table_markdown, evaluate_folders
from genpan.eval.overlays import panel, write_overlays
from genpan.eval.plots import plot_loss_curves
from genpan.eval.pq import format_summary_table, pq_compute
from genpan.eval.pq_match import PQInputError
from genpan.eval.report import write_report


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def training_section(metrics_path: Path, out: Path) -> str:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        return "No training steps were logged."
    plot_loss_curves(records, out / "loss_curves.png")
    first, last = records[0], records[-1]
    terms = [k for k in last if k not in ("step", "lr", "images_per_s", "epoch") and isinstance(last[k], (int, float))]
    rows = "\n".join(f"| {k} | {first.get(k, float('nan')):.4f} | {last[k]:.4f} |" for k in terms)
    return (
        f"{last['step']} steps logged in `{metrics_path}`.\n\n| term | first logged | last logged |\n|---|---|---|\n{rows}\n\n"
        "![loss curves](loss_curves.png)"
    )


def overlays_section(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path, image_dir: Path, out: Path, count: int) -> str:
    gt = load_panoptic_json(gt_json)
    pred = {a["image_id"]: a for a in load_panoptic_json(pred_json, required=("annotations",))["annotations"]}
    files = {im["id"]: im["file_name"] for im in gt["images"]}
    rows = []
    for ann in gt["annotations"][:count]:
        p = pred.get(ann["image_id"])
        image = cv2.imread(str(image_dir / files[ann["image_id"]]), cv2.IMREAD_COLOR)
        if p is None or image is None:
            continue
        rows.append(panel(image[..., ::-1],
                          (read_panoptic_png(gt_dir / ann["file_name"]), ann["segments_info"]),
                          (read_panoptic_png(pred_dir / p["file_name"]), p["segments_info"])))
    if not rows:
        return "No image had both a ground truth and a prediction."
    write_overlays(rows, out / "overlays.png")
    return f"The first {len(rows)} held-out images: image | ground truth | prediction.\n\n![overlays](overlays.png)"


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    result = pq_compute(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, workers=args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    sections: dict[str, str] = {}
    metadata: dict[str, Any] = {}
    if args.depth_gt_dir and args.depth_pred_dir and Path(args.depth_pred_dir).is_dir():
        metrics, _ = evaluate_folders(args.depth_gt_dir, args.depth_pred_dir, max_depth=args.depth_max_gt,
                                      eigen_crop=False, disparity_scale_m=args.disparity)
        protocol = ("relative depth: predicted disparity aligned per image by least-squares scale and shift "
                    "(MiDaS / Depth Anything protocol)" if args.disparity else "metric depth")
        sections["Depth"] = f"{protocol}; whole image, ground truth in (1e-3, {args.depth_max_gt:g}] m.\n\n" + (
            depth_table_markdown(metrics) if metrics else "no valid ground-truth depth")
    if args.metrics and Path(args.metrics).is_file():
        sections["Training"] = training_section(Path(args.metrics), args.out)
    if args.image_dir:
        sections["Qualitative"] = overlays_section(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir,
                                                   args.image_dir, args.out, args.overlays)
    if args.checkpoint and Path(args.checkpoint).is_file():
        metadata["checkpoint"] = str(args.checkpoint)
        metadata["checkpoint_sha256"] = file_sha256(Path(args.checkpoint))
    if args.config and Path(args.config).is_file():
        metadata["config"] = str(args.config)
        sections["Configuration"] = "```toml\n" + Path(args.config).read_text().strip() + "\n```"
    write_report(args.out, result, extra_sections=sections, metadata=metadata)
    print(format_summary_table(result))
    print(f"report → {args.out / 'report.md'}")
    return result.summary()


def fill_run_defaults(args: argparse.Namespace) -> None:
    """--run DIR fills every path of the demo's layout that was not given."""
    run = args.run
    defaults = {
        "gt_json": run / "data/annotations/panoptic_val.json", "gt_dir": run / "data/annotations/panoptic_val",
        "pred_json": run / "predictions/panoptic_val.json", "pred_dir": run / "predictions/panoptic_val",
        "image_dir": run / "data/val", "metrics": run / "train/metrics.jsonl", "checkpoint": run / "train/final.pt",
        "config": run / "train/config.resolved.toml", "depth_gt_dir": run / "data/depth_val",
        "depth_pred_dir": run / "predictions/depth_val", "out": run / "report",
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the run report: PQ, PQ by size, depth, loss curves, overlays, identity.")
    parser.add_argument("--run", type=Path, help="a demo run folder (data/, train/, predictions/); fills the paths below")
    for name, text in [("gt-json", "ground-truth panoptic JSON"), ("gt-dir", "ground-truth PNG folder"),
                       ("pred-json", "predicted panoptic JSON"), ("pred-dir", "predicted PNG folder"),
                       ("image-dir", "images, for the qualitative overlays"), ("metrics", "the trainer's metrics.jsonl"),
                       ("checkpoint", "the checkpoint scored (its sha256 goes into the report)"),
                       ("config", "the resolved training config"), ("depth-gt-dir", "ground-truth depth PNGs (mm)"),
                       ("depth-pred-dir", "predicted depth PNGs (mm)"), ("out", "report folder")]:
        parser.add_argument(f"--{name}", type=Path, default=None, help=text)
    parser.add_argument("--disparity", type=float, default=None, metavar="DEPTH_MAX",
                        help="the depth head predicts relative disparity (written with predict.py --depth-max DEPTH_MAX)")
    parser.add_argument("--depth-max-gt", type=float, default=80.0, help="valid ground-truth depth is at most this (m; default 80)")
    parser.add_argument("--overlays", type=int, default=6, help="images in the qualitative panel (default 6)")
    parser.add_argument("--workers", type=int, default=1, help="PQ worker processes (default 1)")
    args = parser.parse_args(argv)
    if args.run is not None:
        fill_run_defaults(args)
    missing = [n for n in ("gt_json", "gt_dir", "pred_json", "pred_dir", "out") if getattr(args, n) is None]
    if missing:
        print(f"error: give --run or all of {', '.join('--' + m.replace('_', '-') for m in missing)}", file=sys.stderr)
        return 2
    try:
        build_report(args)
    except (PQInputError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
