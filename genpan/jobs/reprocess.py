"""Incremental reprocessing for cron: rebuild only the shards whose inputs changed.

    python jobs/reprocess.py --config prep/configs/coco.toml --data.root=/data/coco --out=/data/shards/coco/train
    ray job submit --working-dir . -- python jobs/reprocess.py --config prep/configs/coco.toml   # on a cluster

Compares every sample's source (image, label and depth content hashes, its JSON segments) and the stored
prep parameters and prep version with the manifest; rebuilds the shards whose samples changed, were added
or removed; deletes shards the new assignment no longer has. A run with nothing changed writes nothing and
says so. EDS D and wmin are train-time settings and are not prep parameters, so changing them needs no run
here; a stored parameter (shards.dist_clip, dist_scale, zstd_level, the depth teacher) rebuilds what it affects.

Exit codes: 0 done (or nothing to do), 2 bad config/input, 3 another run holds the output's lock (this
tick is skipped; the next one catches up). See jobs/crontab.example.
"""

from __future__ import annotations

import time

from genpan.prep.build_shards import RunReport, parse_args, run_from_cli


def describe(report: RunReport) -> str:
    c = report.changes
    parts = [f"{c.get('added', 0)} samples added", f"{c.get('removed', 0)} removed", f"{c.get('changed', 0)} changed"]
    if c.get("params_changed"):
        parts.append("stored prep parameters or prep version changed")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv, "Cron job: rebuild only the shards whose sources or stored prep parameters changed.")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    report = run_from_cli(args, overrides, log=lambda msg: print(f"[{stamp}] {msg}"), error_prefix=f"[{stamp}] ")
    if isinstance(report, int):
        return report
    if report.nothing_changed:
        print(f"[{stamp}] {report.summary()}")
        return 0
    print(f"[{stamp}] changes since the manifest: {describe(report)}")
    if args.dry_run:
        print(f"[{stamp}] dry run: would rebuild {len(report.built_names)} of {report.shards_total} shards: "
              + ", ".join(report.built_names))
    else:
        print(f"[{stamp}] {report.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
