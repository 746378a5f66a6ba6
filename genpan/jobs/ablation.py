"""The paper's Table 4 on the embedded data: four instance encodings / weightings, same budget.

    direct RGB centroid regression without EDS   (appendix C; --loss.inst_encoding=rgb, wmin = 1)
    direct RGB centroid regression with EDS      (wmin = 0, D from the config)
    PE (L = 4) without EDS                       (wmin = 1)
    PE (L = 4) with EDS                          (the paper's method)

Each variant trains the same config (every other setting of it, e.g. loss weights and D, is shared) for
the same number of steps on the same shards, predicts the held-out split with the same options and is
scored with eval/pq.py's function; the report holds the PQ table and PQ by object
size (the paper's Figures 4–5), and `docs/results.md` gets the table with this command.

    python jobs/ablation.py --run runs/demo                     # data + shards of the demo run
    python jobs/ablation.py --run runs/demo --steps 300 --variants pe,pe_eds

Re-running skips variants whose checkpoint and predictions exist (a killed run resumes its training).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from genpan.eval.plots import plot_pq_by_size
from genpan.eval.pq import pq_compute

# This job drives the checkout's entry scripts and configs, so it runs from a clone (editable install).
REPO = Path(__file__).resolve().parents[2]
PE4 = ["--loss.num_harmonics=4", "--model.inst_channels=16"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "rgb": ("Direct centroid regression (RGB), no EDS", ["--loss.inst_encoding=\"rgb\"", "--model.inst_channels=3", "--loss.wmin=1.0"]),
    "rgb_eds": ("Direct centroid regression (RGB) + EDS", ["--loss.inst_encoding=\"rgb\"", "--model.inst_channels=3"]),
    "pe": ("PE (L=4), no EDS", [*PE4, "--loss.wmin=1.0"]),
    "pe_eds": ("PE (L=4) + EDS", PE4),
    # not in the paper's table: the demo's own setting (tiny_cpu.toml uses L = 2 at its 64-px output)
    "pe2_eds": ("PE (L=2) + EDS", ["--loss.num_harmonics=2", "--model.inst_channels=8"]),
}
TABLE4 = ["rgb", "rgb_eds", "pe", "pe_eds"]


def run(cmd: list[str]) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[1]} failed with exit code {proc.returncode}")


def run_variant(name: str, args: argparse.Namespace) -> dict:
    title, overrides = VARIANTS[name]
    out = args.out / name
    data = args.run / "data"
    final = out / "train" / "final.pt"
    t0 = time.time()
    if not final.is_file():
        run([sys.executable, "train/main.py", "--config", str(args.config), f"--data.shards={args.run / 'shards'}",
             f"--run.out={out / 'train'}", f"--schedule.max_steps={args.steps}", "--resume", *overrides, *args.train_arg])
    pred_json = out / "predictions" / "panoptic_val.json"
    if not pred_json.is_file():
        run([sys.executable, "eval/predict.py", "--checkpoint", str(final), "--coco-root", str(data), "--split", "val",
             "--out", str(out / "predictions"), "--no-progress", *args.predict_arg])
    result = pq_compute(data / "annotations/panoptic_val.json", data / "annotations/panoptic_val",
                        pred_json, out / "predictions" / "panoptic_val", progress=False)
    summary = result.summary()
    return {"variant": name, "title": title, "overrides": overrides, "summary": summary,
            "by_size": [b.to_dict() for b in result.by_size()], "buckets": result.by_size(), "seconds": time.time() - t0}


def table(rows: list[dict]) -> str:
    lines = ["| method | PQ | PQ things | PQ stuff | SQ | RQ |", "|---|---|---|---|---|---|"]
    for r in rows:
        a, t, s = r["summary"]["All"], r["summary"]["Things"], r["summary"]["Stuff"]
        lines.append(f"| {r['title']} | {100 * a['pq']:.1f} | {100 * t['pq']:.1f} | {100 * s['pq']:.1f} | {100 * a['sq']:.1f} | {100 * a['rq']:.1f} |")
    return "\n".join(lines)


def size_table(rows: list[dict]) -> str:
    names = [b["name"] for b in rows[0]["by_size"]]
    lines = ["| method | " + " | ".join(f"PQ {n}" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['title']} | " + " | ".join(f"{100 * b['pq']:.1f}" for b in r["by_size"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Table 4 of the paper on the embedded synthetic data (same budget per variant).")
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a demo run folder with data/ and shards/ (default runs/demo)")
    parser.add_argument("--out", type=Path, default=None, help="ablation folder (default: RUN/ablation)")
    parser.add_argument("--config", type=Path, default=REPO / "train/configs/tiny_cpu.toml", help="training config shared by all variants")
    parser.add_argument("--steps", type=int, default=0, help="training steps per variant (default: the config's max_steps)")
    parser.add_argument("--variants", default=",".join(TABLE4),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: the paper's four)")
    parser.add_argument("--train-arg", action="append", default=[], help="extra --section.key=value for every training run")
    parser.add_argument("--predict-arg", action="append", default=[], help="extra option for eval/predict.py (e.g. --postprocess-config=...)")
    parser.add_argument("--results-md", default=str(REPO / "docs/results.md"), help="append the table here ('' to skip)")
    args = parser.parse_args(argv)
    args.out = args.out or args.run / "ablation"
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        print(f"error: unknown variant(s) {bad}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    if not (args.run / "shards" / "manifest.parquet").is_file() or not (args.run / "data/annotations/panoptic_val.json").is_file():
        print(f"error: {args.run} has no data/ and shards/ yet: run `python jobs/demo.py --out {args.run}` first", file=sys.stderr)
        return 2
    if args.steps <= 0:
        import tomllib

        args.steps = int(tomllib.loads(args.config.read_text())["schedule"]["max_steps"])
    rows = []
    try:
        for name in names:
            print(f"[{name}] {VARIANTS[name][0]}", flush=True)
            rows.append(run_variant(name, args))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    plot_pq_by_size({r["title"]: r["buckets"] for r in rows}, args.out / "pq_by_size.png")
    command = "python jobs/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = (f"{args.steps} training steps per variant, config `{args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}`, "
            f"held-out synthetic val split.\n\n{table(rows)}\n\nPQ by object size (things; COCO buckets):\n\n{size_table(rows)}\n\n"
            f"![PQ by size](pq_by_size.png)\n\nCommand: `{command}`\n")
    (args.out / "report.md").write_text("# Table 4 on the embedded data\n\n" + body)
    (args.out / "report.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "buckets"} for r in rows], indent=1))
    print(table(rows))
    print(f"report → {args.out / 'report.md'}")
    if args.results_md:
        args.results_md = Path(args.results_md)
        plot = args.results_md.parent / "ablation_pq_by_size.png"
        shutil.copyfile(args.out / "pq_by_size.png", plot)
        with open(args.results_md, "a", encoding="utf-8") as f:
            f.write(f"\n## Table 4 on the embedded data ({time.strftime('%Y-%m-%d')})\n\n" + body.replace("pq_by_size.png", plot.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
