"""Shard encoding, deterministic tars, the stable shard assignment and the manifest (no Ray)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from shard_fields import stored_plane

from genpan.labels import DEFAULT_DIST_SCALE, decode_distance, eds_weight
from genpan.prep.build_shards import build_shard
from genpan.prep.manifest import Manifest, SampleRow, ShardRow, read_manifest, write_manifest
from genpan.prep.readers.base import Sample
from genpan.prep.readers.coco import coco_layout
from genpan.prep.shards import (
    DISP_SCALE,
    ShardParams,
    assign_shards,
    check_name_part,
    encode_depth_mm,
    encode_disparity,
    encode_sample,
    inside,
    params_digest,
    write_tar,
)
from genpan.prep.synthetic import generate_split
from genpan.prep.targets import build_targets, encode_distance
from genpan.prep.teachers import disparity_from_depth


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    generate_split(root, "train", 6, seed=3, progress=False)
    return root


def _loaded(root: Path) -> tuple[object, list[Sample]]:
    reader = coco_layout(root, "train", with_depth=True, dataset="synthetic")
    samples = [reader.load(r) for r in reader.refs()]
    assert all(isinstance(s, Sample) for s in samples)
    return reader, samples  # type: ignore[return-value]


def _decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_encoded_fields_match_the_target_functions(synth: Path) -> None:
    reader, samples = _loaded(synth)
    params = ShardParams(dist_clip=40.0, teacher="ground-truth-depth/v1")
    train_id_of = {c.id: c.train_id for c in reader.categories}
    things = {c.id for c in reader.categories if c.isthing}
    for s in samples:
        disp = disparity_from_depth(s.depth_m)
        fields = encode_sample(s, reader.categories, params, disp, synth)
        t = build_targets(s.pan_ids, s.segments, train_id_of, things, 40.0)
        assert fields["jpg"] == Path(s.source_path).read_bytes()  # never re-encoded
        assert np.array_equal(stored_plane(fields, "sem.zst"), t.sem) and stored_plane(fields, "sem.zst").dtype == np.uint8
        assert np.array_equal(stored_plane(fields, "ins.zst"), t.ins) and stored_plane(fields, "ins.zst").dtype == np.uint16
        assert np.array_equal(stored_plane(fields, "dist.zst"), encode_distance(t.dist, 40.0))
        depth_png = (synth / "depth_train" / f"{s.key}.png").read_bytes()
        assert np.array_equal(stored_plane(fields, "depth.zst"), _decode(depth_png))  # mm round-trips exactly
        assert np.array_equal(stored_plane(fields, "disp.zst"), encode_disparity(disp))
        meta = json.loads(fields["json"])
        assert meta["segments"] == t.segments
        assert meta["source_path"] == f"train/{s.key}.jpg"
        assert meta["params"]["dist_clip"] == 40.0 and meta["params"]["dist_scale"] == DEFAULT_DIST_SCALE
        assert meta["hashes"]["source"] == s.source_hash
        assert [c[0] for c in meta["categories"]] == [c.id for c in reader.categories]


def test_a_sample_without_panoptic_labels_keeps_image_and_depth(synth: Path) -> None:
    reader, samples = _loaded(synth)
    s = samples[0]
    s.pan_ids, s.segments = None, []
    fields = encode_sample(s, [], ShardParams(teacher="ground-truth-depth/v1"), disparity_from_depth(s.depth_m), synth)
    assert sorted(fields) == ["depth.zst", "disp.zst", "jpg", "json"]
    meta = json.loads(fields["json"])
    assert meta["panoptic"] is False and meta["segments"] == []


def test_eds_weights_from_the_stored_distance_follow_any_d_and_wmin(synth: Path) -> None:
    """D and wmin are train-time: the stored distance gives the weights of eq. 5 for every choice."""
    reader, samples = _loaded(synth)
    s = samples[0]
    fields = encode_sample(s, reader.categories, ShardParams(), None, synth)
    assert "D" not in json.loads(fields["json"])["params"]
    stored = decode_distance(stored_plane(fields, "dist.zst"), DEFAULT_DIST_SCALE)
    t = build_targets(s.pan_ids, s.segments, {c.id: c.train_id for c in reader.categories}, set(), ShardParams().dist_clip)
    for D, wmin in [(5.0, 0.0), (20.0, 0.1), (60.0, 0.5)]:
        exact = wmin + (1 - wmin) * np.exp(-(t.dist.astype(np.float64) ** 2) / D**2)  # eq. 5 on the exact distance
        # quantisation to 1/scale px: |dw/dd| <= (1 - wmin)·sqrt(2/e)/D
        bound = (1 - wmin) * np.sqrt(2 / np.e) / D * (0.5 / DEFAULT_DIST_SCALE) + 1e-6
        assert np.abs(eds_weight(stored, D, wmin) - exact).max() <= bound


def test_depth_and_disparity_encodings_against_loops() -> None:
    depth = np.array([[0.0, 1.2345, 70.0], [0.5, 2.0, 0.0004]], np.float32)
    mm = encode_depth_mm(depth)
    for (i, j), d in np.ndenumerate(depth):
        assert mm[i, j] == min(65535, int(np.floor(float(d) * 1000 + 0.5)))
    disp = disparity_from_depth(depth)
    valid = depth > 0
    inv_max = max(1.0 / float(d) for d in depth[valid])
    for (i, j), d in np.ndenumerate(depth):
        expect = (1.0 / float(d)) / inv_max if d > 0 else 0.0
        assert disp[i, j] == pytest.approx(expect, rel=1e-6)
    enc = encode_disparity(np.array([0.0, 0.5, 1.0, 1.5, -1.0]))
    assert enc.tolist() == [0, round(0.5 * DISP_SCALE), DISP_SCALE, DISP_SCALE, 0]


def test_tar_is_deterministic_and_readable_with_webdataset(synth: Path, tmp_path: Path) -> None:
    reader, samples = _loaded(synth)
    items = [(s.key, encode_sample(s, reader.categories, ShardParams(), None, synth)) for s in samples]
    size_a, sha_a = write_tar(tmp_path / "a.tar", items)
    size_b, sha_b = write_tar(tmp_path / "b.tar", items)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes() and sha_a == sha_b
    assert size_a == (tmp_path / "a.tar").stat().st_size
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)
    assert [m.name for m in members[:6]] == [f"{samples[0].key}.{f}" for f in ("jpg", "sem.zst", "ins.zst", "dist.zst", "depth.zst", "json")]
    got = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    for g, (_, fields) in zip(got, items):
        assert {k: g[k] for k in fields} == fields
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary name is gone after the rename


def test_write_tar_refuses_unsorted_samples(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="increasing key order"):
        write_tar(tmp_path / "x.tar", [("b", {"json": b"{}"}), ("a", {"json": b"{}"})])
    assert not list(tmp_path.iterdir())


def test_build_shard_quarantines_and_goes_on(synth: Path, tmp_path: Path) -> None:
    reader = coco_layout(synth, "train", with_depth=True, dataset="synthetic")
    refs = reader.refs()
    bad = refs[1]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(bad.image_path).read_bytes()[:500])
    refs[1] = type(bad)(**{**bad.__dict__, "image_path": str(broken)})
    fps = {r.key: "fp" for r in refs}
    res = build_shard(str(tmp_path), "s.tar", refs, fps, "digest", [reader], reader.categories, ShardParams(), str(synth))
    assert res.shard.count == len(refs) - 1 and res.shard.quarantined == 1
    row = next(r for r in res.samples if r.key == bad.key)
    assert row.status == "quarantined" and "truncated JPEG" in row.error and row.source_path == str(broken)
    keys = [g["__key__"] for g in wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False)]
    assert keys == sorted(r.key for r in refs if r.key != bad.key)


def _keys(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return sorted({f"img_{v:08d}" for v in rng.integers(0, 10**8, n)})


def test_assignment_is_stable_under_local_edits() -> None:
    keys = _keys(2000, 0)
    base = assign_shards(keys, 32)
    sizes = [len(v) for v in base.values()]
    assert sum(sizes) == len(keys) and min(sizes) >= 8 and max(sizes) <= 96
    assert 20 <= np.mean(sizes) <= 48  # about samples_per_shard on average
    content = {tuple(v) for v in base.values()}
    rng = np.random.default_rng(1)
    for _ in range(20):
        edited = list(keys)
        if rng.random() < 0.5:
            edited.pop(int(rng.integers(len(edited))))
        else:
            edited.append(f"img_{int(rng.integers(10**8)):08d}x")
        new = assign_shards(edited, 32)
        changed = [v for v in new.values() if tuple(v) not in content]
        assert 1 <= len(changed) <= 3, len(changed)  # one shard, rarely its neighbours


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text("abcdef0123", min_size=1, max_size=6), max_size=200), st.integers(1, 20))
def test_assignment_partitions_the_keys(keys: list[str], per_shard: int) -> None:
    shards = assign_shards(keys, per_shard, "p")
    flat = [k for v in shards.values() for k in v]
    assert flat == sorted(set(keys))
    assert all(name == f"p-{v[0]}.tar" for name, v in shards.items())
    assert all(len(v) <= 3 * per_shard for v in shards.values())


def test_user_paths_stay_inside_the_output(tmp_path: Path) -> None:
    for bad in ["../x", "/abs", "a/b", "..", ".hidden", ""]:
        with pytest.raises(ValueError):
            check_name_part(bad, "shards.prefix")
    for bad in ["../x.tar", "/etc/passwd", "a/../../x.tar"]:
        with pytest.raises(ValueError, match="output directory"):
            inside(tmp_path, bad)
    assert inside(tmp_path, "s-1.tar") == (tmp_path / "s-1.tar").resolve()


def test_params_digest_tracks_stored_parameters_only(synth: Path) -> None:
    reader, _ = _loaded(synth)
    base = params_digest(ShardParams(), reader.categories)
    assert params_digest(ShardParams(), reader.categories) == base
    assert params_digest(ShardParams(dist_clip=100.0), reader.categories) != base
    assert params_digest(ShardParams(teacher="t"), reader.categories) != base
    assert params_digest(ShardParams(dist_scale=4, dist_clip=63.75), reader.categories) != base
    for bad in [{"dist_clip": 40000.0}, {"dist_scale": 3}, {"dist_clip": 0.0}]:
        with pytest.raises(ValueError, match="dist_clip"):
            ShardParams(**bad)


def test_manifest_round_trip(tmp_path: Path) -> None:
    m = Manifest(
        samples=[SampleRow("b", "s.tar", "ok", source_hash="h"), SampleRow("a", "s.tar", "quarantined", error="bad PNG")],
        shards=[ShardRow("s.tar", 1, 1, 10240, "f" * 64, "1", "d")],
        meta={"params_digest": "p"},
    )
    write_manifest(tmp_path / "manifest.parquet", m)
    got = read_manifest(tmp_path / "manifest.parquet")
    assert got is not None and got.meta == {"params_digest": "p"}
    assert got.shards == m.shards and sorted(got.samples, key=lambda r: r.key) == sorted(m.samples, key=lambda r: r.key)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="bad.parquet"):
        read_manifest(tmp_path / "bad.parquet")
    assert read_manifest(tmp_path / "none.parquet") is None
