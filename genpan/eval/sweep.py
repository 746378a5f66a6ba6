"""Grid search of post-processing parameters on a validation set, scored with PQ.

Raw model outputs are one `.npz` per image (written by `save_outputs`, used by the inference script):
    sem                (C, h, w) float16/32 semantic logits over contiguous train ids
    inst               (4L, h, w) float16/32 instance embeddings
    image_id           the GT JSON's image_id (int or str)
    train_to_category  optional (C,) int: category id of each train id; default: the GT categories
                       sorted by id (genpan.prep.readers.base.contiguous_train_ids, the training convention)
Outputs at a resolution other than the GT's are post-processed as they are and the id map is
resized to the GT size (nearest neighbour) before scoring.

    python eval/sweep.py --outputs raw/ --gt-json val.json --grid grid_size=40,80 \\
        --grid merge_adjacent=true,false --out sweep/
    python eval/sweep.py --sanity --gt-json val.json --out sweep/   # ideal outputs from GT: PQ ≈ 1

Writes `sweep.json` (every config and its scores), `sweep.md` (the table) and `best.toml` (the best
config by PQ, loadable with genpan.config.load_config(PostprocessConfig, ...)).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from genpan.atomic import atomic_write_text
from genpan.coco_panoptic import load_panoptic_json, read_panoptic_png
from genpan.config import dump_toml, from_dict, load_config, parse_override, to_dict
from genpan.eval.postprocess import PostprocessConfig, ideal_outputs, postprocess, resize_id_map
from genpan.prep.readers.base import contiguous_train_ids

# ------------------------------------------------------------------------------------ raw outputs


def save_outputs(path: str | Path, image_id: Any, sem: np.ndarray, inst: np.ndarray, train_to_category: Sequence[int] | None = None,
                 dtype: Any = np.float32) -> Path:
    """Write one image's raw outputs in the sweep's `.npz` format. float32 (the default) keeps the values
    post-processing saw, so the sweep scores exactly the maps predict writes; float16 halves the size."""
    arrays: dict[str, Any] = {"sem": np.asarray(sem, dtype), "inst": np.asarray(inst, dtype), "image_id": np.asarray(image_id)}
    if train_to_category is not None:
        arrays["train_to_category"] = np.asarray(train_to_category, np.int64)
    path = Path(path)
    np.savez(path, **arrays)
    return path


@dataclass
class RawOutputs:
    image_id: Any
    sem: np.ndarray
    inst: np.ndarray
    train_to_category: list[int] | None


def load_outputs(path: str | Path) -> RawOutputs:
    """Read one `.npz` of raw outputs; a missing key or bad shape is a ValueError naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, EOFError, ValueError) as exc:  # ValueError: not a zip, so numpy took it for a pickle
        raise ValueError(f"{path}: not a readable .npz of raw outputs") from exc
    missing = {"sem", "inst", "image_id"} - set(arrays)
    if missing:
        raise ValueError(f"{path}: missing array(s) {sorted(missing)}")
    sem, inst, image_id = arrays["sem"].astype(np.float32), arrays["inst"].astype(np.float32), arrays["image_id"].item()
    t2c = arrays["train_to_category"].astype(int).tolist() if "train_to_category" in arrays else None
    if sem.ndim != 3 or inst.ndim != 3 or sem.shape[1:] != inst.shape[1:] or inst.shape[0] % 4:
        raise ValueError(f"{path}: need sem (C, h, w) and inst (4L, h, w), got {sem.shape} and {inst.shape}")
    return RawOutputs(image_id, sem, inst, t2c)


# ---------------------------------------------------------------------------------------- scoring


class Scorer(Protocol):
    """Accumulates per-image PQ statistics; `summary` gives at least a "pq" figure."""

    def image(self, gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray, pred_segments: list[dict], name: str) -> Any: ...

    def summary(self, image_ids: Sequence[Any], stats: Sequence[Any]) -> dict[str, float]: ...


class PQScorer:
    """Adapter to `genpan.eval.pq_match.pq_image` / `genpan.eval.pq.PQResult`: the COCO PQ definition."""

    def __init__(self, categories: Sequence[Mapping[str, Any]]) -> None:
        from genpan.eval.pq_match import CategoryTable

        self.categories = CategoryTable.from_coco(categories)

    def image(self, gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray, pred_segments: list[dict], name: str) -> Any:
        from genpan.eval.pq_match import pq_image

        return pq_image(gt_ids, gt_segments, pred_ids, pred_segments, self.categories, name)

    def summary(self, image_ids: Sequence[Any], stats: Sequence[Any]) -> dict[str, float]:
        from genpan.eval.pq import PQResult

        summ = PQResult.from_images(self.categories, image_ids, stats).summary()
        out = {k: summ["All"][k] for k in ("pq", "sq", "rq")}
        out.update(pq_things=summ["Things"]["pq"], pq_stuff=summ["Stuff"]["pq"])
        return out


# ------------------------------------------------------------------------------------------- grid


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """['grid_size=40,80', 'merge_adjacent=true,false'] → {name: [values]}, each checked by the schema."""
    fields = {f.name for f in dataclasses.fields(PostprocessConfig)}
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid {item!r} must look like name=v1,v2,...")
        name, raw = item.split("=", 1)
        name = name.strip()
        if name not in fields:
            raise ValueError(f"--grid {name!r} is not a PostprocessConfig field; known: {sorted(fields)}")
        if name in grid:
            raise ValueError(f"--grid {name!r} given twice")
        values = [parse_override(f"{name}={v.strip()}")[1] for v in raw.split(",") if v.strip()]
        if not values:
            raise ValueError(f"--grid {name!r} has no values")
        for v in values:  # type and range errors now, not after an hour of scoring
            from_dict(PostprocessConfig, {name: v}, "--grid")
        grid[name] = values
    return grid


def grid_configs(base: PostprocessConfig, grid: Mapping[str, Sequence[Any]]) -> list[tuple[dict[str, Any], PostprocessConfig]]:
    """Every combination of the grid over `base`, as (overrides, config), in row-major order."""
    names = list(grid)
    out = []
    for combo in itertools.product(*(grid[n] for n in names)):
        overrides = dict(zip(names, combo))
        out.append((overrides, from_dict(PostprocessConfig, {**to_dict(base), **overrides}, "--grid")))
    return out


# --------------------------------------------------------------------------------------- the sweep


@dataclass
class GTImage:
    image_id: Any
    name: str
    pan_ids: np.ndarray
    segments: list[dict]


def run_sweep(
    images: Iterator[tuple[GTImage, RawOutputs]],
    configs: Sequence[tuple[dict[str, Any], PostprocessConfig]],
    default_train_to_category: list[int],
    thing_categories: set[int],
    scorer: Scorer,
    total: int | None = None,
) -> list[dict[str, Any]]:
    """Post-process every image under every config and score; one row per config, best PQ first.

    Images are the outer loop, so each raw output is read once whatever the grid size.
    """
    stats: list[list[Any]] = [[] for _ in configs]
    image_ids: list[Any] = []
    for gt, raw in tqdm(images, total=total, desc="sweep", unit="img"):
        t2c = raw.train_to_category or default_train_to_category
        if len(t2c) != raw.sem.shape[0]:
            raise ValueError(f"{gt.name}: {raw.sem.shape[0]} semantic channels but {len(t2c)} train ids")
        thing_train = {t for t, c in enumerate(t2c) if c in thing_categories}
        image_ids.append(gt.image_id)
        for k, (_, cfg) in enumerate(configs):
            pred, segs = postprocess(raw.sem, raw.inst, t2c, thing_train, cfg)
            pred, segs = resize_id_map(pred, segs, gt.pan_ids.shape)
            stats[k].append(scorer.image(gt.pan_ids, gt.segments, pred, segs, gt.name))
    rows = [{"params": overrides, "config": to_dict(cfg), **scorer.summary(image_ids, s)} for (overrides, cfg), s in zip(configs, stats)]
    rows.sort(key=lambda r: -r["pq"])  # stable: ties keep grid order
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: the swept parameters, then the scores (×100, as papers report PQ)."""
    names = list(rows[0]["params"]) if rows else []
    scores = [k for k in ("pq", "pq_things", "pq_stuff", "sq", "rq") if rows and k in rows[0]]
    head = "| " + " | ".join(names + [s.upper().replace("_", " ") for s in scores]) + " |"
    lines = [head, "|" + "---|" * (len(names) + len(scores))]
    for r in rows:
        cells = [str(r["params"][n]) for n in names] + [f"{100 * r[s]:.2f}" for s in scores]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: Sequence[Mapping[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.json", json.dumps(list(rows), indent=1))
    atomic_write_text(out / "sweep.md", format_table(rows) + "\n")
    atomic_write_text(out / "best.toml", "# best post-processing config of the sweep, by PQ\n" + dump_toml(rows[0]["config"]))


def _gt_images(gt_json: Path, gt_dir: Path) -> tuple[dict[str, Any], dict[Any, dict]]:
    data = load_panoptic_json(gt_json)
    by_id = {}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not {"image_id", "file_name", "segments_info"} <= ann.keys():
            raise ValueError(f"{gt_json}: every annotation needs image_id, file_name and segments_info")
        by_id[ann["image_id"]] = ann
    return data, by_id


def _read_gt(ann: dict, gt_dir: Path) -> GTImage:
    path = gt_dir / str(ann["file_name"])
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth PNG not found: {path}")
    return GTImage(ann["image_id"], str(ann["file_name"]), read_panoptic_png(path), list(ann["segments_info"]))


def _pairs_from_outputs(files: list[Path], anns: dict[Any, dict], gt_dir: Path) -> Iterator[tuple[GTImage, RawOutputs]]:
    by_str = {str(k): v for k, v in anns.items()}  # npz stores ids as numpy scalars or strings
    for f in files:
        raw = load_outputs(f)
        ann = anns.get(raw.image_id, by_str.get(str(raw.image_id)))
        if ann is None:
            raise ValueError(f"{f}: image_id {raw.image_id!r} is not in the GT JSON")
        yield _read_gt(ann, gt_dir), raw


def _pairs_ideal(anns: dict[Any, dict], gt_dir: Path, categories: list[dict], num_harmonics: int) -> Iterator[tuple[GTImage, RawOutputs]]:
    table = contiguous_train_ids(categories)
    cat_to_train = {c.id: c.train_id for c in table}
    things = {c.id for c in table if c.isthing}
    for ann in anns.values():
        gt = _read_gt(ann, gt_dir)
        sem, inst = ideal_outputs(gt.pan_ids, gt.segments, cat_to_train, things, len(table), num_harmonics)
        yield gt, RawOutputs(gt.image_id, sem, inst, None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Grid-search post-processing parameters on saved raw model outputs, scored with PQ.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--outputs", type=Path, help="folder of raw-output .npz files (sem, inst, image_id); not with --sanity")
    p.add_argument("--gt-json", type=Path, required=True, help="COCO panoptic ground-truth JSON")
    p.add_argument("--gt-dir", type=Path, help="ground-truth PNG folder (default: the JSON path without .json)")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2", help="a PostprocessConfig field and its values; repeat for more fields")
    p.add_argument("--config", type=Path, help="TOML base config the grid overrides (default: PostprocessConfig's defaults)")
    p.add_argument("--out", type=Path, required=True, help="folder for sweep.json, sweep.md and best.toml")
    p.add_argument("--sanity", action="store_true", help="score the ideal outputs of the GT itself instead of --outputs (PQ ≈ 1 checks the pipeline)")
    p.add_argument("--num-harmonics", type=int, default=4, help="L of the ideal embeddings in --sanity mode")
    p.add_argument("--limit", type=int, help="use only the first N images (sorted file names / JSON order)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        grid = parse_grid(args.grid)
        base = load_config(PostprocessConfig, args.config) if args.config else PostprocessConfig()
        configs = grid_configs(base, grid)
        gt_dir = args.gt_dir or args.gt_json.with_suffix("")
        if not gt_dir.is_dir():
            raise FileNotFoundError(f"ground-truth PNG folder not found: {gt_dir}")
        data, anns = _gt_images(args.gt_json, gt_dir)
        categories = data["categories"]
        table = contiguous_train_ids(categories)
        things = {c.id for c in table if c.isthing}
        if args.sanity:
            if args.outputs is not None:
                raise ValueError("--sanity scores the GT's ideal outputs; do not give --outputs")
            if args.limit is not None:
                anns = dict(list(anns.items())[: args.limit])
            images, total = _pairs_ideal(anns, gt_dir, categories, args.num_harmonics), len(anns)
        else:
            if args.outputs is None:
                raise ValueError("give --outputs (a folder of .npz raw outputs) or --sanity")
            if not args.outputs.is_dir():
                raise FileNotFoundError(f"raw-output folder not found: {args.outputs}")
            files = sorted(args.outputs.glob("*.npz"))[: args.limit]
            if not files:
                raise ValueError(f"{args.outputs}: no .npz raw outputs")
            images, total = _pairs_from_outputs(files, anns, gt_dir), len(files)
        rows = run_sweep(images, configs, [c.id for c in table], things, PQScorer(categories), total)
        write_results(rows, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"best config → {args.out / 'best.toml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
