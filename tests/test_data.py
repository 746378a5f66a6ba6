"""Streaming loader and on-device augmentation (genpan/train/data.py, genpan/train/augment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from genpan.labels import DIST_SCALE, IGNORE
from genpan.prep.readers import make_reader
from genpan.prep.shards import ShardParams, encode_png, encode_sample, write_tar
from genpan.prep.synthetic import SceneConfig, generate_split
from genpan.prep.teachers import disparity_from_depth
from genpan.train.augment import AugmentParams, augment_batch, draw_params, instance_centroids, loss_size
from genpan.train.data import BatchStream, DataConfig, batches_consumed_by_worker, collate, count_samples, resolve_shards

torch.set_num_threads(1)


def write_synthetic_shards(root: Path, num_images: int, per_shard: int, min_size: int, max_size: int, seed: int = 0) -> Path:
    """Synthetic scenes → shards with the real shard writer (genpan/prep/shards.py); returns the shard folder."""
    data_root = root / "synthetic"
    generate_split(data_root, "train", num_images, seed, SceneConfig(min_size=min_size, max_size=max_size), progress=False)
    reader = make_reader("synthetic", root=data_root, split="train")
    params = ShardParams(teacher="ground-truth-depth/v1")
    samples = []
    for ref in reader.refs():
        sample = reader.load(ref)
        samples.append((sample.key, encode_sample(sample, reader.categories, params, disparity_from_depth(sample.depth_m))))
    samples.sort()
    out = root / "shards"
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), per_shard):
        write_tar(out / f"shard-{start // per_shard:04d}.tar", samples[start : start + per_shard])
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("data"), num_images=12, per_shard=4, min_size=40, max_size=64)


# -- numpy references ---------------------------------------------------------------------------------
def numpy_centroids(ins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slow loop: per image, per instance index, the mean pixel centre in [-1, 1] coordinates."""
    b, h, w = ins.shape
    u, v = np.zeros(ins.shape), np.zeros(ins.shape)
    for i in range(b):
        for k in np.unique(ins[i]):
            if k == 0:
                continue
            ys, xs = [], []
            for y in range(h):
                for x in range(w):
                    if ins[i, y, x] == k:
                        ys.append(y)
                        xs.append(x)
            cu = np.mean([2 * (x + 0.5) / w - 1 for x in xs])
            cv = np.mean([2 * (y + 0.5) / h - 1 for y in ys])
            u[i][ins[i] == k], v[i][ins[i] == k] = cu, cv
    return u, v


def numpy_crop_nearest(src: np.ndarray, size_hw: tuple[int, int], off_y: int, off_x: int, flip: bool, out_hw, grid_hw, pad):
    """Crop at an integer offset (scale 1), flip, then sample the loss grid at its pixel centres (nearest)."""
    h_img, w_img = size_hw
    out = np.full(grid_hw, pad, dtype=np.float64)
    for i in range(grid_hw[0]):
        for j in range(grid_hw[1]):
            y = int(np.floor((i + 0.5) * out_hw[0] / grid_hw[0] + off_y))
            x = int(np.floor((j + 0.5) * out_hw[1] / grid_hw[1] + off_x))
            if flip:
                x = w_img - 1 - x
            if 0 <= y < h_img and 0 <= x < w_img:
                out[i, j] = src[y, x]
    return out


def random_label_batch(rng: np.random.Generator, sizes: list[tuple[int, int]]):
    """Blocky instance maps (some crowd) on padded canvases, in the collate layout."""
    hc, wc = max(s[0] for s in sizes), max(s[1] for s in sizes)
    n = len(sizes)
    ins = np.zeros((n, hc, wc), np.int32)
    for i, (h, w) in enumerate(sizes):
        blocks = rng.integers(0, 6, size=(h // 8 + 1, w // 8 + 1))
        ins[i, :h, :w] = np.kron(blocks, np.ones((8, 8), np.int32))[:h, :w]
    sem = np.where(ins > 0, ins % 3, 5).astype(np.uint8)
    for i, (h, w) in enumerate(sizes):
        sem[i, h:, :], sem[i, :, w:] = IGNORE, IGNORE
    dist = rng.integers(0, 40 * DIST_SCALE, size=ins.shape).astype(np.int32)
    crowd = np.zeros((n, 6), bool)
    crowd[:, 5] = True
    batch = {
        "image": torch.from_numpy(rng.integers(0, 256, size=(n, 3, hc, wc), dtype=np.uint8)),
        "sem": torch.from_numpy(sem),
        "ins": torch.from_numpy(ins),
        "dist": torch.from_numpy(dist),
        "size": torch.tensor(sizes, dtype=torch.long),
        "crowd": torch.from_numpy(crowd),
    }
    return batch


# -- augmentation -------------------------------------------------------------------------------------
def test_instance_centroids_match_numpy_loop():
    rng = np.random.default_rng(0)
    ins = rng.integers(0, 5, size=(2, 9, 13))
    u, v = instance_centroids(torch.from_numpy(ins))
    ru, rv = numpy_centroids(ins)
    np.testing.assert_allclose(u.numpy(), ru, atol=1e-6)
    np.testing.assert_allclose(v.numpy(), rv, atol=1e-6)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_flip_targets_match_numpy_reference(flip):
    rng = np.random.default_rng(1)
    sizes = [(70, 90), (84, 60)]
    batch = random_label_batch(rng, sizes)
    out_hw = (56, 56)
    h, w = loss_size(*out_hw)
    offsets = [(5, 17), (-7, 3)]  # second image: narrower than the output along x → padding on its left
    params = AugmentParams(
        factor=torch.ones(2, dtype=torch.float64),
        offset_x=torch.tensor([float(o[1]) for o in offsets], dtype=torch.float64),
        offset_y=torch.tensor([float(o[0]) for o in offsets], dtype=torch.float64),
        flip=torch.tensor([flip, flip]),
    )
    _, targets = augment_batch(batch, out_hw, params, (0.5, 0.5, 0.5), pad_dist=999.0)
    ins_ref, sem_ref, dist_ref = [], [], []
    for i, size in enumerate(sizes):
        args = (size, offsets[i][0], offsets[i][1], flip, out_hw, (h, w))
        ins_ref.append(numpy_crop_nearest(batch["ins"][i].numpy(), *args, pad=0))
        sem_ref.append(numpy_crop_nearest(batch["sem"][i].numpy(), *args, pad=IGNORE))
        dist_ref.append(numpy_crop_nearest(batch["dist"][i].numpy() / DIST_SCALE * (w / out_hw[1]), *args, pad=999.0))
    ins_ref = np.stack(ins_ref).astype(np.int64)
    np.testing.assert_array_equal(targets["ins"].numpy(), ins_ref)
    np.testing.assert_array_equal(targets["sem"].numpy(), np.stack(sem_ref))
    np.testing.assert_allclose(targets["dist"].numpy(), np.stack(dist_ref), rtol=1e-6)
    ru, rv = numpy_centroids(ins_ref)
    np.testing.assert_allclose(targets["u"].numpy(), ru, atol=1e-5)
    np.testing.assert_allclose(targets["v"].numpy(), rv, atol=1e-5)
    np.testing.assert_array_equal(targets["ignore"].numpy(), ins_ref == 5)
    np.testing.assert_array_equal(targets["valid"].numpy(), (ins_ref > 0) & (ins_ref != 5))


def test_resize_scales_distance_and_keeps_image_range():
    rng = np.random.default_rng(2)
    batch = random_label_batch(rng, [(28, 28)])
    batch["dist"][:] = 10 * DIST_SCALE  # 10 source px everywhere
    params = AugmentParams(torch.tensor([2.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                           torch.zeros(1, dtype=torch.float64), torch.tensor([False]))
    images, targets = augment_batch(batch, (56, 56), params, (0.5, 0.5, 0.5), pad_dist=999.0)
    # ×2 resize, then the loss grid is 32/56 of the output: d = 10 · 2 · 32/56
    np.testing.assert_allclose(targets["dist"].numpy(), 10 * 2 * 32 / 56, rtol=1e-6)
    assert images.shape == (1, 3, 56, 56) and 0.0 <= images.min() and images.max() <= 1.0


def test_draw_params_windows_stay_in_range():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[100, 200], [50, 40]] * 50)
    p = draw_params(sizes, (56, 84), (0.5, 2.0), 0.5, gen)
    scaled_h, scaled_w = sizes[:, 0] * p.factor, sizes[:, 1] * p.factor
    # a window inside the scaled image when it is larger, the image inside the window when smaller
    assert bool(((p.offset_y >= torch.minimum(scaled_h - 56, torch.zeros(1)) - 1e-9)
                 & (p.offset_y <= torch.maximum(scaled_h - 56, torch.zeros(1)) + 1e-9)).all())
    assert bool(((p.offset_x >= torch.minimum(scaled_w - 84, torch.zeros(1)) - 1e-9)
                 & (p.offset_x <= torch.maximum(scaled_w - 84, torch.zeros(1)) + 1e-9)).all())
    base = torch.maximum(56 / sizes[:, 0].double(), 84 / sizes[:, 1].double())
    assert bool(((p.factor / base >= 0.5) & (p.factor / base <= 2.0)).all())
    assert 0 < int(p.flip.sum()) < 100


# -- loader ---------------------------------------------------------------------------------------------
def test_resolve_and_count_shards(shards, tmp_path):
    urls = resolve_shards(str(shards))
    assert len(urls) == 3
    assert resolve_shards(str(shards / "shard-{0000..0001}.tar")) == urls[:2]
    assert count_samples(urls) == 12
    with pytest.raises(FileNotFoundError, match="no .tar shards|shard"):
        resolve_shards(str(tmp_path / "missing"))


def test_batches_consumed_by_worker_matches_round_robin():
    for workers in (1, 2, 3):
        for consumed in range(10):
            for w in range(workers):
                assert batches_consumed_by_worker(consumed, w, workers) == sum(1 for i in range(consumed) if i % workers == w)


def _raw_sample(key: str, image: np.ndarray, sem: np.ndarray, ins: np.ndarray, dist_half_px: np.ndarray,
                crowd: list[bool], disp: np.ndarray | None = None, image_format: str = "png") -> dict:
    """A sample as a shard stores it (genpan/prep/shards.py encoders), the image as a lossless PNG by default."""
    segments = [{"ins": k, "iscrowd": int(flag)} for k, flag in enumerate(crowd) if k > 0]
    raw = {"__key__": key, "__url__": "test.tar", image_format: cv2.imencode(f".{image_format}", image[..., ::-1])[1].tobytes(),
           "sem.png": encode_png(sem, 1), "ins.png": encode_png(ins.astype(np.uint16), 1),
           "dist.png": encode_png(dist_half_px, 1),
           "json": json.dumps({"segments": segments, "params": {"dist_scale": 2}}).encode()}
    if disp is not None:
        raw["disp.png"] = encode_png(disp, 1)
    return raw


def _parsed(raws: list[dict], depth: str = "none") -> list:
    from genpan.train.data import parse_sample

    return [parse_sample(raw, depth) for raw in raws]


def test_collate_pads_with_void():
    rng = np.random.default_rng(3)
    raws = [_raw_sample(f"k{i}", rng.integers(0, 255, (h, w, 3), dtype=np.uint8), np.zeros((h, w), np.uint8),
                        np.ones((h, w), np.int32), np.ones((h, w), np.uint8), [False, i == 1])
            for i, (h, w) in enumerate([(5, 7), (6, 4)])]
    batch = collate(_parsed(raws))
    assert batch["image"].shape == (2, 3, 6, 7)
    assert bool((batch["sem"][0, 5:] == IGNORE).all()) and bool((batch["ins"][1, :, 4:] == 0).all())
    assert batch["size"].tolist() == [[5, 7], [6, 4]]
    assert batch["crowd"].tolist() == [[False, False], [False, True]]
    # every field is a view of one buffer: a worker hands the trainer one shared-memory segment
    storages = {batch[k].untyped_storage().data_ptr() for k in ("image", "sem", "ins", "dist", "size", "crowd")}
    assert len(storages) == 1 and batch["ins"].dtype == torch.int16 and batch["dist"].dtype == torch.int16


def test_batch_decoded_in_place_matches_opencv_decode_of_each_field():
    """Each field decoded straight into the padded batch equals OpenCV's decode of the stored PNG,
    converted to the batch unit, in its top-left corner, with void around it (also over a reused slot)."""
    from genpan.prep.shards import DISP_SCALE
    from genpan.train.data import SlotPool, SlotReceiver

    rng = np.random.default_rng(7)
    sizes = [(9, 13), (12, 5), (1, 1)]
    raws = [_raw_sample(f"k{i}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 9, (h, w), dtype=np.uint8),
                        rng.integers(0, 3000, (h, w)), rng.integers(0, 256, (h, w), dtype=np.uint8),
                        [False, True, False], rng.integers(0, 65536, (h, w)).astype(np.uint16))
            for i, (h, w) in enumerate(sizes)]
    receiver = SlotReceiver()
    pool = SlotPool(receiver.id)
    stale = pool.collate(_parsed([raws[1], raws[0]], "disp")).open()  # fills the slot with other pixels
    del stale
    import gc

    gc.collect()
    message = pool.collate(_parsed(raws, "disp"))
    assert message.slot == 0  # the stale slot was reused
    for batch in (message.open(), collate(_parsed(raws, "disp"))):
        assert batch["image"].shape == (3, 3, 12, 13)
        for i, ((h, w), raw) in enumerate(zip(sizes, raws)):
            def stored(name, raw=raw):
                return cv2.imdecode(np.frombuffer(raw[name], np.uint8), cv2.IMREAD_UNCHANGED)

            expect = {"image": stored("png")[..., ::-1].transpose(2, 0, 1), "sem": stored("sem.png"),
                      "ins": stored("ins.png").astype(np.int64), "dist": stored("dist.png").astype(np.int64) * (DIST_SCALE // 2),
                      "disp": stored("disp.png").astype(np.float32) / np.float32(DISP_SCALE)}
            void = {"image": 0, "sem": IGNORE, "ins": 0, "dist": 0, "disp": 0.0}
            for name, value in expect.items():
                got = batch[name][i].numpy()
                full = np.full(got.shape, void[name], dtype=got.dtype)
                full[..., :h, :w] = value
                np.testing.assert_array_equal(got, full, err_msg=name)
            valid = np.zeros((12, 13), bool)
            valid[:h, :w] = True
            np.testing.assert_array_equal(batch["depth_valid"][i].numpy(), valid)
        assert batch["crowd"].tolist() == [[False, True, False]] * 3


def test_parse_sample_names_the_bad_field():
    from genpan.train.data import decode_sample, parse_sample

    rng = np.random.default_rng(8)
    raw = _raw_sample("k0", rng.integers(0, 255, (6, 7, 3), dtype=np.uint8), np.zeros((6, 7), np.uint8),
                      np.zeros((6, 7), np.int32), np.zeros((6, 7), np.uint8), [False])
    with pytest.raises(ValueError, match="no disp.png"):
        parse_sample(raw, "disp")
    with pytest.raises(ValueError, match="no ins.png"):
        parse_sample({k: v for k, v in raw.items() if k != "ins.png"})
    with pytest.raises(ValueError, match="ins.png is"):  # a label map of another size than the image
        decode_sample({**raw, "ins.png": encode_png(np.zeros((6, 8), np.uint16), 1)})
    with pytest.raises(ValueError, match="the image is 5×7"):
        decode_sample({**raw, "png": cv2.imencode(".png", np.zeros((5, 7, 3), np.uint8))[1].tobytes()})
    with pytest.raises(ValueError, match="cannot decode dist.png"):
        decode_sample({**raw, "dist.png": raw["dist.png"][:40]})
    with pytest.raises(ValueError, match="sem.png is 16-bit"):
        decode_sample({**raw, "sem.png": encode_png(np.zeros((6, 7), np.uint16), 1)})
    for junk in (b"{", b"[1]", b'{"segments": [{"ins": Infinity}]}', b'{"segments": [7]}', b'{"params": {"dist_scale": "x"}}'):
        with pytest.raises(ValueError, match="unreadable json"):
            parse_sample({**raw, "json": junk})
    with pytest.raises(ValueError, match="sem.png header"):  # a damaged IHDR fails its checksum
        parse_sample({**raw, "sem.png": raw["sem.png"][:20] + b"\xff" + raw["sem.png"][21:]})
    with pytest.raises(ValueError, match="cannot decode the image"):
        decode_sample({**raw, "png": b""})


def test_decode_sample_int16_maps_and_instance_limit():
    from genpan.train.data import INT16_MAX, decode_sample

    rng = np.random.default_rng(4)
    ins = rng.integers(0, 3, (6, 5)).astype(np.uint16)
    dist = np.array([0, 1, INT16_MAX, INT16_MAX + 1, 65535] * 6, np.uint16).reshape(6, 5)
    raw = {"__key__": "k1", "jpg": cv2.imencode(".jpg", rng.integers(0, 255, (6, 5, 3), dtype=np.uint8))[1].tobytes(),
           "sem.png": encode_png(np.zeros((6, 5), np.uint8), 1), "ins.png": encode_png(ins, 1),
           "dist.png": encode_png(dist, 1), "json": json.dumps({"segments": [{"ins": 2, "iscrowd": 1}]}).encode()}
    out = decode_sample(raw)
    np.testing.assert_array_equal(out["ins"], ins.astype(np.int16))
    np.testing.assert_array_equal(out["dist"], np.minimum(dist, INT16_MAX).astype(np.int16))  # saturates, never wraps
    assert out["crowd"].tolist() == [False, False, True]
    # current shards store half pixels in uint8 (params.dist_scale = 2): the batch unit stays 1/64 px
    half_px = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
    raw["dist.png"] = encode_png(half_px, 1)
    raw["json"] = json.dumps({"segments": [], "params": {"dist_scale": 2}}).encode()
    np.testing.assert_array_equal(decode_sample(raw)["dist"], half_px.astype(np.int16) * (DIST_SCALE // 2))
    raw["json"] = json.dumps({"segments": [], "params": {"dist_scale": 3}}).encode()
    with pytest.raises(ValueError, match="dist_scale"):
        decode_sample(raw)
    raw["json"] = json.dumps({"segments": [{"ins": INT16_MAX + 1}]}).encode()
    with pytest.raises(ValueError, match="instances"):
        decode_sample(raw)


def _keys(stream: BatchStream, n: int) -> list[list[str]]:
    return [next(stream)["key"] for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_deterministic_and_resumes_mid_epoch(shards, workers):
    cfg = DataConfig(shards=str(shards), micro_batch=2, size=[56, 56], num_workers=workers, shuffle_buffer=8,
                     shuffle_initial=4, depth="disp")
    straight = _keys(BatchStream(cfg, seed=5), 9)
    assert straight == _keys(BatchStream(cfg, seed=5), 9)
    assert straight != _keys(BatchStream(cfg, seed=6), 9)
    stream = BatchStream(cfg, seed=5)
    assert stream.batches_per_epoch == 6
    head = _keys(stream, 3)
    resumed = BatchStream(cfg, seed=5)
    resumed.load_state_dict(stream.state_dict())
    assert head + _keys(resumed, 6) == straight


def test_stream_batch_and_device_targets(shards):
    from genpan.train.augment import DeviceAugmenter

    cfg = DataConfig(shards=str(shards), micro_batch=3, size=[56, 42], num_workers=0, depth="disp")
    batch = next(BatchStream(cfg, rank=1, world_size=2, seed=0))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[:2] == (3, 3)
    aug = DeviceAugmenter((56, 42), (0.5, 1.5), 0.5, seed=0, pad_value=(0.5, 0.5, 0.5), pad_dist=1000.0)
    images, targets = aug(batch)
    assert images.shape == (3, 3, 56, 42)
    h, w = loss_size(56, 42)
    for key in ("sem", "ins", "dist", "u", "v", "valid", "ignore", "disp", "depth_valid"):
        assert targets[key].shape == (3, h, w), key
    thing = targets["ins"] > 0
    assert bool((targets["u"][thing].abs() <= 1).all()) and bool((targets["v"][~thing] == 0).all())
    state = aug.state_dict()
    again = DeviceAugmenter((56, 42), (0.5, 1.5), 0.5, seed=1, pad_value=(0.5, 0.5, 0.5), pad_dist=1000.0)
    again.load_state_dict(state)
    assert torch.equal(aug(batch)[0], again(batch)[0])


def test_disjoint_shard_mode_needs_enough_shards(shards):
    cfg = DataConfig(shards=str(shards), micro_batch=2, size=[56, 56], num_workers=0, resampled=False)
    keys = {k for batch in _keys(BatchStream(cfg, rank=0, world_size=2, seed=0), 4) for k in batch}
    other = {k for batch in _keys(BatchStream(cfg, rank=1, world_size=2, seed=0), 2) for k in batch}
    assert keys.isdisjoint(other)
    with pytest.raises(ValueError, match="resampled = false"):
        BatchStream(cfg, rank=0, world_size=4, seed=0)


# -- reused shared-memory slots (workers → trainer) ---------------------------------------------------
def _samples(sizes: list[tuple[int, int]], seed: int) -> list:
    rng = np.random.default_rng(seed)
    return _parsed([_raw_sample(f"k{seed}-{i}", rng.integers(0, 255, (h, w, 3), dtype=np.uint8), rng.integers(0, 9, (h, w), dtype=np.uint8),
                                rng.integers(0, 5, (h, w)), rng.integers(0, 200, (h, w), dtype=np.uint8), [False] * (i + 1) + [True])
                    for i, (h, w) in enumerate(sizes)])


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert a["key"] == b["key"] and a.keys() == b.keys()
    for name in a:
        if name != "key":
            assert torch.equal(a[name], b[name]), name


def test_slot_pool_reuses_a_slot_only_after_the_last_view_is_freed():
    import gc

    from genpan.train.data import SlotPool, SlotReceiver

    receiver = SlotReceiver()
    pool = SlotPool(receiver.id)
    big, small = _samples([(9, 12), (7, 5)], 0), _samples([(4, 3), (2, 6)], 1)
    first = pool.collate(big)
    assert first.storage is not None and first.slot == 0  # a new slot's descriptor travels with it once
    batch = first.open()
    _assert_batches_equal(batch, collate(big))
    image = batch["image"][1]  # a view outlives the dict
    del batch
    gc.collect()
    second = pool.collate(small)
    assert second.slot == 1 and second.storage is not None  # slot 0 is still referenced: a new slot, no overwrite
    assert torch.equal(image, collate(big)["image"][1])
    del image
    gc.collect()
    third = pool.collate(small)
    # slot 0 is free again and reused: its descriptor is not sent again, stale pixels of the big batch are void
    assert third.slot == 0 and third.storage is None
    third_batch = third.open()  # held: slot 0 stays busy
    _assert_batches_equal(third_batch, collate(small))
    second_batch = second.open()
    _assert_batches_equal(second_batch, collate(small))
    del second_batch
    gc.collect()
    # slot 1 is free but too small for a big batch: replaced, and the trainer told to unmap it
    fourth = pool.collate(_samples([(150, 160), (3, 3)], 2))  # > the 64 KiB of slot 1
    assert fourth.slot == 2 and fourth.retired == [1] and len(pool.slots) == 2
    fourth.open()
    assert set(receiver.mapped) == {(pool.id, 0), (pool.id, 2)}


def test_slot_batch_pin_memory_copies_out_and_frees_the_slot(monkeypatch):
    import gc

    from genpan.train.data import SlotPool, SlotReceiver

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: self.clone())  # no accelerator here
    receiver = SlotReceiver()
    pool = SlotPool(receiver.id)
    samples = _samples([(5, 6), (6, 5)], 3)
    pinned = pool.collate(samples).pin_memory()
    gc.collect()
    assert all(s.free() for s in pool.slots)  # the copy is all the trainer holds
    _assert_batches_equal(pinned, collate(samples))
    assert pool.collate(samples).slot == 0


def test_stream_batches_with_workers_stay_intact_and_slots_are_bounded(shards):
    import gc

    cfg = DataConfig(shards=str(shards), micro_batch=2, size=[56, 56], num_workers=2, shuffle_buffer=8,
                     shuffle_initial=4, epoch_size=200)
    plain = BatchStream(DataConfig(**{**cfg.__dict__, "num_workers": 0}), seed=1)
    stream = BatchStream(cfg, seed=1)
    held = next(stream)
    copy = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in held.items()}
    for _ in range(30):  # batches dropped as they come: the workers recycle a few slots
        next(stream)
        gc.collect()
    _assert_batches_equal(held, copy)  # never overwritten while the trainer holds it
    assert 2 <= len(stream.receiver.mapped) <= 2 * 5
    kept = [next(stream) for _ in range(12)]  # a consumer that keeps batches gets new slots, not a deadlock
    assert len(stream.receiver.mapped) >= 12
    # content of a worker batch = the in-process batch of the same stream position
    # (the loader's round robin over workers: batch 0 of worker 0 is the stream's first batch)
    del kept
    _assert_batches_equal(copy, next(plain))
    assert held["image"].shape[1] == 3 and held["image"].permute(0, 2, 3, 1).is_contiguous()


def test_damaged_sample_in_a_worker_gives_one_line_naming_it(tmp_path):
    """A damaged member read by a DataLoader worker ends the stream with the worker's one-line message
    (sample key and field), not the worker's traceback."""
    from genpan.prep.shards import write_tar

    rng = np.random.default_rng(9)
    samples = []
    for i in range(4):
        raw = _raw_sample(f"k{i}", rng.integers(0, 255, (8, 9, 3), dtype=np.uint8), np.zeros((8, 9), np.uint8),
                          np.zeros((8, 9), np.int32), np.zeros((8, 9), np.uint8), [False])
        if i == 2:
            raw["ins.png"] = raw["ins.png"][:30]
        samples.append((raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")}))
    write_tar(tmp_path / "s-0000.tar", samples)
    cfg = DataConfig(shards=str(tmp_path), micro_batch=4, size=[14, 14], num_workers=2, shuffle_buffer=1,
                     shuffle_initial=1, epoch_size=8)
    with pytest.raises(ValueError) as info:  # the first batch of either worker holds all four samples
        next(BatchStream(cfg, seed=0))
    message = str(info.value)
    assert "\n" not in message and "sample k2" in message and "ins.png" in message, message
