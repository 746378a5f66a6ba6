"""The Ray driver end to end on the synthetic set with a real local Ray, real tars, parquet and webdataset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
from shard_fields import stored_plane

from genpan.coco_panoptic import encode_panoptic_png, read_panoptic_png
from genpan.prep.build_shards import (
    DataConfig,
    OutputLocked,
    PrepConfig,
    RunConfig,
    ShardConfig,
    SyntheticConfig,
    TeacherConfig,
    output_lock,
    run,
)
from genpan.prep.manifest import MANIFEST_NAME, Manifest, ShardRow, read_manifest, write_manifest
from genpan.prep.readers.base import Sample
from genpan.prep.readers.coco import coco_layout
from genpan.prep.shards import encode_disparity
from genpan.prep.synthetic import generate_split
from genpan.prep.targets import build_targets, encode_distance
from genpan.prep.teachers import disparity_from_depth

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 32


@pytest.fixture(scope="module")
def base_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_split(root, "train", N_IMAGES, seed=7, progress=False)
    return root


@pytest.fixture
def data(base_data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(base_data, root)
    return root


def make_cfg(data: Path, out: Path, **shards: object) -> PrepConfig:
    return PrepConfig(
        out=out,
        data=DataConfig(kind="synthetic", root=data, split="train"),
        synthetic=SyntheticConfig(generate=False),
        shards=ShardConfig(**{"samples_per_shard": 6, "prefix": "syn", **shards}),  # type: ignore[arg-type]
        teacher=TeacherConfig(kind="ground_truth"),
        run=RunConfig(progress=False, manifest_every_s=0.0),
    )


def snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir()) if p.is_file()}


def shard_of(manifest: Manifest, key: str) -> str:
    return next(r.shard for r in manifest.samples if r.key == key)


def _decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_shards_hold_exactly_the_targets_and_a_second_run_is_a_noop(ray_address: str, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run(make_cfg(data, out, dist_clip=64.0), log=lambda m: None)
    manifest = read_manifest(out / MANIFEST_NAME)
    assert manifest is not None and report.shards_built == len(manifest.shards) >= 3
    assert report.samples_ok == N_IMAGES and report.quarantined == 0
    reader = coco_layout(data, "train", with_depth=True, dataset="synthetic")
    train_id_of = {c.id: c.train_id for c in reader.categories}
    things = {c.id for c in reader.categories if c.isthing}
    by_key = {r.key: r for r in reader.refs()}
    urls = [str(out / s.shard) for s in manifest.shards]
    seen = []
    for got in wds.WebDataset(urls, shardshuffle=False):
        sample = reader.load(by_key[got["__key__"]])
        assert isinstance(sample, Sample)
        t = build_targets(sample.pan_ids, sample.segments, train_id_of, things, 64.0)
        assert got["jpg"] == sample.image_bytes
        assert np.array_equal(stored_plane(got, "sem.zst"), t.sem)
        assert np.array_equal(stored_plane(got, "ins.zst"), t.ins)
        assert np.array_equal(stored_plane(got, "dist.zst"), encode_distance(t.dist, 64.0))
        assert np.array_equal(stored_plane(got, "disp.zst"), encode_disparity(disparity_from_depth(sample.depth_m)))
        meta = json.loads(got["json"])
        assert meta["segments"] == t.segments and meta["params"]["dist_clip"] == 64.0
        seen.append(got["__key__"])
    assert sorted(seen) == sorted(by_key)
    for row in manifest.shards:  # per-shard rows describe the files
        path = out / row.shard
        assert path.stat().st_size == row.bytes and row.count == sum(r.shard == row.shard for r in manifest.samples)
    assert (out / "prep_config.resolved.toml").exists()

    before = snapshot(out)
    again = run(make_cfg(data, out, dist_clip=64.0), log=lambda m: None)
    assert again.nothing_changed and again.shards_built == 0
    assert "nothing changed" in again.summary()
    assert snapshot(out) == before  # wrote nothing


def test_editing_one_label_rebuilds_only_its_shard(ray_address: str, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(make_cfg(data, out), log=lambda m: None)
    manifest = read_manifest(out / MANIFEST_NAME)
    assert manifest is not None
    key = "train_000011"
    label = data / "annotations" / "panoptic_train" / f"{key}.png"
    ids = read_panoptic_png(label)
    # Move one boundary pixel of a large segment to its neighbour: still consistent with the JSON.
    ys, xs = np.nonzero(ids[:, 1:] != ids[:, :-1])
    y, x = int(ys[0]), int(xs[0])
    ids[y, x] = ids[y, x + 1]
    label.write_bytes(encode_panoptic_png(ids))
    before = snapshot(out)
    report = run(make_cfg(data, out), log=lambda m: None)
    target = shard_of(manifest, key)
    assert report.built_names == [target]
    after = snapshot(out)
    for name, (mtime, content) in before.items():
        if name.endswith(".tar") and name != target:
            assert after[name] == (mtime, content)  # untouched
    assert after[target][1] != before[target][1]
    got = next(g for g in wds.WebDataset(str(out / target), shardshuffle=False) if g["__key__"] == key)
    assert stored_plane(got, "sem.zst")[y, x] == stored_plane(got, "sem.zst")[y, x + 1]


def test_bad_samples_are_quarantined_with_reasons_and_the_rest_land(
    ray_address: str, base_data: Path, data: Path, tmp_path: Path
) -> None:
    corrupt, unknown_id = "train_000004", "train_000020"
    jpg = data / "train" / f"{corrupt}.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    label = data / "annotations" / "panoptic_train" / f"{unknown_id}.png"
    ids = read_panoptic_png(label)
    ids[:3, :3] = 4242  # an id the JSON does not list
    label.write_bytes(encode_panoptic_png(ids))
    out = tmp_path / "out"
    report = run(make_cfg(data, out), log=lambda m: None)
    assert report.quarantined == 2 and report.samples_ok == N_IMAGES - 2
    manifest = read_manifest(out / MANIFEST_NAME)
    assert manifest is not None
    bad = {r.key: r for r in manifest.samples if r.status == "quarantined"}
    assert set(bad) == {corrupt, unknown_id}
    assert "truncated JPEG" in bad[corrupt].error and bad[corrupt].source_path.endswith(f"{corrupt}.jpg")
    assert "4242" in bad[unknown_id].error and "not in the JSON" in bad[unknown_id].error
    landed = [g["__key__"] for s in manifest.shards for g in wds.WebDataset(str(out / s.shard), shardshuffle=False)]
    assert sorted(landed) == sorted(r.key for r in manifest.samples if r.status == "ok") and len(landed) == N_IMAGES - 2
    assert sum(s.quarantined for s in manifest.shards) == 2
    # Restoring the image rebuilds its shard only, and the sample lands.
    shutil.copy(base_data / "train" / f"{corrupt}.jpg", jpg)
    fixed = run(make_cfg(data, out), log=lambda m: None)
    assert fixed.built_names == [shard_of(manifest, corrupt)] and fixed.quarantined == 1


def test_stored_parameter_change_rebuilds_and_added_images_rebuild_few(ray_address: str, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run(make_cfg(data, out), log=lambda m: None)
    clip = run(make_cfg(data, out, dist_clip=100.0), log=lambda m: None)
    assert clip.shards_built == clip.shards_total == first.shards_total and clip.changes["params_changed"] == 1
    generate_split(data, "train", N_IMAGES + 3, seed=7, progress=False)  # same first 32 files, 3 more
    more = run(make_cfg(data, out, dist_clip=100.0), log=lambda m: None)
    assert more.changes == {"added": 3, "removed": 0, "changed": 0, "params_changed": 0}
    assert 1 <= more.shards_built <= 2 < more.shards_total and more.samples_ok == N_IMAGES + 3


def test_concurrent_runs_are_refused(ray_address: str, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputLocked, match="another prep run"):
            run(make_cfg(data, out), log=lambda m: None)
    assert not (out / MANIFEST_NAME).exists()


def test_a_manifest_pointing_outside_the_output_is_refused(ray_address: str, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_manifest(out / MANIFEST_NAME, Manifest(shards=[ShardRow("../victim.tar", 1, 0, 1, "x", "1", "d")]))
    (tmp_path / "victim.tar").write_bytes(b"keep me")
    with pytest.raises(ValueError, match="leaves the output directory"):
        run(make_cfg(data, out), log=lambda m: None)
    assert (tmp_path / "victim.tar").read_bytes() == b"keep me"


def test_killed_run_resumes_to_byte_identical_shards(ray_address: str, data: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run(make_cfg(data, reference), log=lambda m: None)
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "prep" / "build_shards.py"), "--config", str(REPO / "prep" / "configs" / "synthetic.toml"),
           f"--data.root={data}", f"--out={out}", "--shards.samples_per_shard=6", "--shards.prefix=syn",
           "--synthetic.generate=false", "--run.debug_task_delay_s=1.5", "--run.progress=false", "--run.manifest_every_s=0.0",
           f"--ray.address={ray_address}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("syn-*.tar")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    expected = sorted(p.name for p in reference.glob("*.tar"))
    assert len(list(out.glob("syn-*.tar"))) < len(expected)  # it really was interrupted
    time.sleep(1.0)  # let Ray reap the dead driver's workers
    resumed = run(make_cfg(data, out), log=lambda m: None)
    assert resumed.shards_built <= len(expected)
    assert sorted(p.name for p in out.glob("*.tar")) == expected
    for name in expected:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(out.glob(".*tmp*"))
    a, b = read_manifest(reference / MANIFEST_NAME), read_manifest(out / MANIFEST_NAME)
    assert a is not None and b is not None and sorted(a.shards, key=lambda s: s.shard) == sorted(b.shards, key=lambda s: s.shard)
