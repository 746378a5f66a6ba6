"""Streaming loader and on-device augmentation (genpan/train/data.py, genpan/train/augment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from genpan.labels import DIST_SCALE, IGNORE
from genpan.planes import decode_plane, encode_plane
from genpan.prep.readers import make_reader
from genpan.prep.shards import PREP_VERSION, ShardParams, encode_sample, write_tar
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


@pytest.mark.parametrize("form", ["folder", "brace", "file-url", "file-url-folder", "pipe"])
def test_every_shard_form_gives_the_same_stream(shards, form):
    """A folder, a brace pattern, file: URLs and a `pipe:cat` URL name the same shards, and webdataset's
    openers read the same batches from each (with workers, resampled)."""
    tars = sorted(shards.glob("*.tar"))
    spec = {"folder": str(shards), "brace": str(shards / "shard-{0000..0002}.tar"),
            "file-url": "file:" + str(shards / "shard-{0000..0002}.tar"), "file-url-folder": shards.as_uri(),
            "pipe": "pipe:cat " + str(shards / "shard-{0000..0002}.tar")}[form]
    urls = resolve_shards(spec)
    assert len(urls) == 3 and (form != "pipe" or urls[0] == f"pipe:cat {tars[0]}")
    cfg = DataConfig(shards=spec, micro_batch=2, size=[56, 56], num_workers=2, shuffle_buffer=8, shuffle_initial=4, epoch_size=12)
    reference = DataConfig(**{**cfg.__dict__, "shards": str(shards)})
    assert _keys(BatchStream(cfg, seed=3), 7) == _keys(BatchStream(reference, seed=3), 7)


def test_url_shards_need_an_epoch_size_and_bad_urls_fail_in_one_line(shards, tmp_path):
    with pytest.raises(ValueError, match="set data.epoch_size"):
        count_samples(resolve_shards("pipe:cat " + str(shards / "shard-0000.tar")))
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_shards("file:" + str(tmp_path / "nope-{0..1}.tar"))
    cfg = DataConfig(shards="pipe:cat " + str(tmp_path / "missing.tar"), micro_batch=2, num_workers=0, epoch_size=4)
    with pytest.raises(ValueError) as info:
        BatchStream(cfg)
    assert "\n" not in str(info.value) and "missing.tar" in str(info.value)


def test_damaged_tars_fail_in_one_line_naming_the_shard(shards, tmp_path):
    good = (shards / "shard-0000.tar").read_bytes()
    cases = {"cut": good[: len(good) // 2], "flipped": good[:130] + bytes([good[130] ^ 1]) + good[131:], "text": b"not a tar" * 200}
    for name, data in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "s-0000.tar").write_bytes(data)
        cfg = DataConfig(shards=str(folder), micro_batch=1, size=[56, 56], num_workers=0, epoch_size=50, shuffle_buffer=1, shuffle_initial=1)
        with pytest.raises(ValueError) as info:
            stream = BatchStream(cfg)
            for _ in range(50):
                next(stream)
        message = str(info.value)
        assert "\n" not in message and "s-0000.tar" in message, (name, message)


def test_batches_consumed_by_worker_matches_round_robin():
    for workers in (1, 2, 3):
        for consumed in range(10):
            for w in range(workers):
                assert batches_consumed_by_worker(consumed, w, workers) == sum(1 for i in range(consumed) if i % workers == w)


def _raw_sample(key: str, image: np.ndarray, sem: np.ndarray, ins: np.ndarray, dist_half_px: np.ndarray,
                crowd: list[bool], disp: np.ndarray | None = None, image_format: str = "png") -> dict:
    """A sample as a shard stores it (genpan/planes.py planes, json as prep writes it), the image as a lossless PNG by default."""
    segments = [{"ins": k, "iscrowd": int(flag)} for k, flag in enumerate(crowd) if k > 0]
    raw = {"__key__": key, "__url__": "test.tar", image_format: cv2.imencode(f".{image_format}", image[..., ::-1])[1].tobytes()}
    planes = {}
    arrays = {"sem.zst": sem, "ins.zst": ins.astype(np.uint16), "dist.zst": dist_half_px, "disp.zst": disp}
    for name, array in arrays.items():
        if array is not None:
            raw[name], planes[name] = encode_plane(array)
    meta = {"height": image.shape[0], "width": image.shape[1], "planes": planes, "segments": segments,
            "params": {"dist_scale": 2}, "prep_version": PREP_VERSION}
    raw["json"] = json.dumps(meta).encode()
    return raw


def _with_json(raw: dict, **changes) -> dict:
    return {**raw, "json": json.dumps({**json.loads(raw["json"]), **changes}).encode()}


def _with_plane(raw: dict, name: str, array: np.ndarray) -> dict:
    data, description = encode_plane(array)
    meta = json.loads(raw["json"])
    return {**_with_json(raw, planes={**meta["planes"], name: description}), name: data}


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


def test_batch_decoded_in_place_matches_the_stored_fields():
    """Each field decoded straight into the padded batch equals an independent decode of what the shard
    stores (OpenCV for the image, zstd + the json's dtype/shape for the planes), converted to the batch
    unit, in its top-left corner, with void around it."""
    import zstandard

    from genpan.prep.shards import DISP_SCALE

    rng = np.random.default_rng(7)
    sizes = [(9, 13), (12, 5), (1, 1)]
    raws = [_raw_sample(f"k{i}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 9, (h, w), dtype=np.uint8),
                        rng.integers(0, 3000, (h, w)), rng.integers(0, 256, (h, w), dtype=np.uint8),
                        [False, True, False], rng.integers(0, 65536, (h, w)).astype(np.uint16))
            for i, (h, w) in enumerate(sizes)]
    batch = collate(_parsed(raws, "disp"))
    assert batch["image"].shape == (3, 3, 12, 13)
    for i, ((h, w), raw) in enumerate(zip(sizes, raws)):
        planes = json.loads(raw["json"])["planes"]

        def stored(name, raw=raw, planes=planes):
            data = zstandard.ZstdDecompressor().decompress(raw[name])
            return np.frombuffer(data, np.dtype(planes[name]["dtype"])).reshape(planes[name]["shape"])

        expect = {"image": cv2.imdecode(np.frombuffer(raw["png"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1].transpose(2, 0, 1),
                  "sem": stored("sem.zst"), "ins": stored("ins.zst").astype(np.int64),
                  "dist": stored("dist.zst").astype(np.int64) * (DIST_SCALE // 2),
                  "disp": stored("disp.zst").astype(np.float32) / np.float32(DISP_SCALE)}
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


def test_planes_round_trip_every_dtype_and_refuse_damage():
    rng = np.random.default_rng(2)
    for array in (rng.integers(0, 256, (7, 9), dtype=np.uint8), rng.integers(0, 65536, (3, 300), dtype=np.uint16),
                  np.zeros((0, 4), np.uint8)):
        data, description = encode_plane(array)
        assert description == {"dtype": array.dtype.newbyteorder("<").str, "shape": list(array.shape)}
        np.testing.assert_array_equal(decode_plane(data, description), array)
        assert encode_plane(array)[0] == data  # deterministic
    from genpan.planes import PlaneError

    data, description = encode_plane(rng.integers(0, 9, (40, 40), dtype=np.uint8))
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    for bad, desc in [(data[: len(data) // 2], description), (bytes(flipped), description), (b"", description),
                      (data, {"dtype": "<u2", "shape": [40, 40]}), (data, {"dtype": "<f4", "shape": [20, 20]}),
                      (data, {"shape": [40, 40]}), (data, None)]:
        with pytest.raises(PlaneError):
            decode_plane(bad, desc)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_plane(np.zeros((2, 2), np.int32))


def test_parse_sample_names_the_bad_field():
    from genpan.train.data import decode_sample, parse_sample

    rng = np.random.default_rng(8)
    raw = _raw_sample("k0", rng.integers(0, 255, (6, 7, 3), dtype=np.uint8), np.zeros((6, 7), np.uint8),
                      np.zeros((6, 7), np.int32), np.zeros((6, 7), np.uint8), [False])
    with pytest.raises(ValueError, match="no disp.zst for it"):
        parse_sample(raw, "disp")
    with pytest.raises(ValueError, match="no ins.zst for it"):
        parse_sample({k: v for k, v in raw.items() if k != "ins.zst"})
    with pytest.raises(ValueError, match=r"ins.zst is \(6, 8\)"):  # a label map of another size than the image
        decode_sample(_with_plane(raw, "ins.zst", np.zeros((6, 8), np.uint16)))
    with pytest.raises(ValueError, match="the image is 5×7"):
        decode_sample({**raw, "png": cv2.imencode(".png", np.zeros((5, 7, 3), np.uint8))[1].tobytes()})
    with pytest.raises(ValueError, match="sample k0: cannot decode dist.zst"):
        decode_sample({**raw, "dist.zst": raw["dist.zst"][:10]})
    with pytest.raises(ValueError, match="sem.zst is uint16"):
        decode_sample(_with_plane(raw, "sem.zst", np.zeros((6, 7), np.uint16)))
    for junk in (b"{", b"\xff\xfe"):
        with pytest.raises(ValueError, match="unreadable json"):
            parse_sample({**raw, "json": junk})
    meta = json.loads(raw["json"])
    for change in ({"segments": [{"ins": "x"}]}, {"segments": [7]}, {"params": {"dist_scale": "x"}}, {"planes": [1]},
                   {"height": None}, {"params": {}}):
        with pytest.raises(ValueError, match="sample k0: json breaks the shard contract"):
            parse_sample(_with_json(raw, **change))
    with pytest.raises(ValueError, match="json claims 100000×7 pixels"):  # would size a batch of terabytes
        parse_sample(_with_json(raw, height=100_000))
    with pytest.raises(ValueError, match="cannot decode the image"):
        decode_sample({**raw, "png": b""})
    assert meta["prep_version"] == PREP_VERSION


def test_older_shards_ask_for_a_prep_rerun_in_one_line(tmp_path):
    """Shards of prep version 2 (PNG label maps) fail at BatchStream start, and sample by sample, with one line."""
    from genpan.train.data import parse_sample

    rng = np.random.default_rng(1)
    raw = _raw_sample("k0", rng.integers(0, 255, (6, 7, 3), dtype=np.uint8), np.zeros((6, 7), np.uint8),
                      np.zeros((6, 7), np.int32), np.zeros((6, 7), np.uint8), [False])
    old = {"__key__": "k0", "png": raw["png"], "json": json.dumps({"prep_version": "2", "segments": []}).encode()}
    old.update({name: cv2.imencode(".png", np.zeros((6, 7), np.uint8))[1].tobytes() for name in ("sem.png", "ins.png", "dist.png")})
    with pytest.raises(ValueError, match="prep version 2 .*re-run prep/build_shards.py"):
        parse_sample(old)
    write_tar(tmp_path / "old-0000.tar", [("k0", {k: v for k, v in old.items() if not k.startswith("__")})])
    cfg = DataConfig(shards=str(tmp_path), micro_batch=1, size=[14, 14], num_workers=0, epoch_size=1)
    with pytest.raises(ValueError) as info:
        BatchStream(cfg)
    assert "\n" not in str(info.value) and "old-0000.tar" in str(info.value) and "re-run prep/build_shards.py" in str(info.value)


def test_decode_sample_int16_maps_and_instance_limit():
    from genpan.train.data import decode_sample
    from genpan.train.samples import INT16_MAX

    rng = np.random.default_rng(4)
    ins = rng.integers(0, 3, (6, 5)).astype(np.uint16)
    dist = np.array([0, 1, INT16_MAX, INT16_MAX + 1, 65535] * 6, np.uint16).reshape(6, 5)
    raw = _raw_sample("k1", rng.integers(0, 255, (6, 5, 3), dtype=np.uint8), np.zeros((6, 5), np.uint8), ins,
                      np.zeros((6, 5), np.uint8), [False, False, True], image_format="jpg")
    raw = _with_json(_with_plane(raw, "dist.zst", dist), params={"dist_scale": 64})
    out = decode_sample(raw)
    np.testing.assert_array_equal(out["ins"], ins.astype(np.int16))
    np.testing.assert_array_equal(out["dist"], np.minimum(dist, INT16_MAX).astype(np.int16))  # saturates, never wraps
    assert out["crowd"].tolist() == [False, False, True]
    # shards store half pixels in uint8 by default (params.dist_scale = 2): the batch unit stays 1/64 px
    half_px = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
    raw = _with_json(_with_plane(raw, "dist.zst", half_px), params={"dist_scale": 2})
    np.testing.assert_array_equal(decode_sample(raw)["dist"], half_px.astype(np.int16) * (DIST_SCALE // 2))
    with pytest.raises(ValueError, match="dist_scale"):
        decode_sample(_with_json(raw, params={"dist_scale": 3}))
    with pytest.raises(ValueError, match="instances"):
        decode_sample(_with_json(raw, segments=[{"ins": INT16_MAX + 1}]))


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
            raw["ins.zst"] = raw["ins.zst"][:12]
        samples.append((raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")}))
    write_tar(tmp_path / "s-0000.tar", samples)
    cfg = DataConfig(shards=str(tmp_path), micro_batch=4, size=[14, 14], num_workers=2, shuffle_buffer=1,
                     shuffle_initial=1, epoch_size=8)
    with pytest.raises(ValueError) as info:  # the first batch of either worker holds all four samples
        next(BatchStream(cfg, seed=0))
    message = str(info.value)
    assert "\n" not in message and "sample k2" in message and "ins.zst" in message, message


def test_buffer_ring_reuses_a_buffer_only_once_released():
    """Worker side: a buffer is handed out again only after its flag went back to 0; with every buffer
    taken the ring gives an untagged fresh one. Trainer side: the flag goes to 0 when the batch's last
    view dies, not before."""
    import gc

    from genpan.train.batch_buffers import SLOT_KEY, BufferRing, new_flags, release_when_dropped

    flags = new_flags(2, 2)
    ring = BufferRing(flags, 1)
    first = ring.allocate(1000)
    assert ring.tag({})[SLOT_KEY] == (1, 0)
    second = ring.allocate(1000)
    assert ring.tag({})[SLOT_KEY] == (1, 1) and flags[1].tolist() == [1, 1]
    fresh = ring.allocate(1000)
    assert SLOT_KEY not in ring.tag({}) and fresh.untyped_storage().data_ptr() not in (
        first.untyped_storage().data_ptr(), second.untyped_storage().data_ptr())
    flags[1, 0] = 0
    again = ring.allocate(900)  # fits the released buffer: the same memory
    assert again.data_ptr() == first.data_ptr() and ring.tag({})[SLOT_KEY] == (1, 0)
    flags[1, 1] = 0
    bigger = ring.allocate(1 << 20)  # the free buffer is too small: replaced
    assert bigger.numel() == 1 << 20 and ring.tag({})[SLOT_KEY] == (1, 1)

    storage = torch.zeros(64, dtype=torch.uint8)
    batch = release_when_dropped({"a": storage[:8], "b": storage[8:].view(torch.int16), SLOT_KEY: (0, 1)}, flags)
    flags[0, 1] = 1
    del storage
    assert SLOT_KEY not in batch
    a = batch.pop("a")
    gc.collect()
    assert flags[0, 1] == 1  # `b` is still alive
    del batch
    gc.collect()
    assert flags[0, 1] == 1  # `a` still holds the storage
    del a
    gc.collect()
    assert flags[0, 1] == 0


def test_held_batches_stay_intact_while_the_workers_reuse_buffers(shards):
    """Batches kept by the trainer (more of them than the workers have buffers) and batches dropped at
    once (their buffers go round) all hold exactly their samples' decoded fields."""
    from genpan.train.data import decode_sample, read_shards
    from genpan.train.samples import wanted_fields

    expected = {raw["__key__"]: decode_sample(raw)
                for raw in read_shards(({"url": u} for u in resolve_shards(str(shards))), wanted_fields("none"))}
    cfg = DataConfig(shards=str(shards), micro_batch=2, size=[56, 56], num_workers=2, shuffle_buffer=8, shuffle_initial=4,
                     epoch_size=12)
    stream = BatchStream(cfg, seed=1)
    held = [next(stream) for _ in range(12)]
    assert set(held[0]) == {"key", "image", "sem", "ins", "dist", "size", "crowd"}  # the contract's fields, nothing else
    passing = []
    for _ in range(24):
        batch = next(stream)
        passing.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        del batch
    for batch in held + passing:
        for i, key in enumerate(batch["key"]):
            h, w = batch["size"][i].tolist()
            want = expected[key]
            np.testing.assert_array_equal(batch["image"][i, :, :h, :w].numpy(), want["image"].transpose(2, 0, 1))
            for name in ("sem", "ins", "dist"):
                np.testing.assert_array_equal(batch[name][i, :h, :w].numpy(), want[name], err_msg=f"{key} {name}")
    stream.close()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs Linux /dev/shm")
def test_a_killed_trainer_leaves_no_shared_memory_behind(shards, tmp_path):
    """Workers hand batches over by shared-memory file name: the segments outlive no process. SIGKILL the
    trainer's process while its workers hold full buffers; the workers see it end (their trainer watch: a
    forkserver worker's parent is the fork server, not the trainer) and torch_shm_manager unlinks every
    segment they made."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import os, signal\n"
        "from genpan.train.data import BatchStream, DataConfig\n"
        f"cfg = DataConfig(shards={str(shards)!r}, micro_batch=2, size=[56, 56], num_workers=2, shuffle_buffer=8,"
        " shuffle_initial=4, epoch_size=12)\n"
        "stream = BatchStream(cfg, seed=0)\n"
        "held = [next(stream) for _ in range(4)]\n"
        "print(' '.join(str(w.pid) for w in stream._iterator._workers), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:  # files, not pipes: the workers outlive the process
        proc = subprocess.run([sys.executable, "-c", script], stdout=stdout, stderr=stderr, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGKILL, err.read_text()[-1500:]
    pids = out.read_text().split()
    assert len(pids) == 2

    def segments() -> list[str]:
        return [p.name for p in Path("/dev/shm").iterdir() if any(p.name.startswith(f"torch_{pid}_") for pid in pids)]

    deadline = time.monotonic() + 30  # the workers' exit and the manager's unlinking are asynchronous
    while segments() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert segments() == []
