"""Target functions against slow, obvious computations written from their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from genpan.labels import DIST_SCALE, IGNORE, decode_distance, eds_weight, pe_encode, pe_target
from genpan.prep.targets import (
    boundary_distance,
    boundary_mask,
    build_targets,
    encode_distance,
    instance_map,
    segment_index_map,
    segment_stats,
    semantic_map,
)


def slow_boundary(ids: np.ndarray) -> np.ndarray:
    h, w = ids.shape
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and ids[yy, xx] != ids[y, x]:
                    out[y, x] = True
    return out


def slow_distance(ids: np.ndarray, clip: float) -> np.ndarray:
    b = slow_boundary(ids)
    pts = np.argwhere(b)
    h, w = ids.shape
    out = np.full((h, w), clip, np.float64)
    if len(pts) == 0:
        return out
    for y in range(h):
        for x in range(w):
            out[y, x] = min(clip, min(math.hypot(y - py, x - px) for py, px in pts))
    return out


def random_map(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """Blocky random segments (ids from a small set) so boundaries have varied shapes."""
    coarse = rng.integers(0, n, size=(max(1, h // 3), max(1, w // 3)))
    ids = np.kron(coarse, np.ones((3, 3), int))[:h, :w]
    ids = np.pad(ids, ((0, h - ids.shape[0]), (0, w - ids.shape[1])), mode="edge")
    return ids.astype(np.int32)


@pytest.mark.parametrize("seed", range(6))
def test_boundary_distance_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = random_map(rng, int(rng.integers(5, 19)), int(rng.integers(5, 19)), int(rng.integers(2, 5)))
    np.testing.assert_array_equal(boundary_mask(ids), slow_boundary(ids))
    np.testing.assert_allclose(boundary_distance(ids, clip=7.5), slow_distance(ids, 7.5), atol=1e-4)


def test_boundary_distance_single_segment_is_clip() -> None:
    ids = np.full((6, 9), 42, np.int32)
    assert np.all(boundary_distance(ids, clip=12.0) == 12.0)


def test_void_is_a_segment_of_its_own() -> None:
    ids = np.zeros((5, 6), np.int32)
    ids[:, 3:] = 7
    d = boundary_distance(ids)
    assert np.all(d[:, 2:4] == 0) and np.all(d[:, 0] == 2) and np.all(d[:, 5] == 2)


def test_distance_encoding_roundtrip() -> None:
    d = np.array([[0.0, 1.0, math.sqrt(2), 0.24, 0.26, 300.0]], np.float32)
    enc = encode_distance(d)  # default: half pixels up to 127.5 px, uint8
    assert enc.dtype == np.uint8 and enc.tolist() == [[0, 2, 3, 0, 1, 255]]
    np.testing.assert_allclose(decode_distance(enc), np.minimum(d, 127.5), atol=0.25 + 1e-6)
    legacy = encode_distance(d, clip=255.0, scale=DIST_SCALE)  # PREP_VERSION 1: 1/64 px, uint16
    assert legacy.dtype == np.uint16 and legacy[0, 5] == 255 * DIST_SCALE
    np.testing.assert_allclose(decode_distance(legacy, DIST_SCALE), np.minimum(d, 255.0), atol=0.5 / DIST_SCALE)
    np.testing.assert_allclose(decode_distance(torch.from_numpy(enc.astype(np.int32))).numpy(), decode_distance(enc))
    assert encode_distance(d, clip=200.0, scale=2).dtype == np.uint16  # 400 does not fit a byte
    for clip, scale in [(127.5, 3), (0.0, 2), (2000.0, 64)]:
        with pytest.raises(ValueError):
            encode_distance(d, clip, scale)


def test_segment_stats_matches_loops() -> None:
    rng = np.random.default_rng(3)
    ids = random_map(rng, 17, 23, 5) * 1000 + 5
    seg_ids = sorted(set(np.unique(ids).tolist())) + [999999]
    stats = segment_stats(ids, seg_ids)
    h, w = ids.shape
    for s in stats:
        pix = [(y, x) for y in range(h) for x in range(w) if ids[y, x] == s.id]
        if not pix:
            assert s.area == 0
            continue
        assert s.area == len(pix)
        ys = [p[0] for p in pix]
        xs = [p[1] for p in pix]
        assert s.bbox == (min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1)
        u = sum(2 * (x + 0.5) / w - 1 for x in xs) / len(xs)
        v = sum(2 * (y + 0.5) / h - 1 for y in ys) / len(ys)
        assert s.centroid == pytest.approx((u, v), abs=1e-12)


def test_semantic_and_instance_maps_match_loops() -> None:
    ids = np.array([[0, 10, 10, 20], [30, 30, 20, 20], [40, 40, 40, 99]], np.int32)
    segments = [
        {"id": 10, "category_id": 1, "iscrowd": 0},
        {"id": 20, "category_id": 2, "iscrowd": 1},
        {"id": 30, "category_id": 101, "iscrowd": 0},
        {"id": 40, "category_id": 1, "iscrowd": 0},
    ]
    train = {1: 0, 2: 1, 101: 2}
    sem = semantic_map(ids, segments, train)
    ins, idx = instance_map(ids, segments, {1, 2})
    assert idx == [1, 2, 0, 3]
    by_id = {s["id"]: s for s in segments}
    for y in range(ids.shape[0]):
        for x in range(ids.shape[1]):
            seg = by_id.get(int(ids[y, x]))
            assert sem[y, x] == (train[seg["category_id"]] if seg else IGNORE)  # 99 unlisted → ignore
            expected = idx[segments.index(seg)] if seg and seg["category_id"] in (1, 2) else 0
            assert ins[y, x] == expected
    assert sem.dtype == np.uint8 and ins.dtype == np.uint16


def test_build_targets_table() -> None:
    ids = np.array([[5, 5, 6], [5, 7, 6]], np.int32)
    segs = [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 3, "iscrowd": 1}, {"id": 7, "category_id": 9}]
    t = build_targets(ids, segs, {1: 0, 3: 1, 9: 2}, {1, 3})
    assert [s["ins"] for s in t.segments] == [1, 2, 0]
    assert [s["iscrowd"] for s in t.segments] == [False, True, False]
    assert t.segments[0]["area"] == 3 and t.segments[2]["isthing"] is False
    assert t.segments[1]["centroid"] == pytest.approx([2 * 2.5 / 3 - 1, 0.0])
    # a caller's dense index (the reader's) gives the same targets as computing it here
    given = build_targets(ids, segs, {1: 0, 3: 1, 9: 2}, {1, 3}, dense=segment_index_map(ids, [5, 6, 7]))
    assert given.segments == t.segments
    for name in ("sem", "ins", "dist"):
        np.testing.assert_array_equal(getattr(given, name), getattr(t, name))


def test_eds_weight_formula() -> None:
    d = np.linspace(0, 60, 13)
    for D, wmin, s in [(20.0, 0.0, 1.0), (10.0, 0.3, 0.5), (5.0, 1.0, 2.0)]:
        expected = [wmin + (1 - wmin) * math.exp(-((s * x) ** 2) / D**2) for x in d]
        np.testing.assert_allclose(eds_weight(d, D, wmin, s), expected, rtol=1e-12)
        np.testing.assert_allclose(eds_weight(torch.tensor(d), D, wmin, s).numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError):
        eds_weight(d, D=0.0)


def test_pe_encode_formula_and_sphere() -> None:
    p = np.linspace(-1, 1, 9)
    L = 4
    g = pe_encode(p, L)
    for i, x in enumerate(p):
        expected = []
        for level in range(L):
            expected += [math.sin(2**level * math.pi * x), math.cos(2**level * math.pi * x)]
        np.testing.assert_allclose(g[i], expected, atol=1e-12)
    np.testing.assert_allclose((g**2).sum(-1), L)  # all codes on a sphere of radius sqrt(L)
    np.testing.assert_allclose(pe_encode(torch.tensor(p), L).numpy(), g, atol=1e-12)


def test_pe_target_void_is_zero() -> None:
    u = np.array([0.1, -0.5])
    v = np.array([0.7, 0.2])
    valid = np.array([True, False])
    t = pe_target(u, v, valid, 2)
    assert t.shape == (2, 8)
    np.testing.assert_allclose(t[0], np.concatenate([pe_encode(u[:1], 2)[0], pe_encode(v[:1], 2)[0]]))
    assert np.all(t[1] == 0)
    tt = pe_target(torch.tensor(u), torch.tensor(v), torch.tensor(valid), 2)
    np.testing.assert_allclose(tt.numpy(), t)


small_maps = arrays(np.int32, st.tuples(st.integers(2, 12), st.integers(2, 12)), elements=st.integers(0, 3))


@settings(max_examples=60, deadline=None)
@given(small_maps)
def test_distance_zero_exactly_on_boundary_and_lipschitz(ids: np.ndarray) -> None:
    d = boundary_distance(ids, clip=1e4)
    b = slow_boundary(ids)
    assert np.array_equal(d == 0, b)
    if b.any():  # 1-Lipschitz between any two pixels
        ys, xs = np.mgrid[0 : ids.shape[0], 0 : ids.shape[1]]
        p = np.stack([ys.ravel(), xs.ravel()], 1).astype(np.float64)
        dist = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
        dv = d.ravel().astype(np.float64)
        assert np.all(np.abs(dv[:, None] - dv[None]) <= dist + 1e-4)


@settings(max_examples=60, deadline=None)
@given(small_maps, st.randoms(use_true_random=False))
def test_centroids_invariant_to_id_permutation(ids: np.ndarray, rnd) -> None:
    uniq = np.unique(ids).tolist()
    new = rnd.sample(range(1, 10_000), len(uniq))
    perm = dict(zip(uniq, new))
    ids2 = np.vectorize(perm.get)(ids).astype(np.int32)
    a = segment_stats(ids, uniq)
    b = segment_stats(ids2, [perm[u] for u in uniq])
    for sa, sb in zip(a, b):
        assert sa.centroid == pytest.approx(sb.centroid, abs=1e-12)
        assert (sa.area, sa.bbox) == (sb.area, sb.bbox)
