"""Pictures of a prediction folder: per image, the photo with the predicted panoptic segmentation blended
over it, instance outlines and a legend of the classes present; beside it the ground truth when one is
given and the depth map when the predictions have one.

    python eval/visualize.py --pred-json preds/panoptic_photos.json --image-dir photos/ --out pictures/
    python eval/visualize.py --pred-json preds/panoptic_val.json --image-dir coco/val2017 \\
        --gt-json coco/annotations/panoptic_val2017.json --out pictures/ --limit 20

Image files are found by the `file_name` of the prediction JSON's `images` (or, without them, the GT
JSON's); one PNG per image is written to --out under the prediction's PNG name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from genpan.coco_panoptic import load_panoptic_json, read_panoptic_png
from genpan.eval.overlays import overlay_picture, write_png


def _images_by_id(*jsons: dict[str, Any] | None) -> dict[Any, str]:
    for data in jsons:
        if data and data.get("images"):
            return {img["id"]: img["file_name"] for img in data["images"]}
    return {}


def visualize(pred_json: Path, pred_dir: Path | None, image_dir: Path, out: Path, gt_json: Path | None = None,
              gt_dir: Path | None = None, depth_dir: Path | None = None, limit: int | None = None,
              progress: bool = True) -> list[Path]:
    """Write one overlay picture per predicted image; returns the written paths. Unreadable images are
    skipped with one line each."""
    pred = load_panoptic_json(pred_json, required=("annotations",))
    pred_dir = pred_dir or pred_json.with_suffix("")
    gt = load_panoptic_json(gt_json) if gt_json else None
    gt_dir = gt_dir or (gt_json.with_suffix("") if gt_json else None)
    if depth_dir is None:
        guess = pred_json.parent / pred_json.stem.replace("panoptic_", "depth_", 1)
        depth_dir = guess if guess.is_dir() else None
    categories = (gt or {}).get("categories") or pred.get("categories") or []
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    files = _images_by_id(pred, gt)
    gt_anns = {a["image_id"]: a for a in gt["annotations"]} if gt else {}
    written = []
    anns = pred["annotations"][:limit] if limit else pred["annotations"]
    for ann in tqdm(anns, desc="pictures", unit="img", disable=not progress):
        name = files.get(ann["image_id"])
        if name is None:
            print(f"skipped: image {ann['image_id']!r} is not listed in the JSON's images", file=sys.stderr)
            continue
        image = cv2.imread(str(image_dir / name), cv2.IMREAD_COLOR)
        if image is None:
            print(f"skipped: {image_dir / name}: not a readable image", file=sys.stderr)
            continue
        photo = np.ascontiguousarray(image[..., ::-1])
        pred_ids = read_panoptic_png(pred_dir / ann["file_name"])
        truth = None
        if ann["image_id"] in gt_anns and gt_dir is not None:
            g = gt_anns[ann["image_id"]]
            truth = (read_panoptic_png(gt_dir / g["file_name"]), g["segments_info"])
        depth = None
        if depth_dir is not None and (depth_dir / ann["file_name"]).is_file():
            depth = cv2.imread(str(depth_dir / ann["file_name"]), cv2.IMREAD_UNCHANGED)
        picture = overlay_picture(photo, (pred_ids, ann["segments_info"]), names, truth, depth)
        written.append(write_png(out / ann["file_name"], picture))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval/visualize.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred-json", type=Path, required=True, help="COCO panoptic prediction JSON")
    parser.add_argument("--pred-dir", type=Path, help="its PNG folder (default: the JSON path without .json)")
    parser.add_argument("--image-dir", type=Path, required=True, help="the photos the predictions were made on")
    parser.add_argument("--gt-json", type=Path, help="ground truth, shown beside the prediction")
    parser.add_argument("--gt-dir", type=Path, help="GT PNG folder (default: the GT JSON path without .json)")
    parser.add_argument("--depth-dir", type=Path, help="depth PNGs (default: depth_{name}/ beside the JSON when present)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pictures")
    parser.add_argument("--limit", type=int, help="only the first N predictions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        written = visualize(args.pred_json, args.pred_dir, args.image_dir, args.out, args.gt_json, args.gt_dir,
                            args.depth_dir, args.limit, not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(written)} pictures written to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
