"""Post-processing: separable decode, exact recovery from ideal outputs, matrix NMS, noise trend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genpan.eval.postprocess import (
    PostprocessConfig,
    cell_of,
    decode_embeddings,
    gather_pixels,
    grid_centres,
    ideal_outputs,
    matrix_nms_decay,
    postprocess,
    row_max,
    top_class,
)
from genpan.labels import pe_target

# train ids: 0, 1 things (categories 1, 2); 2, 3 stuff (categories 10, 11)
TRAIN_TO_CAT = [1, 2, 10, 11]
CAT_TO_TRAIN = {c: t for t, c in enumerate(TRAIN_TO_CAT)}
THING_CATS = {1, 2}
THING_TRAIN = {0, 1}
EXACT = PostprocessConfig(min_thing_area_frac=0.0, min_stuff_area_frac=0.0, void_prob_threshold=0.5)


def _seg(seg_id: int, cat: int, crowd: int = 0) -> dict:
    return {"id": seg_id, "category_id": cat, "iscrowd": crowd}


def _run(pan: np.ndarray, segs: list[dict], cfg: PostprocessConfig = EXACT, noise: float = 0.0, seed: int = 0):
    sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
    if noise:
        inst = inst + np.random.default_rng(seed).normal(0.0, noise, inst.shape).astype(np.float32)
    return postprocess(sem, inst, TRAIN_TO_CAT, THING_TRAIN, cfg)


def _match(gt, gt_segs, pred, pred_segs) -> dict[int, float]:
    """Slow PQ-style matching: per GT segment (not crowd) the IoU of the same-category prediction
    with IoU > 0.5, void pixels of the prediction left out of the union; 0 when none matches."""
    cat_of_pred = {s["id"]: s["category_id"] for s in pred_segs}
    void = gt == 0
    out = {}
    for g in gt_segs:
        if g.get("iscrowd"):
            continue
        gm = gt == g["id"]
        best = 0.0
        for pid in np.unique(pred[gm]):
            if pid == 0 or cat_of_pred[int(pid)] != g["category_id"]:
                continue
            pm = pred == pid
            inter = float((gm & pm).sum())
            iou = inter / float((gm | pm).sum() - (pm & void).sum())
            best = max(best, iou if iou > 0.5 else 0.0)
        out[g["id"]] = best
    return out


def _scene_touching_split_tiny() -> tuple[np.ndarray, list[dict]]:
    pan = np.full((96, 128), 1, np.int32)  # stuff 10 (sky)
    pan[64:, :] = 2  # stuff 11 (ground)
    pan[10:30, 10:30] = 3  # two touching instances of the same class
    pan[10:30, 30:52] = 4
    pan[40:60, 70:110] = 5  # an instance of class 2 cut in two by a pole of stuff 10
    pan[40:60, 88:92] = 1
    pan[80:82, 10:14] = 6  # tiny: 8 px
    pan[84:86, 40:44] = 7  # another tiny one, class 1
    pan[0:4, :] = 0  # void band
    pan[90:, 100:] = 0
    segs = [_seg(1, 10), _seg(2, 11), _seg(3, 1), _seg(4, 1), _seg(5, 2), _seg(6, 2), _seg(7, 1)]
    return pan, segs


def _scene_disconnected_stuff_and_crowd() -> tuple[np.ndarray, list[dict]]:
    pan = np.full((80, 80), 2, np.int32)  # stuff 11
    pan[:, :20] = 1  # stuff 10, left and right: one segment in two parts
    pan[:, 60:] = 1
    pan[20:40, 25:45] = 3  # thing
    pan[50:70, 30:55] = 4  # crowd thing
    pan[45:48, 0:80] = 0  # void line crossing everything
    segs = [_seg(1, 10), _seg(2, 11), _seg(3, 2), _seg(4, 1, crowd=1)]
    return pan, segs


def _random_scene(rng: np.random.Generator, h: int = 120, w: int = 160, n_inst: int = 14) -> tuple[np.ndarray, list[dict]]:
    """Stuff halves, then rectangles pasted over each other (later ones occlude), a void patch."""
    pan = np.where(np.arange(h)[:, None] < rng.integers(h // 3, 2 * h // 3), 1, 2).repeat(w, axis=1).astype(np.int32)
    segs = [_seg(1, 10), _seg(2, 11)]
    for k in range(n_inst):
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        pan[y0 : y0 + rng.integers(3, 30), x0 : x0 + rng.integers(3, 40)] = 3 + k
        segs.append(_seg(3 + k, int(rng.choice([1, 2]))))
    y0, x0 = rng.integers(0, h - 10), rng.integers(0, w - 10)
    pan[y0 : y0 + 8, x0 : x0 + 8] = 0
    present = set(np.unique(pan).tolist())
    return pan, [s for s in segs if s["id"] in present]


def _expected_after_quantisation(
    pan: np.ndarray,
    segs: list[dict],
    grid: int,
    merge: bool,
    cat_to_train: dict[int, int] = CAT_TO_TRAIN,
    thing_cats: set[int] = THING_CATS,
) -> tuple[np.ndarray, list[dict]]:
    """What the documented grid limit predicts: things whose centroid cells coincide (or touch, 8-way,
    when merging adjacent cells) become one segment, classed by majority of pixels (lowest train id on
    a tie); stuff is unchanged. Computed by brute force over pairs, independent of the grouping code."""
    h, w = pan.shape
    train_to_cat = {t: c for c, t in cat_to_train.items()}
    things = [s for s in segs if s["category_id"] in thing_cats]
    cells = []
    for s in things:
        ys, xs = np.nonzero(pan == s["id"])
        u, v = 2 * (xs.mean() + 0.5) / w - 1, 2 * (ys.mean() + 0.5) / h - 1
        cells.append((int(cell_of(u, grid)), int(cell_of(v, grid))))
    parent = list(range(len(things)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    reach = 1 if merge else 0
    for i in range(len(things)):
        for j in range(i + 1, len(things)):
            if max(abs(cells[i][0] - cells[j][0]), abs(cells[i][1] - cells[j][1])) <= reach:
                parent[find(j)] = find(i)
    out = pan.copy()
    new_segs = [s for s in segs if s["category_id"] not in thing_cats]
    for root in sorted({find(i) for i in range(len(things))}):
        members = [things[i] for i in range(len(things)) if find(i) == root]
        areas: dict[int, int] = {}
        for s in members:
            out[pan == s["id"]] = members[0]["id"]
            train = cat_to_train[s["category_id"]]
            areas[train] = areas.get(train, 0) + int((pan == s["id"]).sum())
        best = max(areas.values())
        cat = train_to_cat[min(t for t, a in areas.items() if a == best)]
        new_segs.append(_seg(members[0]["id"], cat, int(any(s["iscrowd"] for s in members))))
    return out, new_segs


def _assert_same_partition(expected: np.ndarray, exp_segs: list[dict], pred: np.ndarray, pred_segs: list[dict]) -> None:
    """The two maps are equal up to renaming segment ids, void for void, with the same categories."""
    pairs = np.unique(np.stack([expected.ravel(), pred.ravel()]), axis=1)
    assert len(set(pairs[0].tolist())) == pairs.shape[1] == len(set(pairs[1].tolist())), "not a one-to-one relabelling"
    cat_exp = {s["id"]: s["category_id"] for s in exp_segs}
    cat_pred = {s["id"]: s["category_id"] for s in pred_segs}
    for e, p in pairs.T:
        assert (e == 0) == (p == 0)
        if e:
            assert cat_exp[int(e)] == cat_pred[int(p)]


# ------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("grid,L", [(16, 4), (80, 4), (24, 2)])
def test_separable_decode_equals_brute_force(grid: int, L: int) -> None:
    rng = np.random.default_rng(grid + L)
    emb = rng.normal(0.0, 1.0, (500, 4 * L))
    c = grid_centres(grid)
    uu, vv = np.meshgrid(c, c, indexing="ij")  # all G² codes, (a, b) order
    codes = pe_target(uu.ravel(), vv.ravel(), np.ones(grid * grid, bool), L)
    d2 = ((emb[:, None, :] - codes[None, :, :]) ** 2).sum(-1)  # P, G²
    best = d2.argmin(axis=1)
    dec = decode_embeddings(torch.from_numpy(emb), grid)
    np.testing.assert_array_equal(dec.a.numpy(), best // grid)
    np.testing.assert_array_equal(dec.b.numpy(), best % grid)
    np.testing.assert_allclose(dec.dist2.numpy(), d2.min(axis=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dec.norm2.numpy(), (emb**2).sum(1), rtol=1e-5)
    cos = (emb * codes[best]).sum(1) / np.linalg.norm(emb, axis=1) / np.sqrt(2 * L)
    np.testing.assert_allclose(dec.agreement.numpy(), np.clip(cos, 0, 1), atol=1e-5)


def test_decode_of_exact_codes_returns_their_cells_and_accepts_channel_first_numpy() -> None:
    rng = np.random.default_rng(1)
    u, v = rng.uniform(-1, 1, (6, 7)), rng.uniform(-1, 1, (6, 7))
    inst = pe_target(u, v, np.ones_like(u, bool), 4).transpose(2, 0, 1)  # 4L, h, w
    dec = decode_embeddings(inst, 80, chunk=5)
    np.testing.assert_array_equal(dec.a.numpy(), cell_of(u, 80).ravel())
    np.testing.assert_array_equal(dec.b.numpy(), cell_of(v, 80).ravel())


# ------------------------------------------------------------------------------------------ recovery


@pytest.mark.parametrize("scene", [_scene_touching_split_tiny, _scene_disconnected_stuff_and_crowd])
def test_ideal_outputs_recover_the_exact_segmentation(scene) -> None:
    pan, segs = scene()
    pred, pred_segs = _run(pan, segs)
    _assert_same_partition(pan, segs, pred, pred_segs)
    assert all(v == 1.0 for v in _match(pan, segs, pred, pred_segs).values())
    ids = [s["id"] for s in pred_segs]
    assert len(set(ids)) == len(ids) and 0 not in ids
    for s in pred_segs:  # area and bbox against a direct count
        ys, xs = np.nonzero(pred == s["id"])
        assert s["area"] == ys.size
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert s["iscrowd"] == 0 and s["isthing"] == (s["category_id"] in THING_CATS)


def test_default_void_handling_still_scores_iou_one() -> None:
    """With no void threshold, GT void gets some class; PQ's IoU leaves pred∩void out, so still 1."""
    pan, segs = _scene_touching_split_tiny()
    cfg = PostprocessConfig(min_thing_area_frac=0.0, min_stuff_area_frac=0.0)
    pred, pred_segs = _run(pan, segs, cfg)
    assert all(v == 1.0 for v in _match(pan, segs, pred, pred_segs).values())


@pytest.mark.parametrize("merge", [True, False])
def test_random_scenes_recover_up_to_the_grid_limit(merge: bool) -> None:
    # without merging, radius-1 masks of touching cells overlap and NMS resolves them (tested below);
    # radius 0 keeps every cell its own instance, which the expectation models
    cfg = PostprocessConfig(
        merge_adjacent=merge,
        mask_radius_cells=int(merge),
        min_thing_area_frac=0.0,
        min_stuff_area_frac=0.0,
        void_prob_threshold=0.5,
    )
    rng = np.random.default_rng(7)
    for _ in range(8):
        pan, segs = _random_scene(rng)
        pred, pred_segs = _run(pan, segs, cfg)
        exp, exp_segs = _expected_after_quantisation(pan, segs, cfg.grid_size, merge)
        _assert_same_partition(exp, exp_segs, pred, pred_segs)


def test_pq_is_one_on_ideal_outputs() -> None:
    pq_match = pytest.importorskip("genpan.eval.pq_match")
    cats = pq_match.CategoryTable.from_coco([{"id": c, "isthing": int(c in THING_CATS)} for c in TRAIN_TO_CAT])
    for scene in (_scene_touching_split_tiny, _scene_disconnected_stuff_and_crowd):
        pan, segs = scene()
        pred, pred_segs = _run(pan, segs, PostprocessConfig(min_thing_area_frac=0.0, min_stuff_area_frac=0.0))
        st = pq_match.pq_image(pan, segs, pred, pred_segs, cats)
        assert st.fp.sum() == 0 and st.fn.sum() == 0
        np.testing.assert_allclose(st.iou, st.tp)


def test_synthetic_set_pq_is_one_up_to_the_grid_limit() -> None:
    """targets → ideal embeddings → post-process on the project's synthetic scenes: every scene is
    the GT up to the documented grid merge, and PQ = 1 on every scene the grid does not merge."""
    pq_match = pytest.importorskip("genpan.eval.pq_match")
    from genpan.prep.readers.base import contiguous_train_ids
    from genpan.prep.synthetic import SceneConfig, categories, make_scene

    cats = categories()
    table = contiguous_train_ids(cats)
    cat_to_train = {c.id: c.train_id for c in table}
    train_to_cat = [c.id for c in table]
    thing_cats = {c.id for c in table if c.isthing}
    pq_table = pq_match.CategoryTable.from_coco(cats)
    cfg = PostprocessConfig(min_thing_area_frac=0.0, min_stuff_area_frac=0.0, void_prob_threshold=0.5)
    unmerged = 0
    for i in range(6):
        scene = make_scene(np.random.default_rng([11, i]), SceneConfig(min_size=96, max_size=160))
        sem, inst = ideal_outputs(scene.pan_ids, scene.segments, cat_to_train, thing_cats, len(table))
        pred, pred_segs = postprocess(sem, inst, train_to_cat, {cat_to_train[c] for c in thing_cats}, cfg)
        exp, exp_segs = _expected_after_quantisation(scene.pan_ids, scene.segments, 80, True, cat_to_train, thing_cats)
        _assert_same_partition(exp, exp_segs, pred, pred_segs)
        if len(exp_segs) == len(scene.segments):
            unmerged += 1
            st = pq_match.pq_image(scene.pan_ids, scene.segments, pred, pred_segs, pq_table)
            assert st.fp.sum() == 0 and st.fn.sum() == 0 and np.allclose(st.iou, st.tp)
    assert unmerged >= 3


def test_same_cell_centroids_come_out_as_one_instance() -> None:
    """Quantisation limit: two instances sharing a centroid cell cannot be told apart."""
    pan = np.full((64, 64), 1, np.int32)
    pan[10:20, 10:20] = 3
    pan[44:54, 44:54] = 4
    pan[44:54, 10:20] = 5
    pan[10:20, 44:54] = 5  # one instance in two far-apart parts: centroid at the image centre
    segs = [_seg(1, 10), _seg(3, 1), _seg(4, 1), _seg(5, 2)]
    for merge in (True, False):
        cfg = PostprocessConfig(merge_adjacent=merge, min_thing_area_frac=0.0, min_stuff_area_frac=0.0)
        pred, pred_segs = _run(pan, segs, cfg)
        assert len({int(pred[15, 15]), int(pred[49, 49]), int(pred[49, 15])}) == 3  # distinct centroids apart
        both = np.unique(pred[pan == 5])
        assert both.size == 1  # the split instance is whole: one code for both parts
    # two instances with the same centroid (nested square and ring): one segment
    pan = np.full((64, 64), 1, np.int32)
    pan[16:48, 16:48] = 3
    pan[26:38, 26:38] = 4
    segs = [_seg(1, 10), _seg(3, 1), _seg(4, 2)]
    pred, pred_segs = _run(pan, segs)
    assert np.unique(pred[pan >= 3]).size == 1
    (thing,) = [s for s in pred_segs if s["isthing"]]
    assert thing["category_id"] == 1  # majority: the ring has 1024 − 144 px of class 1
    exp, exp_segs = _expected_after_quantisation(pan, segs, 80, True)
    _assert_same_partition(exp, exp_segs, pred, pred_segs)


def test_touching_cells_merge_only_when_asked() -> None:
    """On an 80×80 map with G = 80 a cell is one pixel: centroid (15, 15) and (16, 16) touch."""
    pan = np.full((80, 80), 1, np.int32)
    pan[10:21, 10:21] = 3  # centroid (15, 15)
    pan[0:3, 0:3] = 4
    pan[30:33, 30:33] = 4  # two parts, centroid (16, 16): the diagonal neighbour cell
    pan[50:61, 50:61] = 5  # far away
    segs = [_seg(1, 10), _seg(3, 1), _seg(4, 2), _seg(5, 2)]
    for merge, n_things in ((True, 2), (False, 3)):
        cfg = PostprocessConfig(merge_adjacent=merge, mask_radius_cells=0, min_thing_area_frac=0.0, min_stuff_area_frac=0.0)
        pred, pred_segs = _run(pan, segs, cfg)
        assert len([s for s in pred_segs if s["isthing"]]) == n_things
        exp, exp_segs = _expected_after_quantisation(pan, segs, 80, merge)
        _assert_same_partition(exp, exp_segs, pred, pred_segs)


def test_zero_vector_mode_recovers_ideal_outputs_but_fails_on_shrunk_ones() -> None:
    """The team's observation: outputs shrunk toward 0 pass the semantic test, not the zero-vector one."""
    pan, segs = _scene_touching_split_tiny()
    sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
    zero = PostprocessConfig(thing_mode="zero_vector", min_thing_area_frac=0.0, min_stuff_area_frac=0.0, void_prob_threshold=0.5)
    pred, pred_segs = postprocess(sem, inst, TRAIN_TO_CAT, THING_TRAIN, zero)
    _assert_same_partition(pan, segs, pred, pred_segs)
    shrunk = 0.3 * inst  # ‖e‖² = 0.09·2L, nearer 0 than any code (distance (0.7)²·2L)
    pred, pred_segs = postprocess(sem, shrunk, TRAIN_TO_CAT, THING_TRAIN, zero)
    assert not any(s["isthing"] for s in pred_segs)
    pred, pred_segs = postprocess(sem, shrunk, TRAIN_TO_CAT, THING_TRAIN, EXACT)
    _assert_same_partition(pan, segs, pred, pred_segs)


def test_numpy_and_torch_inputs_agree() -> None:
    pan, segs = _random_scene(np.random.default_rng(3))
    sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
    inst = inst + np.random.default_rng(4).normal(0, 0.3, inst.shape).astype(np.float32)
    a, sa = postprocess(sem, inst, TRAIN_TO_CAT, THING_TRAIN)
    b, sb = postprocess(torch.from_numpy(sem), torch.from_numpy(inst), TRAIN_TO_CAT, THING_TRAIN)
    np.testing.assert_array_equal(a, b)
    assert sa == sb and a.dtype == np.int32


def test_area_thresholds_drop_small_segments_to_void() -> None:
    pan, segs = _scene_touching_split_tiny()
    h, w = pan.shape
    cfg = PostprocessConfig(min_thing_area_frac=9 / (h * w), min_stuff_area_frac=0.0, void_prob_threshold=0.5)
    pred, _ = _run(pan, segs, cfg)
    assert (pred[(pan == 6) | (pan == 7)] == 0).all()  # the 8-px instances
    assert (pred[pan == 3] > 0).all()
    # the pole splits nothing of stuff 10, but a 40-px stuff island below the area threshold goes void
    pan2 = pan.copy()
    pan2[70:74, 60:70] = 1  # island of stuff 10 inside stuff 11
    cfg = PostprocessConfig(min_thing_area_frac=0.0, min_stuff_area_frac=41 / (h * w), void_prob_threshold=0.5)
    pred, pred_segs = _run(pan2, segs, cfg)
    assert (pred[70:74, 60:70] == 0).all()
    sky = [s for s in pred_segs if s["category_id"] == 10]
    assert len(sky) == 1 and (pred[pan2 == 1].reshape(-1) != 0).sum() == sky[0]["area"]


def test_matrix_nms_decay_matches_a_loop() -> None:
    rng = np.random.default_rng(5)
    masks = rng.random((12, 40)) < 0.3
    weight = rng.integers(0, 5, 40)
    sigma = 2.0
    got = matrix_nms_decay(masks, weight, sigma)

    def iou(i: int, j: int) -> float:
        inter = float(weight[masks[i] & masks[j]].sum())
        union = float(weight[masks[i] | masks[j]].sum())
        return inter / union if union else 0.0

    for j in range(len(masks)):
        want = 1.0
        for i in range(j):
            comp = max((iou(k, i) for k in range(i)), default=0.0)
            want = min(want, np.exp(-sigma * iou(i, j) ** 2) / np.exp(-sigma * comp**2))
        assert got[j] == pytest.approx(want, rel=1e-9)


def test_nms_suppresses_a_duplicate_group_without_merging() -> None:
    """Without merging, one instance split over two touching cells gives two overlapping masks
    (radius 1): NMS and painting keep one instance holding both cells."""
    pan = np.full((80, 80), 1, np.int32)
    pan[10:21, 10:21] = 3
    segs = [_seg(1, 10), _seg(3, 1)]
    sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
    nudged = pe_target(np.full((80, 80), 2 * 16.5 / 80 - 1), np.full((80, 80), 2 * 15.5 / 80 - 1), pan == 3, 4)
    inst[:, 10:13, 10:21] = nudged.transpose(2, 0, 1)[:, 10:13, 10:21]  # 33 px decode one cell to the right
    for radius, n_things in ((1, 1), (0, 2)):
        cfg = PostprocessConfig(merge_adjacent=False, mask_radius_cells=radius, min_thing_area_frac=0.0, min_stuff_area_frac=0.0)
        pred, pred_segs = postprocess(sem, inst, TRAIN_TO_CAT, THING_TRAIN, cfg)
        assert len([s for s in pred_segs if s["isthing"]]) == n_things
    assert np.unique(pred[pan == 3]).size == 2


def test_recovery_degrades_monotonically_with_noise() -> None:
    levels = [0.0, 0.15, 0.3, 0.5, 0.8]
    cfg = PostprocessConfig(min_thing_area_frac=0.0, min_stuff_area_frac=0.0)
    recall = []
    for sigma in levels:
        hits = []
        for seed in range(4):
            pan, segs = _random_scene(np.random.default_rng(100 + seed), n_inst=10)
            pred, pred_segs = _run(pan, segs, cfg, noise=sigma, seed=seed)
            things = {s["id"] for s in segs if s["category_id"] in THING_CATS}
            hits += [v > 0 for k, v in _match(pan, segs, pred, pred_segs).items() if k in things]
        recall.append(float(np.mean(hits)))
    assert recall[0] == 1.0
    assert all(a >= b for a, b in zip(recall, recall[1:])), recall
    assert recall[-1] < recall[0], recall  # the noise range does reach the method's limit


def test_config_rejects_bad_values() -> None:
    for bad in ({"grid_size": 1}, {"thing_mode": "zero"}, {"overlap_threshold": 1.5}, {"nms_top_k": 0}):
        with pytest.raises(ValueError):
            PostprocessConfig(**bad)
    with pytest.raises(ValueError, match="train_to_category"):
        postprocess(np.zeros((3, 4, 4)), np.zeros((16, 4, 4)), TRAIN_TO_CAT, THING_TRAIN)


# --------------------------------------------------------------------------------------------- sweep


def _write_gt(root, scenes: list[tuple[np.ndarray, list[dict]]]):
    import json

    from genpan.coco_panoptic import write_panoptic_png

    png_dir = root / "panoptic_val"
    png_dir.mkdir(parents=True)
    anns = []
    for i, (pan, segs) in enumerate(scenes):
        write_panoptic_png(png_dir / f"im{i}.png", pan)
        anns.append({"image_id": i + 1, "file_name": f"im{i}.png", "segments_info": segs})
    cats = [{"id": c, "name": f"c{c}", "isthing": int(c in THING_CATS)} for c in TRAIN_TO_CAT]
    gt_json = root / "panoptic_val.json"
    gt_json.write_text(json.dumps({"annotations": anns, "categories": cats, "images": []}))
    return gt_json


def test_parse_grid_types_values_and_rejects_bad_options() -> None:
    from genpan.eval.sweep import grid_configs, parse_grid

    grid = parse_grid(["grid_size=40,80", "merge_adjacent=true,false", "thing_mode=semantic,zero_vector", "nms_sigma=2"])
    assert grid == {"grid_size": [40, 80], "merge_adjacent": [True, False], "thing_mode": ["semantic", "zero_vector"], "nms_sigma": [2]}
    configs = grid_configs(PostprocessConfig(score_threshold=0.3), grid)
    assert len(configs) == 8
    assert [c.grid_size for _, c in configs] == [40] * 4 + [80] * 4  # row-major, first option outermost
    assert all(c.score_threshold == 0.3 and isinstance(c.nms_sigma, float) for _, c in configs)
    assert configs[1][0] == {"grid_size": 40, "merge_adjacent": True, "thing_mode": "zero_vector", "nms_sigma": 2}
    for bad in (["nope=1"], ["grid_size"], ["grid_size=x"], ["overlap_threshold=2"], ["grid_size=4", "grid_size=8"]):
        with pytest.raises(ValueError):
            parse_grid(bad)


def test_resize_ids_matches_a_loop() -> None:
    from genpan.eval.postprocess import resize_id_map as resize_ids

    pan = np.random.default_rng(0).integers(0, 4, (7, 9)).astype(np.int32)
    segs = [{"id": i, "category_id": 1} for i in (1, 2, 3, 9)]
    out, kept = resize_ids(pan, segs, (15, 4))
    for y in range(15):
        for x in range(4):
            assert out[y, x] == pan[min(int((y + 0.5) * 7 / 15), 6), min(int((x + 0.5) * 9 / 4), 8)]
    assert [s["id"] for s in kept] == [i for i in (1, 2, 3) if (out == i).any()]
    assert all(s["area"] == int((out == s["id"]).sum()) for s in kept)


class _ExactScorer:
    """Tiny scorer: an image scores 1 when the prediction is the GT up to renaming ids."""

    def image(self, gt_ids, gt_segments, pred_ids, pred_segments, name):
        try:
            _assert_same_partition(gt_ids, gt_segments, pred_ids, pred_segments)
        except AssertionError:
            return 0.0
        return 1.0

    def summary(self, image_ids, stats):
        return {"pq": float(np.mean(stats))}


def test_run_sweep_ranks_configs_with_a_given_scorer() -> None:
    from genpan.eval.sweep import GTImage, RawOutputs, grid_configs, run_sweep

    scenes = [_scene_touching_split_tiny(), _scene_disconnected_stuff_and_crowd()]

    def images():
        for i, (pan, segs) in enumerate(scenes):
            sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
            yield GTImage(i, f"im{i}", pan, segs), RawOutputs(i, sem, inst, None)

    base = PostprocessConfig(min_thing_area_frac=0.0, min_stuff_area_frac=0.0, void_prob_threshold=0.5)
    configs = grid_configs(base, {"grid_size": [2, 80], "merge_adjacent": [True, False]})
    rows = run_sweep(images(), configs, TRAIN_TO_CAT, THING_CATS, _ExactScorer())
    assert [r["params"]["grid_size"] for r in rows] == [80, 80, 2, 2]  # a 2×2 grid merges instances
    assert [r["pq"] for r in rows[:2]] == [1.0, 1.0] and max(r["pq"] for r in rows[2:]) < 1.0
    assert rows[0]["params"]["merge_adjacent"] is True  # ties keep grid order


def test_sweep_cli_end_to_end(tmp_path, capsys) -> None:
    pytest.importorskip("genpan.eval.pq_match")
    from genpan.config import load_config
    from genpan.eval.sweep import PostprocessConfig as SweepConfig
    from genpan.eval.sweep import main, save_outputs

    scenes = [_scene_touching_split_tiny(), _scene_disconnected_stuff_and_crowd()]
    gt_json = _write_gt(tmp_path, scenes)
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, (pan, segs) in enumerate(scenes):
        sem, inst = ideal_outputs(pan, segs, CAT_TO_TRAIN, THING_CATS, len(TRAIN_TO_CAT))
        save_outputs(raw / f"im{i}.npz", i + 1, sem, inst, TRAIN_TO_CAT)
    out = tmp_path / "sweep"
    argv = ["--outputs", str(raw), "--gt-json", str(gt_json), "--out", str(out), "--grid", "grid_size=2,80", "--grid", "min_stuff_area_frac=0"]
    assert main(argv) == 0
    best = load_config(SweepConfig, out / "best.toml")
    assert best.grid_size == 80 and best.min_stuff_area_frac == 0.0
    import json

    rows = json.loads((out / "sweep.json").read_text())
    assert len(rows) == 2 and rows[0]["pq"] == pytest.approx(1.0) and rows[1]["pq"] < 1.0
    assert main(["--sanity", "--gt-json", str(gt_json), "--out", str(out), "--grid", "min_stuff_area_frac=0"]) == 0
    assert json.loads((out / "sweep.json").read_text())[0]["pq"] == pytest.approx(1.0)
    capsys.readouterr()
    (raw / "bad.npz").write_bytes(b"not a zip")
    assert main(["--outputs", str(raw), "--gt-json", str(gt_json), "--out", str(out)]) == 2
    assert "bad.npz" in capsys.readouterr().err
    assert main(["--outputs", str(tmp_path / "none"), "--gt-json", str(gt_json), "--out", str(out)]) == 2
    assert "raw-output folder not found" in capsys.readouterr().err


def test_baseline_encodings_decode_like_pe() -> None:
    """The appendix C encodings, turned into PE embeddings, decode to the same grid cells as PE itself."""
    from genpan.eval.postprocess import as_pe_embeddings, decode_embeddings

    rng = np.random.default_rng(0)
    G, bins, L = 40, 40, 4
    u = (rng.integers(0, G, (6, 7)) + 0.5) / G * 2 - 1  # grid-cell centres
    v = (rng.integers(0, G, (6, 7)) + 0.5) / G * 2 - 1
    pe = pe_target(u, v, np.ones(u.shape, bool), L).transpose(2, 0, 1).astype(np.float32)
    rgb = np.stack([(u + 1) / 2, (v + 1) / 2, np.ones_like(u)]).astype(np.float32)
    uvcls = np.zeros((2 * bins, *u.shape), np.float32)
    yy, xx = np.mgrid[0:6, 0:7]
    uvcls[((u + 1) / 2 * bins).astype(int), yy, xx] = 5.0
    uvcls[bins + ((v + 1) / 2 * bins).astype(int), yy, xx] = 5.0
    want = decode_embeddings(pe, G)
    for enc, x in (("pe", pe), ("rgb", rgb), ("uvcls", uvcls)):
        got = decode_embeddings(as_pe_embeddings(x, enc, L, bins), G)
        assert torch.equal(got.a, want.a) and torch.equal(got.b, want.b), enc
    with pytest.raises(ValueError, match="3 channels"):
        as_pe_embeddings(uvcls, "rgb", L, bins)


def test_cpu_reductions_equal_torch_including_ties() -> None:
    """The CPU fast paths of the per-pixel reductions give torch's values and first-max indices."""
    gen = torch.Generator().manual_seed(0)
    # integer-valued logits: many exact ties, where "first maximal index" is what must hold
    logits = torch.randint(0, 4, (7, 500), generator=gen).float()
    top, label = top_class(logits)
    ref_top, ref_label = logits.max(dim=0)
    assert torch.equal(top, ref_top) and torch.equal(label, ref_label)
    first = [int(next(c for c in range(7) if logits[c, p] == logits[:, p].max())) for p in range(500)]
    assert label.tolist() == first  # the slow obvious definition, independent of torch's tie rule
    scores = torch.randint(0, 3, (300, 9), generator=gen).float()
    val, idx = row_max(scores)
    ref_val, ref_idx = scores.max(dim=1)
    assert torch.equal(val, ref_val) and torch.equal(idx, ref_idx)
    mask = torch.rand(500, generator=gen) < 0.3
    maps = logits[None]  # B = 1, K = 7 channels, P = 500 pixels
    assert torch.equal(gather_pixels(maps, mask[None]), logits[:, mask].T)
    assert gather_pixels(maps, torch.zeros((1, 500), dtype=torch.bool)).shape == (0, 7)
