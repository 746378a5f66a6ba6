"""Run `prep/build_shards.py` or `jobs/reprocess.py` in-process with kill points armed (test-only entry script).

    python tests/faults/run_prep.py --entry=build --fault=tar_member:5 -- --config ... --out=...

Ray is replaced by `faults.inline_ray` (every shard task runs in this process) and the Depth Anything V2
teacher by a cheap deterministic stand-in with the same identity, so the zarr cache path is exercised
without model weights. `--fault=POINT:N` SIGKILLs this process at the Nth event of POINT:

    tar_member      before the Nth tar member is added (inside a shard write: a half-written temp tar)
    shard_done      right after the Nth shard file is renamed into place, before the manifest records it
    manifest_write  during the Nth manifest write: half the parquet bytes in its temp file, then killed
    cache_write     during the Nth file write of the zarr cache (metadata, chunk or completion marker):
                    half the bytes in zarr's temp file, then killed

`--pause=POINT:N --signal-dir=DIR` instead creates DIR/paused at that event and waits for DIR/release
(two overlapping runs). Exit status: the job's own (0, 2, 3), or -9 when killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

from faults import inline_ray  # noqa: E402

POINTS = ("tar_member", "shard_done", "manifest_write", "cache_write")


class FakeDepthTeacher:
    """Disparity = the image's grey level min-max normalised: deterministic, instant, shaped like the image."""

    needs_images = True

    def __init__(self, identity: str) -> None:
        self.identity = identity

    def __call__(self, images: Sequence[Any], depths: Sequence[Any] | None = None) -> list[Any]:
        from genpan.prep.teachers import normalise_min_max

        return [normalise_min_max(img.astype("float64").mean(axis=2)) for img in images]


def parse_point(text: str) -> tuple[str, int]:
    point, _, n = text.partition(":")
    if point not in POINTS or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"expected POINT:N with POINT in {POINTS} and N >= 1, got {text!r}")
    return point, int(n)


class Trigger:
    """Counts events per point and acts (kill or pause) at the armed one."""

    def __init__(self, armed: tuple[str, int] | None, action: Callable[[], None]) -> None:
        self.armed, self.action, self.counts = armed, action, dict.fromkeys(POINTS, 0)

    def hit(self, point: str, before: Callable[[], None] | None = None) -> None:
        self.counts[point] += 1
        if self.armed == (point, self.counts[point]):
            if before is not None:
                before()
            self.action()


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def pause_until_released(signal_dir: Path) -> Callable[[], None]:
    def pause() -> None:
        (signal_dir / "paused").touch()
        while not (signal_dir / "release").exists():
            time.sleep(0.02)

    return pause


def install_hooks(trigger: Trigger) -> None:
    import zarr.storage._local as zarr_local

    import genpan.prep.build_shards as build_shards
    import genpan.prep.manifest as manifest
    import genpan.prep.teachers as teachers

    real_addfile = tarfile.TarFile.addfile

    def addfile(self: tarfile.TarFile, tarinfo: tarfile.TarInfo, fileobj: Any = None) -> None:
        trigger.hit("tar_member")
        real_addfile(self, tarinfo, fileobj)

    tarfile.TarFile.addfile = addfile  # type: ignore[method-assign]

    real_write_tar = build_shards.write_tar

    def write_tar(path: Any, samples: Any) -> tuple[int, str]:
        result = real_write_tar(path, samples)
        trigger.hit("shard_done")
        return result

    build_shards.write_tar = write_tar

    real_atomic = manifest.atomic_write_bytes

    def atomic_write_bytes(path: Any, data: bytes) -> Path:
        if Path(path).name == manifest.MANIFEST_NAME:
            trigger.hit("manifest_write", before=lambda: _torn_temp(Path(path), data))
        return real_atomic(path, data)

    manifest.atomic_write_bytes = atomic_write_bytes

    real_put = zarr_local._put

    def put(path: Path, value: Any, exclusive: bool = False) -> int:
        def torn() -> None:  # what zarr's own atomic write leaves when killed half-way
            path.parent.mkdir(parents=True, exist_ok=True)
            data = bytes(value.as_buffer_like())
            path.with_suffix(f".{uuid.uuid4().hex}.partial").write_bytes(data[: len(data) // 2])

        trigger.hit("cache_write", before=torn)
        return real_put(path, value, exclusive)

    zarr_local._put = put

    real_make_teacher = teachers.make_teacher

    def make_teacher(kind: str, checkpoint: str = "", input_size: int = 518, device: str = "auto") -> Any:
        if kind == "depth_anything_v2":
            return FakeDepthTeacher(teachers.depth_anything_identity(checkpoint, input_size))
        return real_make_teacher(kind, checkpoint, input_size, device)

    teachers.make_teacher = make_teacher


def _torn_temp(path: Path, data: bytes) -> None:
    fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data[: len(data) // 2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", choices=("build", "reprocess"), default="build",
                        help="prep/build_shards.py (build) or jobs/reprocess.py (reprocess)")
    parser.add_argument("--fault", type=parse_point, help="POINT:N: SIGKILL at the Nth event of POINT")
    parser.add_argument("--pause", type=parse_point, help="POINT:N: wait for --signal-dir/release at that event")
    parser.add_argument("--signal-dir", type=Path, help="folder for the paused/release files of --pause")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then the job's own arguments")
    args = parser.parse_args(argv)
    if args.pause and not args.signal_dir:
        parser.error("--pause needs --signal-dir")
    inline_ray.install()
    if args.pause:
        trigger = Trigger(args.pause, pause_until_released(args.signal_dir))
    else:
        trigger = Trigger(args.fault, kill_now)
    install_hooks(trigger)
    job_args = args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args
    if args.entry == "build":
        from genpan.prep.build_shards import main as job_main
    else:
        from genpan.jobs.reprocess import main as job_main
    return job_main(job_args)


if __name__ == "__main__":
    raise SystemExit(main())
