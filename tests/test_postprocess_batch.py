"""Batched post-processing: identical to the per-image reference (tests/postprocess_reference.py) on
ideal, noisy and model outputs; a batch equals its images one by one; the soft-vote decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from postprocess_reference import postprocess as reference_postprocess
from test_postprocess import (
    CAT_TO_TRAIN,
    EXACT,
    THING_CATS,
    THING_TRAIN,
    TRAIN_TO_CAT,
    _assert_same_partition,
    _expected_after_quantisation,
    _match,
    _random_scene,
    _scene_disconnected_stuff_and_crowd,
    _scene_touching_split_tiny,
)

from genpan.eval.postprocess import (
    PostprocessConfig,
    _gather_shifted,
    ideal_outputs,
    postprocess,
    postprocess_batch,
    prob_bounds,
    rank,
    top_class,
    vote_peaks,
)

CONFIGS = {
    "exact": EXACT,
    "default": PostprocessConfig(),
    "no_merge": PostprocessConfig(merge_adjacent=False, mask_radius_cells=0, min_thing_area_frac=0.0, min_stuff_area_frac=0.0),
    "zero_vector": PostprocessConfig(thing_mode="zero_vector", void_prob_threshold=0.3),
    "demo": PostprocessConfig(min_stuff_area_frac=0.003, min_thing_area_frac=0.001, mask_radius_cells=2),
}


def _assert_identical(sem, inst, cfg, train_to_cat=TRAIN_TO_CAT, thing_train=THING_TRAIN) -> None:
    want, want_segs = reference_postprocess(sem, inst, train_to_cat, thing_train, cfg)
    got, got_segs = postprocess(sem, inst, train_to_cat, thing_train, cfg)
    assert got.dtype == np.int32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert got_segs == want_segs


def _scenes() -> list[tuple[np.ndarray, list[dict]]]:
    rng = np.random.default_rng(21)
    return [_scene_touching_split_tiny(), _scene_disconnected_stuff_and_crowd(), *(_random_scene(rng) for _ in range(5))]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_equals_reference_on_ideal_and_noisy_outputs(name: str) -> None:
    cfg = CONFIGS[name]
    rng = np.random.default_rng(3)
    for pan, segs in _scenes():
        sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
        _assert_identical(sem, inst, cfg)
        for sigma in (0.1, 0.3, 0.6):  # noise on the codes and on the logits: stray decodes, flipped classes
            noisy_inst = inst + rng.normal(0, sigma, inst.shape).astype(np.float32)
            noisy_sem = sem + rng.normal(0, 8 * sigma, sem.shape).astype(np.float32)
            _assert_identical(noisy_sem, noisy_inst, cfg)


def _random_boxes_scene(rng: np.random.Generator, h: int, w: int, boxes: int, box_h: tuple[int, int],
                        box_w: tuple[int, int]) -> tuple[np.ndarray, list[dict]]:
    """A stuff background (category 100) under `boxes` random rectangles of random thing categories (< 80)."""
    pan = np.full((h, w), 1, np.int32)
    segs = [{"id": 1, "category_id": 100, "iscrowd": 0}]
    for k in range(boxes):
        y, x = rng.integers(0, h - 30), rng.integers(0, w - 40)
        pan[y : y + rng.integers(*box_h), x : x + rng.integers(*box_w)] = 10 + k
        segs.append({"id": 10 + k, "category_id": int(rng.integers(80)), "iscrowd": 0})
    return pan, [s for s in segs if (pan == s["id"]).any()]


def test_equals_reference_at_coco_size_with_many_blocks() -> None:
    """133 classes (80 things) at 240 × 320: dozens of CPU blocks, ragged thing masks from logit noise."""
    rng = np.random.default_rng(8)
    h, w, C = 240, 320, 133
    pan, segs = _random_boxes_scene(rng, h, w, 25, (4, 60), (4, 80))
    cats = list(range(C))
    sem, inst = ideal_outputs(pan, segs, {c: c for c in cats}, set(range(80)), C)
    for sigma in (0.0, 0.2, 0.5):
        s = sem + rng.normal(0, 25 * sigma, sem.shape).astype(np.float32)
        e = inst + rng.normal(0, sigma, inst.shape).astype(np.float32)
        for cfg in (PostprocessConfig(), CONFIGS["zero_vector"]):
            _assert_identical(s, e, cfg, cats, set(range(80)))


def test_equals_reference_on_model_outputs() -> None:
    """Raw outputs of a small randomly initialised model: far from any ideal, many weak groups."""
    from genpan.train.model import build_model, tiny_cpu_config

    torch.manual_seed(0)
    cfg = tiny_cpu_config(num_classes=4, inst_channels=16, embed_dim=32, depth=1, num_heads=2, decoder_width=16)
    model = build_model(cfg).eval()
    img = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        out = model(img)
    for i in range(2):
        for scale in (1.0, 30.0):  # as is, and sharpened toward confident logits and unit-size codes
            sem, inst = scale * out["sem"][i], out["inst"][i] * (3.0 if scale > 1 else 1.0)
            for name in ("default", "exact", "zero_vector"):
                _assert_identical(sem, inst, CONFIGS[name])


@pytest.mark.parametrize("decoder", ["group", "soft_vote"])
def test_batch_equals_images_one_by_one(decoder: str) -> None:
    rng = np.random.default_rng(5)
    sems, insts = [], []
    for _ in range(3):
        pan, segs = _random_scene(rng)
        sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
        sems.append(sem + rng.normal(0, 2, sem.shape).astype(np.float32))
        insts.append(inst + rng.normal(0, 0.25, inst.shape).astype(np.float32))
    cfg = PostprocessConfig(decoder=decoder, void_prob_threshold=0.4)
    batch = postprocess_batch(np.stack(sems), torch.from_numpy(np.stack(insts)), TRAIN_TO_CAT, THING_TRAIN, cfg)
    assert len(batch) == 3
    for (pan, segs), sem, inst in zip(batch, sems, insts):
        one, one_segs = postprocess(sem, inst, TRAIN_TO_CAT, THING_TRAIN, cfg)
        np.testing.assert_array_equal(pan, one)
        assert segs == one_segs
    assert postprocess_batch(np.zeros((0, 4, 8, 8)), np.zeros((0, 16, 8, 8)), TRAIN_TO_CAT, THING_TRAIN) == []
    with pytest.raises(ValueError, match="share B"):
        postprocess_batch(np.zeros((2, 4, 8, 8)), np.zeros((1, 16, 8, 8)), TRAIN_TO_CAT, THING_TRAIN)


def test_device_path_run_on_the_cpu_matches_the_reference(monkeypatch) -> None:
    """The plain-torch path a GPU takes (max, boolean gathers), forced on the CPU: the same id maps on
    ideal and noisy outputs (its thing probability sums in another order, so not bit for bit)."""
    import genpan.eval.postprocess as pp

    monkeypatch.setattr(pp, "cpu_fast_path", lambda x: False)
    rng = np.random.default_rng(12)
    for pan, segs in _scenes()[:4]:
        sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
        for sigma in (0.0, 0.3):
            e = inst + rng.normal(0, sigma, inst.shape).astype(np.float32)
            for name in ("exact", "default", "zero_vector"):
                _assert_identical(sem, e, CONFIGS[name])


# --------------------------------------------------------------------------------- CPU primitives


def test_top_class_matches_first_max_for_uint8_and_uint16_keys() -> None:
    gen = torch.Generator().manual_seed(1)
    for C in (3, 133, 300):  # uint8 keys up to 255 classes, uint16 beyond
        logits = torch.randint(0, 3, (C, 5000), generator=gen).float()  # many exact ties
        top, label = top_class(logits, block=777)
        want = logits.numpy().argmax(axis=0)  # numpy: first maximal index, computed independently
        np.testing.assert_array_equal(label.numpy(), want)
        np.testing.assert_array_equal(top.numpy(), logits.numpy().max(axis=0))


def test_gather_shifted_equals_boolean_indexing() -> None:
    rng = np.random.default_rng(2)
    b = rng.normal(size=(7, 300)).astype(np.float32)
    top = b.max(axis=0)
    runs = np.zeros(300, bool)
    runs[10:50], runs[120:121], runs[200:300] = True, True, True
    for mask in (runs, rng.random(300) < 0.5, np.zeros(300, bool), np.ones(300, bool)):  # runs, ragged, none, all
        out = np.full((7, 300), np.nan, np.float32)
        k = _gather_shifted(b, top, mask, out)
        assert k == mask.sum()
        np.testing.assert_array_equal(out[:, :k], b[:, mask] - top[mask])


def test_prob_bounds_hold_the_exact_thing_probability() -> None:
    rng = np.random.default_rng(6)
    for C, n_thing in ((133, 80), (4, 2), (5, 4)):
        logits = (rng.normal(size=(C, 4000)) * rng.choice([0.1, 3.0, 30.0], size=(1, 4000))).astype(np.float64)
        shifted = np.exp(logits - logits.max(axis=0))
        p = shifted[:n_thing].sum(axis=0) / shifted.sum(axis=0)
        lo, hi = prob_bounds(logits[:n_thing].max(axis=0), logits[n_thing:].max(axis=0), n_thing, C - n_thing)
        assert (lo <= p * (1 + 1e-12)).all() and (p <= hi * (1 + 1e-12)).all()
        assert ((hi - lo) < 1e-6).any() and ((hi - lo) > 0.1).any()  # tight on confident pixels, loose elsewhere


def test_rank_from_bounds_equals_rank_of_any_score_inside_or_gives_up() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        score = rng.choice([0.05, 0.2, 0.5, 0.9], n) + rng.normal(0, 0.01, n)  # near-ties, the threshold 0.1 on both sides
        eligible = rng.random(n) < 0.8
        width = rng.choice([0.0, 1e-4, 0.02])
        lo, hi = score - rng.random(n) * width, score + rng.random(n) * width
        for threshold, top_k in ((None, 3), (0.1, 5), (0.1, 1)):
            want = rank(score, score, eligible, top_k, threshold)
            # the obvious definition: best first, ties to the lower index, eligible and over the threshold
            obvious = [i for i in sorted(range(n), key=lambda i: (-score[i], i))
                       if eligible[i] and (threshold is None or score[i] >= threshold)][:top_k]
            assert want.tolist() == obvious
            got = rank(lo, hi, eligible, top_k, threshold)
            if got is not None:
                np.testing.assert_array_equal(got, want)
            inside = lo + rng.random(n) * (hi - lo)
            if got is not None:
                np.testing.assert_array_equal(rank(inside, inside, eligible, top_k, threshold), want)
    tie = np.array([0.5, 0.5])
    assert rank(tie, tie + 1e-9, np.ones(2, bool), 2) is None  # cannot tell the order
    assert rank(np.array([0.09]), np.array([0.11]), np.ones(1, bool), 2, 0.1) is None  # kept or dropped?
    assert rank(np.array([np.nan]), np.array([1.0]), np.ones(1, bool), 2) is None


def _confident_coco_scene(seed: int, h: int = 120, w: int = 160, C: int = 133) -> tuple[np.ndarray, np.ndarray]:
    """Ideal outputs of a random 133-class scene with logit noise σ = 1 (well below the logit 20) and code noise 0.2."""
    rng = np.random.default_rng(seed)
    pan, segs = _random_boxes_scene(rng, h, w, 12, (8, 40), (8, 50))
    sem, inst = ideal_outputs(pan, segs, {c: c for c in range(C)}, set(range(80)), C)
    return sem + rng.normal(0, 1.0, sem.shape).astype(np.float32), inst + rng.normal(0, 0.2, inst.shape).astype(np.float32)


@pytest.mark.parametrize("decoder", ["group", "soft_vote"])
def test_probability_bounds_and_the_exact_fallback_both_match_the_reference(decoder: str, monkeypatch) -> None:
    """C = 133 with confident logits: the bounds settle most rankings (an image whose scores tie to ~1e-6
    is recomputed exactly); a slack so wide that they never do forces the exact path; all equal the reference."""
    import genpan.eval.postprocess as pp

    cats, cfg, seeds = list(range(133)), PostprocessConfig(decoder=decoder), range(4)
    calls = []
    real = pp.ExactThingProb.of_image
    monkeypatch.setattr(pp.ExactThingProb, "of_image", lambda self, *a: calls.append(1) or real(self, *a))
    for seed in seeds:
        _assert_identical(*_confident_coco_scene(seed), cfg, cats, set(range(80)))
    assert len(calls) < len(seeds) / 2  # mostly decided from the bounds
    calls.clear()
    monkeypatch.setattr(pp, "SCORE_SLACK", 0.5)
    for seed in seeds:
        _assert_identical(*_confident_coco_scene(seed), cfg, cats, set(range(80)))
    assert len(calls) == len(seeds)  # every ranking left open: exact probabilities
    # one batch: each image's exact fallback reads its own slice of the batch's thing pixels
    scenes = [_confident_coco_scene(seed) for seed in seeds]
    batch = postprocess_batch(np.stack([s for s, _ in scenes]), np.stack([e for _, e in scenes]), cats, set(range(80)), cfg)
    for (sem, inst), (got, got_segs) in zip(scenes, batch):
        want, want_segs = reference_postprocess(sem, inst, cats, set(range(80)), cfg)
        np.testing.assert_array_equal(got, want)
        assert got_segs == want_segs
    assert len(calls) == 2 * len(seeds)


# ------------------------------------------------------------------------------------- soft vote


def test_vote_peaks_match_a_loop() -> None:
    rng = np.random.default_rng(4)
    votes = rng.integers(0, 4, (2, 9, 11)).astype(np.float64)  # integer votes: plateaus and ties
    for r, min_mass in ((1, 0.0), (2, 0.0), (1, 6.0)):
        got = vote_peaks(torch.from_numpy(votes), r, min_mass).numpy()
        for b in range(2):
            for y in range(9):
                for x in range(11):
                    v = votes[b, y, x]
                    ok, mass = v > 0, 0.0
                    for yy in range(max(0, y - r), min(9, y + r + 1)):
                        for xx in range(max(0, x - r), min(11, x + r + 1)):
                            mass += votes[b, yy, xx]
                            if (yy, xx) < (y, x):  # row-major earlier cells must be strictly lower
                                ok &= v > votes[b, yy, xx]
                            elif (yy, xx) > (y, x):
                                ok &= v >= votes[b, yy, xx]
                    assert got[b, y, x] == (ok and mass >= min_mass), (r, b, y, x)


SOFT = PostprocessConfig(decoder="soft_vote", min_thing_area_frac=0.0, min_stuff_area_frac=0.0, void_prob_threshold=0.5, vote_min_frac=0.0)


@pytest.mark.parametrize("scene", [_scene_touching_split_tiny, _scene_disconnected_stuff_and_crowd])
def test_soft_vote_recovers_ideal_outputs_exactly(scene) -> None:
    pan, segs = scene()
    sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
    pred, pred_segs = postprocess(sem, inst, TRAIN_TO_CAT, THING_TRAIN, SOFT)
    _assert_same_partition(pan, segs, pred, pred_segs)
    for s in pred_segs:
        assert s["area"] == int((pred == s["id"]).sum())
    # no void threshold: GT void has flat logits, so its argmax may be a thing class with a zero code;
    # such pixels vote nothing and join no centre, so they cannot dilute (and drop) an instance
    cfg = PostprocessConfig(decoder="soft_vote", min_thing_area_frac=0.0, min_stuff_area_frac=0.0)
    pred, pred_segs = postprocess(sem, inst, TRAIN_TO_CAT, THING_TRAIN, cfg)
    assert all(v == 1.0 for v in _match(pan, segs, pred, pred_segs).values())


def test_soft_vote_recovers_random_scenes_whose_centroid_cells_are_apart() -> None:
    """Ideal codes put every pixel of an instance on its centroid cell: each such cell is a peak, and
    every pixel is nearest its own centre. Scenes the grid would merge are left to the group tests."""
    rng = np.random.default_rng(9)
    checked = 0
    for _ in range(12):
        pan, segs = _random_scene(rng, n_inst=8)
        exp, exp_segs = _expected_after_quantisation(pan, segs, 80, True)
        if len(exp_segs) != len(segs):
            continue
        sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
        pred, pred_segs = postprocess(sem, inst, TRAIN_TO_CAT, THING_TRAIN, SOFT)
        _assert_same_partition(pan, segs, pred, pred_segs)
        checked += 1
    assert checked >= 4


def test_soft_vote_degrades_with_noise_like_grouping() -> None:
    levels = [0.0, 0.3, 0.6, 1.0, 1.5]
    recall: dict[str, list[float]] = {}
    for decoder in ("group", "soft_vote"):
        cfg = PostprocessConfig(decoder=decoder, min_thing_area_frac=0.0, min_stuff_area_frac=0.0)
        for sigma in levels:
            hits = []
            for seed in range(4):
                pan, segs = _random_scene(np.random.default_rng(100 + seed), n_inst=10)
                sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
                inst = inst + np.random.default_rng(seed).normal(0.0, sigma, inst.shape).astype(np.float32)
                pred, pred_segs = postprocess(sem, inst, TRAIN_TO_CAT, THING_TRAIN, cfg)
                things = {s["id"] for s in segs if s["category_id"] in THING_CATS}
                hits += [v > 0 for k, v in _match(pan, segs, pred, pred_segs).items() if k in things]
            recall.setdefault(decoder, []).append(float(np.mean(hits)))
    soft = recall["soft_vote"]
    assert soft[0] == 1.0 and soft[-1] < soft[0], recall
    assert all(a >= b for a, b in zip(soft, soft[1:])), recall
    assert all(s >= g - 0.15 for s, g in zip(soft, recall["group"])), recall  # at least about as robust as grouping


def test_decoder_is_settable_from_toml_and_the_sweep_grid(tmp_path) -> None:
    from genpan.config import load_config
    from genpan.eval.sweep import grid_configs, parse_grid

    path = tmp_path / "pp.toml"
    path.write_text('decoder = "soft_vote"\nvote_radius_cells = 2\n')
    cfg = load_config(PostprocessConfig, path)
    assert cfg.decoder == "soft_vote" and cfg.vote_radius_cells == 2
    configs = grid_configs(PostprocessConfig(), parse_grid(["decoder=group,soft_vote"]))
    assert [c.decoder for _, c in configs] == ["group", "soft_vote"]
    with pytest.raises(ValueError):
        PostprocessConfig(decoder="hough")
    with pytest.raises(ValueError):
        PostprocessConfig(vote_radius_cells=-1)
