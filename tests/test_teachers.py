"""Depth teachers, the zarr pseudo-label cache and the Ray Data teacher stage (tiny random Depth Anything V2)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
import zarr
from shard_fields import stored_plane

from genpan.prep.build_shards import DataConfig, PrepConfig, RunConfig, ShardConfig, SyntheticConfig, TeacherConfig, run
from genpan.prep.depth_cache import DepthCache, decode_rgb, fill_cache, teacher_slug
from genpan.prep.manifest import MANIFEST_NAME, read_manifest
from genpan.prep.readers.base import Sample
from genpan.prep.readers.coco import coco_layout
from genpan.prep.shards import encode_disparity
from genpan.prep.synthetic import SceneConfig, generate_split
from genpan.prep.teachers import GroundTruthDepthTeacher, network_input_shape

REPO = Path(__file__).resolve().parents[1]


def test_ground_truth_teacher_uses_the_metric_depth() -> None:
    teacher = GroundTruthDepthTeacher()
    depth = np.array([[1.0, 2.0], [0.0, 4.0]], np.float32)
    (disp,) = teacher([np.zeros((2, 2, 3), np.uint8)], [depth])
    assert disp.tolist() == [[1.0, 0.5], [0.0, 0.25]]  # 1/d over max(1/d); 0 = no measurement
    with pytest.raises(ValueError, match="metric depth"):
        teacher([np.zeros((2, 2, 3), np.uint8)], [None])


def test_network_input_shape_keeps_aspect_on_the_patch_grid() -> None:
    for h, w in [(480, 640), (100, 37), (518, 518), (1024, 2048)]:
        nh, nw = network_input_shape(h, w, 70)
        assert nh % 14 == 0 and nw % 14 == 0 and min(nh, nw) >= 63
        assert abs(nh / nw - h / w) / (h / w) < 0.25


def test_cache_round_trip_and_half_written_entries(tmp_path: Path) -> None:
    cache = DepthCache(tmp_path / "c.zarr")
    cache.ensure_teacher("t/1")
    disp = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    cache.put("k1", "t/1", "hash1", disp)
    got = cache.get("k1", "t/1", "hash1")
    assert got is not None and np.array_equal(got, encode_disparity(disp) / np.float32(65535))
    assert cache.get("k1", "t/1", "other-image") is None  # the image changed: recompute
    assert cache.get("k1", "t/2", "hash1") is None and cache.get("nope", "t/1") is None
    # A writer killed after the data but before the marker: never read as valid.
    arr = zarr.create_array(str(tmp_path / "c.zarr"), name=f"{teacher_slug('t/1')}/k2", shape=(5, 7), dtype="uint16", chunks=(5, 7))
    arr[...] = 1
    assert cache.get("k2", "t/1") is None and not cache.has("k2", "t/1")
    # A torn metadata file is treated the same way.
    meta = tmp_path / "c.zarr" / teacher_slug("t/1") / "k1" / "zarr.json"
    meta.write_text(meta.read_text()[:20])
    assert cache.get("k1", "t/1", "hash1") is None


transformers = pytest.importorskip("transformers", reason="the Depth Anything V2 teacher is an optional extra: pip install transformers")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=14,
                            image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14)
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():
        # A random head ends in ReLU and gives ~0, and its image-dependent part is ~1e-6: a positive bias and
        # a large gain make the disparity vary with the image far above float noise (min-max normalisation
        # would otherwise amplify the rounding differences between thread counts to whole levels).
        model.head.conv3.bias.fill_(0.5)
        model.head.conv3.weight.mul_(1e5)
    path = tmp_path_factory.mktemp("tiny_da")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn_small")
    generate_split(root, "train", 8, seed=11, cfg=SceneConfig(min_size=48, max_size=80), progress=False)
    return root


def test_depth_anything_teacher(tiny_checkpoint: Path, small_data: Path) -> None:
    from genpan.prep.teachers import DepthAnythingV2Teacher, depth_anything_identity

    teacher = DepthAnythingV2Teacher(tiny_checkpoint, input_size=56)
    assert teacher.identity == depth_anything_identity(tiny_checkpoint, 56)
    assert teacher.identity != depth_anything_identity(tiny_checkpoint, 70)
    reader = coco_layout(small_data, "train", with_depth=True, dataset="synthetic")
    samples = [reader.load(r) for r in reader.refs()[:4]]
    images = [decode_rgb(s.image_bytes) for s in samples if isinstance(s, Sample)]
    batch = teacher(images)
    for img, disp in zip(images, batch):
        assert disp.shape == img.shape[:2] and disp.dtype == np.float32
        assert disp.min() == 0.0 and disp.max() == 1.0  # min-max normalised relative disparity
    singles = [teacher([img])[0] for img in images]
    for a, b in zip(batch, singles):  # grouping into batches does not change a result
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_teacher_stage_caches_and_resharding_never_reruns_it(ray_address: str, tiny_checkpoint: Path, small_data: Path,
                                                             tmp_path: Path) -> None:
    from genpan.prep.teachers import DepthAnythingV2Teacher

    reader = coco_layout(small_data, "train", with_depth=True, dataset="synthetic")
    teacher = DepthAnythingV2Teacher(tiny_checkpoint, input_size=56)
    cache_path = tmp_path / "cache.zarr"
    refs = reader.refs()
    statuses = fill_cache(refs[:3], reader, "depth_anything_v2", str(tiny_checkpoint), 56, teacher.identity, cache_path,
                          batch_size=2, concurrency=1)
    assert statuses == {r.key: "ok" for r in refs[:3]}
    cache = DepthCache(cache_path)
    for ref in refs[:3]:
        sample = reader.load(ref)
        assert isinstance(sample, Sample)
        direct = teacher([decode_rgb(sample.image_bytes)])[0]
        got = cache.get(ref.key, teacher.identity, sample.image_hash)
        assert got is not None and np.abs(got - direct).max() <= 0.5 / 65535 + 1e-5

    def cfg(per_shard: int, out: Path) -> PrepConfig:
        return PrepConfig(
            out=out,
            data=DataConfig(kind="synthetic", root=small_data, split="train"),
            synthetic=SyntheticConfig(generate=False),
            shards=ShardConfig(samples_per_shard=per_shard, prefix="da"),
            teacher=TeacherConfig(kind="depth_anything_v2", checkpoint=str(tiny_checkpoint), input_size=56, batch_size=4,
                                  cache=str(cache_path)),
            run=RunConfig(progress=False),
        )

    logs: list[str] = []
    run(cfg(3, tmp_path / "a"), log=logs.append)
    assert any(f"{len(refs) - 3} images to label" in line for line in logs)  # the 3 cached ones are reused
    entry_meta = {p: p.stat().st_mtime_ns for p in cache_path.rglob("zarr.json")}
    manifest = read_manifest(tmp_path / "a" / MANIFEST_NAME)
    assert manifest is not None and all(r.status == "ok" for r in manifest.samples)
    for shard in manifest.shards:
        for got in wds.WebDataset(str(tmp_path / "a" / shard.shard), shardshuffle=False):
            stored = stored_plane(got, "disp.zst")
            cached = cache.get(got["__key__"], teacher.identity)
            assert cached is not None and np.array_equal(stored, encode_disparity(cached))
            assert np.array_equal(stored_plane(got, "depth.zst"),
                                  cv2.imread(str(small_data / "depth_train" / f"{got['__key__']}.png"), cv2.IMREAD_UNCHANGED))
    logs.clear()
    run(cfg(5, tmp_path / "b"), log=logs.append)  # another sharding of the same images
    assert not any("images to label" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in cache_path.rglob("zarr.json")} == entry_meta
