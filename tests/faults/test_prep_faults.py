"""SIGKILL build_shards / reprocess at chosen points, re-run, and compare with an uninterrupted run byte for byte.

The same harness as `python tests/faults/prep_harness.py --kills 20` (figures in docs/reliability.md);
jobs/reprocess.py and overlapping runs are in test_reprocess_faults.py.
"""

from __future__ import annotations

import random
import shutil
import signal
from pathlib import Path

import pytest

from faults.prep_harness import (
    delete_some_shards,
    differences,
    job_args,
    kill_series,
    make_dataset,
    make_teacher_checkpoint,
    run_job,
    zarr_temp_files,
)

KILLS = 20


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, teacher checkpoint, uninterrupted reference output)."""
    work = tmp_path_factory.mktemp("prep_faults")
    data, ckpt = make_dataset(work / "data"), make_teacher_checkpoint(work / "teacher")
    reference = work / "reference"
    result = run_job("build", job_args(data, reference, ckpt))
    assert result.returncode == 0, result.stderr
    assert "24 samples ok, 0 quarantined" in result.stdout
    return data, ckpt, reference


def test_the_comparison_sees_a_changed_byte_a_lost_shard_and_a_stray_file(built, tmp_path: Path) -> None:
    """The checker itself: a copy is equal; each kind of damage is reported."""
    _, _, reference = built
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    assert differences(reference, copy) == []
    shard = sorted(copy.glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))
    (copy / ".manifest.parquet.tmp-123").write_bytes(b"x")
    sorted(copy.glob("*.tar"))[0].unlink()
    found = " | ".join(differences(reference, copy))
    assert f"shard differs: {shard.name}" in found and "shard missing" in found and "stray file: .manifest.parquet.tmp-123" in found


@pytest.mark.parametrize("point", ["tar_member:9", "shard_done:2", "manifest_write:3", "cache_write:23"])
def test_each_kill_point_is_reached_and_the_rerun_is_identical(built, tmp_path: Path, point: str) -> None:
    data, ckpt, reference = built
    out = tmp_path / "out"
    killed = run_job("build", job_args(data, out, ckpt), fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert differences(reference, out)  # it really was interrupted
    rerun = run_job("build", job_args(data, out, ckpt))
    assert rerun.returncode == 0, rerun.stderr
    assert differences(reference, out) == []


def test_build_survives_a_series_of_kills(built, tmp_path: Path) -> None:
    data, ckpt, reference = built
    out = tmp_path / "killed"

    report = kill_series("build", job_args(data, out, ckpt), reference, out, KILLS, random.Random(1), delete_some_shards(reference))
    assert report.problems == [] and not report.zarr_temp_files
    assert len(report.kills) == KILLS and report.comparisons_equal == report.completions >= 2
    assert len(report.by_point()) == 4  # every kind of kill point was hit


def test_a_killed_cache_write_leaves_no_temp_file_after_the_rerun(built, tmp_path: Path) -> None:
    data, ckpt, _ = built
    out = tmp_path / "out"
    assert run_job("build", job_args(data, out, ckpt), fault="cache_write:1").returncode == -signal.SIGKILL
    assert zarr_temp_files(out)  # the torn write
    assert run_job("build", job_args(data, out, ckpt)).returncode == 0
    assert zarr_temp_files(out) == []
