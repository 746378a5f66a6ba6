"""The main job end to end on the embedded default: synthetic COCO-panoptic data → shards → train →
predict → PQ report. Each stage prints where its output went; a re-run skips finished stages.

    bash jobs/demo.sh                 # what the README's first command runs
    python jobs/demo.py --out runs/demo --force shards

Stages that the project does not have yet are reported as missing, never faked: the job runs as far
as the project goes and exits 0 only when every stage it ran succeeded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# This job drives the checkout's entry scripts and configs, so it runs from a clone (editable install).
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stage:
    name: str
    script: str  # entry point, relative to the repo root
    done_marker: str  # relative to the run folder: present = finished
    args: list[str]
    issue: int  # the issue that builds it, for the "not there yet" message


def stages(out: Path, train_images: int, val_images: int, train_args: list[str], predict_args: list[str]) -> list[Stage]:
    data = out / "data"
    return [
        Stage("data", "prep/synthetic.py", "data/annotations/panoptic_val.json",
              ["--out", str(data), "--train", str(train_images), "--val", str(val_images)], 3),
        Stage("shards", "prep/build_shards.py", "shards/manifest.parquet",
              ["--config", "prep/configs/synthetic.toml", f"--data.root={data}", f"--out={out / 'shards'}",
               f"--synthetic.num_images={train_images}"], 4),
        Stage("train", "train/main.py", "train/final.pt",
              ["--config", "train/configs/tiny_cpu.toml", f"--data.shards={out / 'shards'}", f"--run.out={out / 'train'}", "--resume",
               *train_args], 5),
        Stage("predict", "eval/predict.py", "predictions/panoptic_val.json",
              ["--checkpoint", str(out / "train/final.pt"), "--coco-root", str(data), "--split", "val",
               "--out", str(out / "predictions"),
               # 112-px windows at native size (the training scale) beat resizing the whole image (+2.6 PQ)
               "--mode", "slide", "--overlap", "0.5",
               "--postprocess-config", str(REPO / "eval/configs/tiny_cpu_postprocess.toml"), *predict_args], 7),
        # PQ through eval/pq.py's own function, plus depth, loss curves, overlays and the run's identity
        Stage("report", "jobs/report.py", "report/report.json", ["--run", str(out), "--disparity", "10"], 8),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole pipeline on the embedded synthetic dataset.")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="run folder (default: runs/demo)")
    parser.add_argument("--train-images", type=int, default=300, help="synthetic training images (default: 300)")
    parser.add_argument("--val-images", type=int, default=60, help="held-out synthetic images (default: 60)")
    parser.add_argument("--force", nargs="*", default=[], metavar="STAGE", help="re-run these stages even if finished ('all' for every stage)")
    parser.add_argument("--train-arg", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                        help="extra option for train/main.py, repeatable (e.g. --train-arg=--schedule.max_steps=100)")
    parser.add_argument("--predict-arg", action="append", default=[], metavar="OPTION",
                        help="extra option for eval/predict.py, repeatable (e.g. --predict-arg=--batch-size=8)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    plan = stages(out, args.train_images, args.val_images, args.train_arg, args.predict_arg)
    known = {s.name for s in plan}
    bad = set(args.force) - known - {"all"}
    if bad:
        print(f"error: unknown stage(s) {sorted(bad)}; stages are {[s.name for s in plan]}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    missing: list[Stage] = []
    t_start = time.time()
    for stage in plan:
        if missing or not (REPO / stage.script).is_file():
            missing.append(stage)
            continue
        marker = out / stage.done_marker
        if marker.exists() and stage.name not in args.force and "all" not in args.force:
            print(f"[{stage.name}] already done → {marker.parent} (use --force {stage.name} to redo)")
            continue
        print(f"[{stage.name}] python {stage.script} {' '.join(stage.args)}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(REPO / stage.script), *stage.args], cwd=REPO)
        if proc.returncode != 0:
            print(f"[{stage.name}] failed with exit code {proc.returncode}; stopping", file=sys.stderr)
            return proc.returncode
        print(f"[{stage.name}] done in {time.time() - t0:.0f}s → {marker.parent}")
    print(f"pipeline ran {len(plan) - len(missing)} of {len(plan)} stages in {time.time() - t_start:.0f}s; outputs in {out}")
    if missing:
        print("not run — these stages are not in the project yet:")
        for stage in missing:
            reason = "missing" if not (REPO / stage.script).is_file() else "needs an earlier stage that is missing"
            print(f"  - {stage.name}: {stage.script} ({reason}; issue {stage.issue})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
