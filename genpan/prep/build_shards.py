"""Build WebDataset shards + manifest for one dataset split with Ray (the prep stage's entry point).

    python prep/build_shards.py --config prep/configs/synthetic.toml             # local Ray for this run
    python prep/build_shards.py --config prep/configs/coco.toml --data.root=/data/coco --out=/data/shards/coco
    ray job submit --working-dir . -- python prep/build_shards.py --config prep/configs/coco.toml

Every run plans the whole split (stable assignment of samples to shards, a digest of each shard's
inputs), skips the shards whose manifest row has the same digest and whose file still has the recorded
size and checksum, and rebuilds the rest as shard-sized Ray tasks. Bad samples are quarantined in the
manifest with their reason; the others land. A run with nothing to do writes nothing. The manifest is
rewritten (atomically) as shards complete, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genpan.atomic import atomic_write_text
from genpan.config import ConfigError, dump_toml, load_config, parse_args_with_overrides, to_dict
from genpan.prep.manifest import (
    HASH_CACHE_NAME,
    MANIFEST_NAME,
    OK,
    QUARANTINED,
    FileHashCache,
    Manifest,
    SampleRow,
    ShardRow,
    read_manifest,
    ref_fingerprint,
    shard_inputs_digest,
    write_manifest,
)
from genpan.prep.readers.base import Category, Reader, SampleError, SampleRef
from genpan.prep.shards import (
    PREP_VERSION,
    TMP_MARK,
    ShardParams,
    assign_shards,
    check_name_part,
    encode_sample,
    file_sha256,
    inside,
    params_digest,
    write_tar,
)

# The folder that holds the genpan package (a checkout, or site-packages): local Ray workers import from it.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
LOCK_NAME = ".prep.lock"
RESOLVED_CONFIG_NAME = "prep_config.resolved.toml"


# -- configuration (dataclasses = schema and defaults; TOML = values; --a.b=v = overrides) -------------
@dataclass
class DataConfig:
    kind: str = "synthetic"  # reader kind: coco, synthetic, cityscapes, nyu_bts, nyu_mat, folder
    root: Path = Path("data/synthetic")  # dataset root; shard json stores source paths relative to it
    split: str = "train"
    options: dict[str, Any] = field(default_factory=dict)  # further keyword arguments of the reader


@dataclass
class SyntheticConfig:
    generate: bool = True  # kind = "synthetic": write the split first when its JSON is missing
    num_images: int = 300
    seed: int = 0
    min_size: int = 128
    max_size: int = 256


@dataclass
class ShardConfig:
    samples_per_shard: int = 64  # mean shard size (content-defined chunking; shards hold 1/4x..3x of it)
    prefix: str = "shard"  # shard files are {prefix}-{first key}.tar
    dist_clip: float = 127.5  # px, stored: a change rebuilds every shard (EDS D and wmin are train-time)
    dist_scale: int = 2  # dist.zst = round(min(d, dist_clip)·dist_scale): 1/2 px in uint8 (1, 2, 4, ..., 64)
    zstd_level: int = 3  # zstd level of the sem/ins/dist/depth/disp planes (1..22, stored)
    write_depth: bool = True  # depth.zst (mm) when the reader gives metric depth


@dataclass
class TeacherConfig:
    kind: str = "none"  # none | ground_truth | depth_anything_v2 (disp.zst)
    checkpoint: str = ""  # depth_anything_v2: local transformers checkpoint directory
    input_size: int = 518  # shorter side of the network input (multiple of 14 after rounding)
    batch_size: int = 8
    concurrency: int = 1  # actors in the pool (one per GPU on a GPU cluster)
    num_gpus: float = -1.0  # per actor; -1 = 1 when the cluster has GPUs, else 0
    cache: str = ""  # zarr pseudo-label cache; "" = {out}/depth_cache.zarr


@dataclass
class RayConfig:
    address: str = ""  # "" = the job's cluster under `ray job submit`, else a local Ray for this run
    num_cpus: int = 0  # local Ray only: cores to use (0 = all)


@dataclass
class RunConfig:
    verify_checksums: bool = True  # re-hash finished shards before skipping them (else size only)
    manifest_every_s: float = 2.0  # rewrite the manifest at most this often while shards complete
    progress: bool = True
    debug_task_delay_s: float = 0.0  # test hook: each shard task sleeps first, so a test can kill a run mid-way


@dataclass
class PrepConfig:
    out: Path = Path("data/shards/synthetic")
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    run: RunConfig = field(default_factory=RunConfig)


def shard_params(cfg: PrepConfig, teacher_identity: str) -> ShardParams:
    return ShardParams(cfg.shards.dist_clip, cfg.shards.zstd_level, cfg.shards.write_depth, teacher_identity,
                       cfg.shards.dist_scale)


# -- readers ----------------------------------------------------------------------------------------------
def make_reader_from_config(data: DataConfig) -> Reader:
    """`genpan.prep.readers.make_reader(kind, root=, split=, **options)`; COCO layouts also without the registry."""
    try:
        from genpan.prep.readers import make_reader  # type: ignore[attr-defined]
    except ImportError:
        make_reader = None
    if make_reader is not None:
        return make_reader(data.kind, **{"root": str(data.root), "split": data.split, **data.options})
    if data.kind in ("coco", "synthetic"):
        from genpan.prep.readers.coco import coco_layout

        with_depth = bool(data.options.get("with_depth", data.kind == "synthetic"))
        return coco_layout(data.root, data.split, with_depth=with_depth, dataset=data.kind)
    raise ValueError(f"data.kind {data.kind!r} needs the reader registry prep.readers.make_reader")


def ensure_synthetic(cfg: PrepConfig, log: Callable[[str], None]) -> None:
    if cfg.data.kind != "synthetic" or not cfg.synthetic.generate:
        return
    if (cfg.data.root / "annotations" / f"panoptic_{cfg.data.split}.json").exists():
        return
    from genpan.prep.synthetic import SceneConfig, generate_split

    syn = cfg.synthetic
    log(f"generating {syn.num_images} synthetic {cfg.data.split} images under {cfg.data.root}")
    generate_split(cfg.data.root, cfg.data.split, syn.num_images, syn.seed, SceneConfig(min_size=syn.min_size, max_size=syn.max_size),
                   progress=cfg.run.progress)


# -- the work of one shard (runs in a Ray worker; plain function so tests and benches call it directly) ----
@dataclass
class ShardResult:
    shard: ShardRow
    samples: list[SampleRow]


_READER_CACHE: dict[str, Any] = {}


def _resolve_reader(reader_box: list[Any]) -> Reader:
    """The reader travels once through the object store; each worker deserialises it once."""
    obj = reader_box[0]
    try:
        import ray
    except ImportError:
        return obj
    if not isinstance(obj, ray.ObjectRef):
        return obj
    key = obj.hex()
    if key not in _READER_CACHE:
        _READER_CACHE.clear()
        _READER_CACHE[key] = ray.get(obj)
    return _READER_CACHE[key]


def build_shard(
    out_dir: str,
    name: str,
    refs: Sequence[SampleRef],
    fingerprints: dict[str, str],
    inputs_digest: str,
    reader_box: list[Any],
    categories: Sequence[Category],
    params: ShardParams,
    data_root: str,
    cache_path: str = "",
    delay_s: float = 0.0,
) -> ShardResult:
    """Load, encode and write one shard; bad samples are quarantined with their reason."""
    import cv2

    from genpan.prep.teachers import GroundTruthDepthTeacher, disparity_from_depth

    cv2.setNumThreads(1)  # one task per core: OpenCV's own threads would only compete
    if delay_s:
        time.sleep(delay_s)
    reader = _resolve_reader(reader_box)
    cache = None
    if params.teacher and params.teacher != GroundTruthDepthTeacher.identity:
        from genpan.prep.depth_cache import DepthCache

        cache = DepthCache(cache_path)
    rows: list[SampleRow] = []

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for ref in sorted(refs, key=lambda r: r.key):
            row = SampleRow(key=ref.key, shard=name, status=QUARANTINED, source_path=ref.image_path, fingerprint=fingerprints[ref.key])
            rows.append(row)
            loaded = reader.load(ref)
            if isinstance(loaded, SampleError):
                row.error, row.source_path = loaded.reason, loaded.source_path
                continue
            row.source_path, row.source_hash = loaded.source_path, loaded.source_hash
            row.image_hash, row.label_hash, row.depth_hash = loaded.image_hash, loaded.label_hash, loaded.depth_hash
            try:
                disparity = None
                if cache is not None:
                    disparity = cache.get(ref.key, params.teacher, loaded.image_hash)
                    if disparity is None:
                        raise ValueError(f"no cached disparity from teacher {params.teacher} (the teacher skipped this image)")
                elif params.teacher:
                    if loaded.depth_m is None:
                        raise ValueError("the ground-truth depth teacher needs metric depth; the reader gave none")
                    disparity = disparity_from_depth(loaded.depth_m)
                fields = encode_sample(loaded, categories, params, disparity, data_root)
            except Exception as exc:  # one bad sample must not stop the shard: quarantine it with the reason
                row.error = f"{type(exc).__name__}: {exc}"
                continue
            row.status = OK
            yield ref.key, fields

    size, sha = write_tar(Path(out_dir) / name, samples())
    ok = sum(r.status == OK for r in rows)
    shard = ShardRow(shard=name, count=ok, quarantined=len(rows) - ok, bytes=size, sha256=sha, prep_version=PREP_VERSION,
                     inputs_digest=inputs_digest)
    return ShardResult(shard, rows)


# -- Ray ------------------------------------------------------------------------------------------------
def connect_ray(address: str = "", num_cpus: int = 0) -> bool:
    """Connect to the given/job cluster, or start a local Ray for this run; True when started here."""
    import ray

    if ray.is_initialized():
        return False
    if not address and os.environ.get("RAY_ADDRESS"):  # under `ray job submit`: the job's runtime_env applies
        ray.init()
        return False
    pythonpath = os.pathsep.join(p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}  # workers import genpan.prep.* from this checkout
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return False
    ray.init(address="local", num_cpus=num_cpus or None, include_dashboard=False, runtime_env=runtime_env,
             log_to_driver=True)
    return True


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """One writer per output directory: a second concurrent run is refused, never interleaved."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(f"{out} is being written by another prep run (lock {out / LOCK_NAME} is held); "
                               "refusing to run concurrently, try again when it has finished") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


class OutputLocked(RuntimeError):
    pass


# -- planning ---------------------------------------------------------------------------------------------
@dataclass
class PlannedShard:
    name: str
    refs: list[SampleRef]
    inputs_digest: str
    reason: str = ""  # why it is rebuilt ("" = current)


@dataclass
class Plan:
    shards: list[PlannedShard]
    obsolete: list[str]  # shard files of the old manifest that the new plan no longer has
    fingerprints: dict[str, str]
    params_digest: str
    old: Manifest | None

    def changes(self) -> dict[str, int]:
        """What differs from the manifest: samples added, removed, changed; 1 when the stored parameters changed."""
        old = self.old.samples_by_key() if self.old else {}
        new = self.fingerprints
        return {
            "added": sum(k not in old for k in new),
            "removed": sum(k not in new for k in old),
            "changed": sum(k in old and old[k].fingerprint != fp for k, fp in new.items()),
            "params_changed": int(bool(self.old) and self.old.meta.get("params_digest") != self.params_digest),
        }

    @property
    def stale(self) -> list[PlannedShard]:
        return [s for s in self.shards if s.reason]

    @property
    def nothing_to_do(self) -> bool:
        return not self.stale and not self.obsolete


def make_plan(out: Path, refs: Sequence[SampleRef], categories: Sequence[Category], params: ShardParams, cfg: PrepConfig,
              hash_cache: FileHashCache) -> Plan:
    keys = [r.key for r in refs]
    if len(set(keys)) != len(keys):
        raise ValueError("the reader returned duplicate sample keys")
    hashes = hash_cache.hash_files([p for r in refs for p in (r.image_path, r.label_path, r.depth_path) if p])
    fingerprints = {r.key: ref_fingerprint(r, hashes, cfg.data.root) for r in refs}
    pdigest = params_digest(params, categories)
    old = read_manifest(out / MANIFEST_NAME)
    old_shards = old.shard_by_name() if old else {}
    by_key = {r.key: r for r in refs}
    planned = []
    for name, shard_keys in assign_shards(keys, cfg.shards.samples_per_shard, cfg.shards.prefix).items():
        digest = shard_inputs_digest(pdigest, [(k, fingerprints[k]) for k in shard_keys])
        shard = PlannedShard(name, [by_key[k] for k in shard_keys], digest)
        shard.reason = _stale_reason(out, old_shards.get(name), digest, cfg.run.verify_checksums)
        planned.append(shard)
    names = {s.name for s in planned}
    obsolete = sorted(n for n in old_shards if n not in names)
    for name in obsolete:
        inside(out, name)  # refuse a manifest that points outside the output directory
    return Plan(planned, obsolete, fingerprints, pdigest, old)


def _stale_reason(out: Path, row: ShardRow | None, digest: str, verify: bool) -> str:
    if row is None:
        return "new"
    if row.inputs_digest != digest:
        return "inputs changed"
    path = inside(out, row.shard)
    if not path.is_file():
        return "file missing"
    if path.stat().st_size != row.bytes:
        return "size differs from manifest"
    if verify and file_sha256(path) != row.sha256:
        return "checksum differs from manifest"
    return ""


# -- the run ----------------------------------------------------------------------------------------------
@dataclass
class RunReport:
    out: Path
    shards_total: int = 0
    shards_built: int = 0
    shards_removed: int = 0
    samples_ok: int = 0
    quarantined: int = 0
    nothing_changed: bool = False
    seconds: float = 0.0
    built_names: list[str] = field(default_factory=list)
    samples_built: int = 0
    changes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        if self.nothing_changed:
            return f"nothing changed: {self.shards_total} shards in {self.out} are current; wrote nothing"
        rate = self.samples_built / self.seconds if self.seconds > 0 else 0.0
        return (f"wrote {self.shards_built} of {self.shards_total} shards ({self.shards_removed} removed) to {self.out} "
                f"in {self.seconds:.1f} s ({rate:.1f} samples/s); {self.samples_ok} samples ok, {self.quarantined} quarantined; "
                f"manifest {self.out / MANIFEST_NAME}")


def run(cfg: PrepConfig, log: Callable[[str], None] = print, dry_run: bool = False) -> RunReport:
    """Plan, build the stale shards with Ray, and write the manifest; see the module docstring."""
    import ray

    # Workers may run in another directory: hand them absolute paths only.
    cfg = dataclasses.replace(cfg, out=Path(cfg.out).resolve(), data=dataclasses.replace(cfg.data, root=Path(cfg.data.root).resolve()))
    if cfg.teacher.cache:
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=str(Path(cfg.teacher.cache).resolve())))
    out = cfg.out
    check_name_part(cfg.shards.prefix, "shards.prefix")
    ensure_synthetic(cfg, log)
    if not cfg.data.root.exists():
        raise FileNotFoundError(f"data.root {cfg.data.root} does not exist")
    with output_lock(out):
        _remove_temporaries(out)
        reader = make_reader_from_config(cfg.data)
        refs = reader.refs()
        if not refs:
            raise ValueError(f"the {cfg.data.kind} reader found no samples under {cfg.data.root} (split {cfg.data.split})")
        from genpan.prep.teachers import teacher_identity

        identity = teacher_identity(cfg.teacher.kind, cfg.teacher.checkpoint, cfg.teacher.input_size)
        params = shard_params(cfg, identity)
        hash_cache = FileHashCache(out / HASH_CACHE_NAME)
        plan = make_plan(out, refs, reader.categories, params, cfg, hash_cache)
        report = RunReport(out=out, shards_total=len(plan.shards), changes=plan.changes())
        if plan.nothing_to_do:
            hash_cache.save()  # a cache of file hashes only; unchanged files leave it unchanged
            report.nothing_changed = True
            _count(report, plan.old)
            return report
        reasons: dict[str, int] = {}
        for s in plan.stale:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
        log(f"{len(plan.stale)} of {len(plan.shards)} shards to build ({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))})"
            + (f", {len(plan.obsolete)} to remove" if plan.obsolete else ""))
        if dry_run:
            report.built_names = [s.name for s in plan.stale]
            return report
        started_ray = connect_ray(cfg.ray.address, cfg.ray.num_cpus)
        try:
            cache_path = _teacher_stage(cfg, plan, reader, identity, hash_cache, log)
            _build_stale(cfg, out, plan, reader, params, cache_path, report)
        finally:
            if started_ray:
                ray.shutdown()
        for name in plan.obsolete:
            inside(out, name).unlink(missing_ok=True)
        report.shards_removed = len(plan.obsolete)
        _write_resolved_if_changed(cfg, out / RESOLVED_CONFIG_NAME)
        hash_cache.save()
        return report


def _count(report: RunReport, manifest: Manifest | None) -> None:
    rows = manifest.samples if manifest else []
    report.samples_ok = sum(r.status == OK for r in rows)
    report.quarantined = len(rows) - report.samples_ok


def _remove_temporaries(out: Path) -> None:
    """Temp files of a killed run (we hold the lock, so no live writer owns them): ours at the top level,
    and zarr's `*.partial` files inside a pseudo-label cache that lives in the output folder. (A cache
    outside it may be shared by other runs, whose live writes must not be touched.)"""
    for path in out.glob(f".*{TMP_MARK}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
    for cache in out.glob("*.zarr"):
        for path in cache.rglob("*.partial"):
            if path.is_file():
                path.unlink(missing_ok=True)


def _teacher_stage(cfg: PrepConfig, plan: Plan, reader: Reader, identity: str, hash_cache: FileHashCache,
                   log: Callable[[str], None]) -> str:
    """Fill the pseudo-label cache for the samples of the stale shards (model teachers only)."""
    if cfg.teacher.kind != "depth_anything_v2":
        return ""
    from genpan.prep.depth_cache import DepthCache, fill_cache

    cache_path = cfg.teacher.cache or str(Path(cfg.out) / "depth_cache.zarr")
    cache = DepthCache(cache_path)
    hashes = hash_cache.hash_files([r.image_path for s in plan.stale for r in s.refs])
    missing = [r for s in plan.stale for r in s.refs if not cache.has(r.key, identity, hashes.get(r.image_path))]
    if missing:
        log(f"teacher {identity}: {len(missing)} images to label (the rest are cached in {cache_path})")
        gpus = None if cfg.teacher.num_gpus < 0 else cfg.teacher.num_gpus
        statuses = fill_cache(missing, reader, cfg.teacher.kind, cfg.teacher.checkpoint, cfg.teacher.input_size, identity,
                              cache_path, cfg.teacher.batch_size, gpus, cfg.teacher.concurrency)
        skipped = sum(not s.startswith("ok") for s in statuses.values())
        if skipped:
            log(f"teacher skipped {skipped} images (they will be quarantined with the reason)")
    return cache_path


def _build_stale(cfg: PrepConfig, out: Path, plan: Plan, reader: Reader, params: ShardParams, cache_path: str,
                 report: RunReport) -> None:
    import ray
    from tqdm import tqdm

    state: dict[str, tuple[ShardRow, list[SampleRow]]] = {}
    if plan.old:
        rows_by_shard: dict[str, list[SampleRow]] = {}
        for row in plan.old.samples:
            rows_by_shard.setdefault(row.shard, []).append(row)
        for shard in plan.old.shards:
            state[shard.shard] = (shard, rows_by_shard.get(shard.shard, []))
    meta = {"prep_version": PREP_VERSION, "params": params.stored(), "params_digest": plan.params_digest,
            "dataset": cfg.data.kind, "split": cfg.data.split, "data_root": str(cfg.data.root)}
    remote = ray.remote(num_cpus=1, max_retries=2)(build_shard)
    reader_box = [ray.put(reader)]
    pending = {}
    for shard in plan.stale:
        fps = {r.key: plan.fingerprints[r.key] for r in shard.refs}
        task = remote.remote(str(out.resolve()), shard.name, shard.refs, fps, shard.inputs_digest, reader_box,
                             list(reader.categories), params, str(cfg.data.root), cache_path, cfg.run.debug_task_delay_s)
        pending[task] = shard.name
    t0 = time.perf_counter()
    last_write = -float("inf")
    done_samples = quarantined = 0
    with tqdm(total=len(pending), unit="shard", desc="shards", disable=not cfg.run.progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            result: ShardResult = ray.get(ready[0])
            del pending[ready[0]]
            state[result.shard.shard] = (result.shard, result.samples)
            done_samples += len(result.samples)
            quarantined += result.shard.quarantined
            report.built_names.append(result.shard.shard)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(samples_s=f"{done_samples / max(elapsed, 1e-9):.1f}", quarantined=quarantined)
            bar.update(1)
            if not pending or time.perf_counter() - last_write >= cfg.run.manifest_every_s:
                names = {s.name for s in plan.shards} if not pending else None
                _write_state(out, state, meta, names)
                last_write = time.perf_counter()
    report.seconds = time.perf_counter() - t0
    report.shards_built = len(report.built_names)
    report.samples_built = done_samples
    final = read_manifest(out / MANIFEST_NAME)
    _count(report, final)


def _write_state(out: Path, state: dict[str, tuple[ShardRow, list[SampleRow]]], meta: dict[str, Any], keep: set[str] | None) -> None:
    manifest = Manifest(meta=meta)
    for name, (shard, samples) in state.items():
        if keep is None or name in keep:
            manifest.shards.append(shard)
            manifest.samples.extend(samples)
    write_manifest(out / MANIFEST_NAME, manifest)


def _write_resolved_if_changed(cfg: PrepConfig, path: Path) -> None:
    text = dump_toml(to_dict(cfg))
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)


# -- CLI ----------------------------------------------------------------------------------------------------
def config_help(schema: type, prefix: str = "") -> list[str]:
    """One line per config key with its default, for --help."""
    lines = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            lines += config_help(type(default), f"{prefix}{f.name}.")
        else:
            lines.append(f"  --{prefix}{f.name}={default!s}")
    return lines


def parse_args(argv: list[str] | None, description: str) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the TOML file or override as --section.key=value; defaults shown):\n"
        + "\n".join(config_help(PrepConfig))
        + "\n\nSee prep/README.md for the shard, manifest and cache contracts.",
    )
    parser.add_argument("--config", type=Path, help="TOML config (e.g. prep/configs/synthetic.toml); overrides follow as --a.b=value")
    parser.add_argument("--dry-run", action="store_true", help="plan and report what would be rebuilt; write nothing")
    return parse_args_with_overrides(parser, argv)


def run_from_cli(args: argparse.Namespace, overrides: list[str], log: Callable[[str], None] = print,
                 error_prefix: str = "") -> RunReport | int:
    """Config from the command line, then the run; a user mistake is one `error:` line and an exit code
    (3: another run holds the output's lock, 2: anything else), shared by build_shards and reprocess."""
    try:
        cfg = load_config(PrepConfig, args.config, overrides)
        return run(cfg, log=log, dry_run=args.dry_run)
    except OutputLocked as exc:
        print(f"{error_prefix}error: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"{error_prefix}error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv, "Build WebDataset shards, manifest.parquet and (optionally) depth pseudo-labels with Ray.")
    report = run_from_cli(args, overrides)
    if isinstance(report, int):
        return report
    if args.dry_run:
        print(f"dry run: would build {len(report.built_names)} of {report.shards_total} shards in {report.out}")
    else:
        print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
