"""Kill-and-rerun series for the prep jobs, and the comparison with an uninterrupted run.

    python tests/faults/prep_harness.py --kills 20                  # build_shards and reprocess, 20 kills each
    python tests/faults/prep_harness.py --kills 20 --mode build --seed 3 --workdir /tmp/faults

A series runs the job through `tests/faults/run_prep.py` with a kill point armed, again and again on the
same output folder: each run is SIGKILLed at a random event of a random kind among those the remaining
work still holds (cache write, tar member, shard rename, manifest write). When a run completes, its output
is compared byte for byte with the uninterrupted reference (shards, cache files, manifest content, no
stray files); then part of the output is deleted (build) or the pre-run state restored (reprocess) so the
next runs have work to be killed in. The last run is always followed by a clean completing re-run and a
final comparison. Figures go to docs/reliability.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root and tests/ importable
    sys.path[0:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUN_PREP = Path(__file__).resolve().parent / "run_prep.py"
CONFIG = REPO / "prep" / "configs" / "synthetic.toml"
CACHE_DIR = "depth_cache.zarr"
KNOWN_FILES = {"manifest.parquet", "prep_config.resolved.toml", ".file_hashes.json", ".prep.lock"}
FIELDS_PER_SAMPLE = 7  # jpg, sem, ins, dist, depth, disp, json
CACHE_WRITES_PER_ENTRY = 5  # zarr rewrites the root and group metadata, then array metadata, chunk, attributes
N_IMAGES = 24
SAMPLES_PER_SHARD = 2


# -- fixtures ------------------------------------------------------------------------------------------
def make_dataset(root: Path, n: int = N_IMAGES, seed: int = 11) -> Path:
    from genpan.prep.synthetic import SceneConfig, generate_split

    generate_split(root, "train", n, seed=seed, cfg=SceneConfig(min_size=40, max_size=64), progress=False)
    return root


def make_teacher_checkpoint(folder: Path) -> Path:
    """A directory that hashes like a transformers checkpoint; run_prep.py's stand-in teacher uses its identity."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "depth_anything"}')
    (folder / "model.safetensors").write_bytes(b"fake weights for the fault tests")
    return folder


def job_args(data: Path, out: Path, checkpoint: Path) -> list[str]:
    return ["--config", str(CONFIG), f"--data.root={data}", f"--out={out}", "--synthetic.generate=false",
            f"--shards.samples_per_shard={SAMPLES_PER_SHARD}", "--shards.prefix=syn", "--teacher.kind=depth_anything_v2",
            f"--teacher.checkpoint={checkpoint}", "--teacher.input_size=28", "--teacher.batch_size=4",
            "--run.progress=false", "--run.manifest_every_s=0.0"]


def run_job(entry: str, args: list[str], fault: str | None = None, pause: str | None = None,
            signal_dir: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(RUN_PREP), f"--entry={entry}"]
    if fault:
        cmd.append(f"--fault={fault}")
    if pause:
        cmd += [f"--pause={pause}", f"--signal-dir={signal_dir}"]
    return subprocess.run(cmd + ["--", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start_job(entry: str, args: list[str], pause: str, signal_dir: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(RUN_PREP), f"--entry={entry}", f"--pause={pause}", f"--signal-dir={signal_dir}", "--", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- comparing outputs ---------------------------------------------------------------------------------
def cache_files(out: Path) -> dict[str, bytes]:
    root = out / CACHE_DIR
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def zarr_temp_files(out: Path) -> list[str]:
    """zarr's own `*.partial` temp files left in the cache by a killed write (a re-run removes them)."""
    return sorted(p.relative_to(out).as_posix() for p in (out / CACHE_DIR).rglob("*.partial"))


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def manifest_content(out: Path) -> dict[str, object] | None:
    from genpan.prep.manifest import MANIFEST_NAME, read_manifest

    manifest = read_manifest(out / MANIFEST_NAME)
    if manifest is None:
        return None
    return {"meta": manifest.meta, "shards": sorted((asdict(s) for s in manifest.shards), key=lambda r: r["shard"]),
            "samples": sorted((asdict(s) for s in manifest.samples), key=lambda r: r["key"])}


def differences(reference: Path, out: Path) -> list[str]:
    """Everything in `out` that differs from `reference`: missing, extra or changed files, manifest rows, strays.

    zarr `*.partial` temp files count too: a completed re-run must have removed them.
    """
    problems = []
    for what, ref, got in (("shard", shard_files(reference), shard_files(out)), ("cache file", cache_files(reference), cache_files(out))):
        problems += [f"{what} missing: {n}" for n in sorted(ref.keys() - got.keys())]
        problems += [f"{what} extra: {n}" for n in sorted(got.keys() - ref.keys())]
        problems += [f"{what} differs: {n}" for n in sorted(ref.keys() & got.keys()) if ref[n] != got[n]]
    if manifest_content(reference) != manifest_content(out):
        problems.append("manifest content differs")
    strays = [p.name for p in out.iterdir() if p.is_file() and p.suffix != ".tar" and p.name not in KNOWN_FILES]
    problems += [f"stray file: {n}" for n in sorted(strays)]
    problems += duplicated_or_lost_samples(out)
    return problems


def duplicated_or_lost_samples(out: Path) -> list[str]:
    """Every ok sample of the manifest is in exactly one shard, with every member once."""
    content = manifest_content(out)
    if content is None:
        return ["no manifest"]
    ok = sorted(r["key"] for r in content["samples"] if r["status"] == "ok")  # type: ignore[index]
    members: Counter[str] = Counter()
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members.update(tar.getnames())
    problems = [f"duplicated tar member: {n}" for n, c in sorted(members.items()) if c > 1]
    keys = sorted({n.split(".", 1)[0] for n in members})
    if keys != ok:
        problems.append(f"shards hold {len(keys)} sample keys, the manifest lists {len(ok)} ok samples")
    return problems


# -- what is left to do (so that a kill point is chosen that the next run will reach) --------------------
def remaining_work(reference: Path, out: Path) -> dict[str, int]:
    ref_cache, got_cache = cache_files(reference), cache_files(out)
    ref_entries = {n.rsplit("/", 1)[0] for n in ref_cache if n.endswith("/zarr.json") and n.count("/") == 2}
    missing_entries = sum(
        any(got_cache.get(n) != data for n, data in ref_cache.items() if n.startswith(entry + "/")) for entry in ref_entries
    )
    ref_content, got_content = manifest_content(reference), manifest_content(out)
    ref_rows = {r["shard"]: r for r in ref_content["shards"]}  # type: ignore[index]
    got_rows = {r["shard"]: r for r in got_content["shards"]} if got_content else {}  # type: ignore[index]
    got_shards = shard_files(out)
    ref_shards = shard_files(reference)
    stale = [n for n in ref_rows if got_rows.get(n) != ref_rows[n] or got_shards.get(n) != ref_shards[n]]
    samples_in_stale = sum(ref_rows[n]["count"] for n in stale)
    return {"cache_write": CACHE_WRITES_PER_ENTRY * missing_entries, "tar_member": FIELDS_PER_SAMPLE * samples_in_stale,
            "shard_done": len(stale), "manifest_write": len(stale)}


# -- the series --------------------------------------------------------------------------------------------
@dataclass
class SeriesReport:
    entry: str
    kills: list[str] = field(default_factory=list)  # "point:N" of every run that died by SIGKILL
    runs: int = 0
    completions: int = 0  # runs that finished (each followed by a byte comparison)
    comparisons_equal: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    zarr_temp_files: set[str] = field(default_factory=set)  # left over after completed runs (must stay empty)

    def by_point(self) -> dict[str, int]:
        return dict(sorted(Counter(k.split(":")[0] for k in self.kills).items()))


def kill_series(entry: str, args: list[str], reference: Path, out: Path, kills: int, rng: random.Random,
                reset: callable, log=lambda msg: None, kills_per_round: int = 4) -> SeriesReport:  # type: ignore[valid-type]
    """Kill the job `kills` times, re-running on the same output, in rounds of `kills_per_round` kills.

    Each round ends with a run that completes and a comparison with the reference; then `reset` gives the
    next round work again (lost files, or the state before the data changed).
    """
    report = SeriesReport(entry)
    t0 = time.perf_counter()
    in_round = 0
    while len(report.kills) < kills:
        work = remaining_work(reference, out)
        possible = [p for p in ("cache_write", "tar_member", "shard_done", "manifest_write") if work[p] > 0]
        if not possible or in_round == kills_per_round:
            if not _complete(report, entry, args, reference, out, f"round ending after kill {len(report.kills)}"):
                break
            reset(out, rng)
            in_round = 0
            continue
        # The cache stage runs first and one run finishes it: favour its kill point while it has work.
        point = "cache_write" if "cache_write" in possible and rng.random() < 0.5 else rng.choice(possible)
        fault = f"{point}:{rng.randint(1, work[point])}"
        result = run_job(entry, args, fault=fault)
        report.runs += 1
        log(f"run {report.runs}: {fault} -> rc {result.returncode}")
        if result.returncode == -signal.SIGKILL:
            report.kills.append(fault)
            in_round += 1
        elif result.returncode == 0:  # the chosen event was never reached: a completed run, compare it
            report.completions += 1
            _check(report, reference, out, f"run {report.runs} ({fault} not reached)")
        else:
            report.problems.append(f"run {report.runs} ({fault}) failed with exit {result.returncode}: {result.stderr.strip()[-500:]}")
            break
    _complete(report, entry, args, reference, out, "final re-run")
    report.seconds = time.perf_counter() - t0
    return report


def _complete(report: SeriesReport, entry: str, args: list[str], reference: Path, out: Path, when: str) -> bool:
    result = run_job(entry, args)
    report.runs += 1
    if result.returncode != 0:
        report.problems.append(f"{when}: exit {result.returncode}: {result.stderr.strip()[-500:]}")
        return False
    report.completions += 1
    _check(report, reference, out, when)
    return True


def _check(report: SeriesReport, reference: Path, out: Path, when: str) -> None:
    diff = differences(reference, out)
    report.zarr_temp_files.update(zarr_temp_files(out))
    if diff:
        report.problems.append(f"{when}: " + "; ".join(diff[:10]))
    else:
        report.comparisons_equal += 1


def delete_some_shards(reference: Path) -> callable:  # type: ignore[valid-type]
    """Build series reset: delete half the shards and the cache entries of their samples (lost files)."""
    content = manifest_content(reference)
    assert content is not None
    keys_of: dict[str, list[str]] = {}
    for row in content["samples"]:  # type: ignore[union-attr]
        keys_of.setdefault(row["shard"], []).append(row["key"])

    def reset(out: Path, rng: random.Random) -> None:
        shards = sorted(keys_of)
        for name in rng.sample(shards, max(1, len(shards) // 2)):
            (out / name).unlink(missing_ok=True)
            for key in keys_of[name]:
                for entry in (out / CACHE_DIR).glob(f"*/{key}"):
                    shutil.rmtree(entry)

    return reset


def restore(state: Path) -> callable:  # type: ignore[valid-type]
    """Reprocess series reset: the output as it was before the data changed."""

    def reset(out: Path, rng: random.Random) -> None:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(state, out)

    return reset


def edit_dataset(data: Path, n_before: int = N_IMAGES, added: int = 4, seed: int = 11) -> dict[str, int]:
    """Add images, change one label (a boundary pixel), remove one image: what a cron run then sees."""
    from genpan.coco_panoptic import encode_panoptic_png, read_panoptic_png

    make_dataset(data, n_before + added, seed)
    label = data / "annotations" / "panoptic_train" / "train_000005.png"
    ids = read_panoptic_png(label)
    ys, xs = np.nonzero(ids[:, 1:] != ids[:, :-1])
    ids[ys[0], xs[0]] = ids[ys[0], xs[0] + 1]
    label.write_bytes(encode_panoptic_png(ids))
    json_path = data / "annotations" / "panoptic_train.json"
    doc = json.loads(json_path.read_text())
    gone = doc["images"].pop(9)
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != gone["id"]]
    json_path.write_text(json.dumps(doc))
    return {"added": added, "changed": 1, "removed": 1}


# -- whole scenarios ---------------------------------------------------------------------------------------
def build_scenario(work: Path, kills: int, seed: int, log=lambda msg: None) -> SeriesReport:
    data, ckpt = make_dataset(work / "data"), make_teacher_checkpoint(work / "teacher")
    reference = work / "reference"
    first = run_job("build", job_args(data, reference, ckpt))
    if first.returncode != 0:
        raise RuntimeError(f"uninterrupted reference run failed: {first.stderr}")
    assert not duplicated_or_lost_samples(reference)
    out = work / "killed"
    return kill_series("build", job_args(data, out, ckpt), reference, out, kills, random.Random(seed),
                       delete_some_shards(reference), log)


def _must_complete(entry: str, args: list[str], what: str) -> None:
    result = run_job(entry, args)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed with exit {result.returncode}: {result.stderr.strip()[-1500:]}")


def reprocess_scenario(work: Path, kills: int, seed: int, log=lambda msg: None) -> SeriesReport:
    """Reference = an uninterrupted reprocess.py from the pre-change output; its shards and manifest must also
    equal a build from scratch (its cache may hold more: entries of removed images stay)."""
    data, ckpt = make_dataset(work / "data"), make_teacher_checkpoint(work / "teacher")
    before = work / "before"
    _must_complete("build", job_args(data, before, ckpt), "initial build")
    edit_dataset(data)
    reference, scratch = work / "reference", work / "scratch"
    restore(before)(reference, random.Random(0))
    _must_complete("reprocess", job_args(data, reference, ckpt), "uninterrupted reprocess")
    _must_complete("build", job_args(data, scratch, ckpt), "build from scratch")
    out = work / "killed"
    reset = restore(before)
    reset(out, random.Random(0))
    report = kill_series("reprocess", job_args(data, out, ckpt), reference, out, kills, random.Random(seed), reset, log)
    if shard_files(reference) != shard_files(scratch) or manifest_content(reference) != manifest_content(scratch):
        report.problems.append("reprocess output differs from a build from scratch")
    return report


@dataclass
class OverlapReport:
    second_rc: int
    second_message: str
    cron_rc: int
    first_rc: int
    problems: list[str]


def overlap_scenario(work: Path) -> OverlapReport:
    """Run A pauses inside its first shard write; build_shards.py and reprocess.py on the same output meanwhile."""
    data, ckpt = make_dataset(work / "data"), make_teacher_checkpoint(work / "teacher")
    reference = work / "reference"
    _must_complete("build", job_args(data, reference, ckpt), "uninterrupted reference run")
    out, signals = work / "overlap", work / "signals"
    signals.mkdir()
    first = start_job("build", job_args(data, out, ckpt), "tar_member:1", signals)
    try:
        deadline = time.monotonic() + 120
        while not (signals / "paused").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not (signals / "paused").exists():
            raise RuntimeError(f"run A never reached its pause point: {first.communicate()[1]}")
        args = job_args(data, out, ckpt)
        second = subprocess.run([sys.executable, "prep/build_shards.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        cron = subprocess.run([sys.executable, "jobs/reprocess.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        (signals / "release").touch()
        first.communicate(timeout=120)
    return OverlapReport(second.returncode, second.stderr.strip(), cron.returncode, first.returncode, differences(reference, out))


def format_report(report: SeriesReport) -> str:
    points = ", ".join(f"{p} {n}" for p, n in report.by_point().items())
    return (f"{report.entry}: {len(report.kills)} kills ({points}) in {report.runs} runs, {report.completions} completed runs, "
            f"{report.comparisons_equal} byte comparisons equal, {len(report.problems)} problems, "
            f"{len(report.zarr_temp_files)} zarr temp files left behind, {report.seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Kill prep jobs repeatedly and compare with an uninterrupted run.")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per series (default 20)")
    parser.add_argument("--mode", choices=("build", "reprocess", "overlap", "all"), default="all", help="which scenario(s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill point choice")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary folder, removed after)")
    parser.add_argument("--verbose", action="store_true", help="print every run's kill point and exit status")
    args = parser.parse_args(argv)
    import tempfile

    work = args.workdir or Path(tempfile.mkdtemp(prefix="genpan-faults-"))
    log = print if args.verbose else (lambda msg: None)
    failed = False
    try:
        for mode in ("build", "reprocess") if args.mode == "all" else (args.mode,) if args.mode != "overlap" else ():
            scenario = build_scenario if mode == "build" else reprocess_scenario
            report = scenario(work / mode, args.kills, args.seed, log)
            print(format_report(report))
            for problem in report.problems:
                print(f"  problem: {problem}")
            failed |= bool(report.problems)
        if args.mode in ("overlap", "all"):
            overlap = overlap_scenario(work / "overlap")
            print(f"overlap: second build_shards exit {overlap.second_rc} ({overlap.second_message}); reprocess exit "
                  f"{overlap.cron_rc}; first run exit {overlap.first_rc}; differences from reference: {overlap.problems or 'none'}")
            failed |= bool(overlap.problems) or overlap.first_rc != 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
