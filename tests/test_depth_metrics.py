"""Depth metrics against per-pixel loops written from the published formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from genpan.eval.depth import depth_table_markdown, eigen_crop_mask, image_depth_metrics, mean_depth_metrics


def slow_metrics(pred: np.ndarray, gt: np.ndarray, lo: float, hi: float) -> dict[str, float]:
    ps, gs = [], []
    for p, g in zip(pred.ravel(), gt.ravel()):
        if math.isfinite(g) and lo < g <= hi:
            ps.append(min(max(p, lo), hi))
            gs.append(g)
    n = len(gs)
    return {
        "abs_rel": sum(abs(p - g) / g for p, g in zip(ps, gs)) / n,
        "sq_rel": sum((p - g) ** 2 / g for p, g in zip(ps, gs)) / n,
        "rmse": math.sqrt(sum((p - g) ** 2 for p, g in zip(ps, gs)) / n),
        "rmse_log": math.sqrt(sum((math.log(p) - math.log(g)) ** 2 for p, g in zip(ps, gs)) / n),
        "log10": sum(abs(math.log10(p) - math.log10(g)) for p, g in zip(ps, gs)) / n,
        "delta1": sum(max(p / g, g / p) < 1.25 for p, g in zip(ps, gs)) / n,
        "delta2": sum(max(p / g, g / p) < 1.25**2 for p, g in zip(ps, gs)) / n,
        "delta3": sum(max(p / g, g / p) < 1.25**3 for p, g in zip(ps, gs)) / n,
    }


def test_matches_slow_formulas() -> None:
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 9.0, (12, 16))
    gt[0, 0] = 0.0  # no measurement
    gt[1, 1] = 12.0  # beyond max depth
    gt[2, 2] = np.nan
    pred = gt * rng.uniform(0.7, 1.4, gt.shape)
    pred[3, 3] = 50.0  # clipped to max depth
    m = image_depth_metrics(pred, gt, eigen_crop=False)
    expected = slow_metrics(pred, gt, 1e-3, 10.0)
    for k, v in expected.items():
        assert getattr(m, k) == pytest.approx(v, rel=1e-12), k


def test_perfect_prediction_and_mean() -> None:
    gt = np.full((480, 640), 3.0)
    m = image_depth_metrics(gt.copy(), gt)
    assert m.abs_rel == 0 and m.rmse == 0 and m.delta1 == 1
    worse = image_depth_metrics(gt * 1.1, gt)
    avg = mean_depth_metrics([m, None, worse])
    assert avg.num_images == 2 and avg.abs_rel == pytest.approx(0.05)
    assert mean_depth_metrics([None]) is None
    assert "AbsRel" in depth_table_markdown(avg)


def test_eigen_crop() -> None:
    mask = eigen_crop_mask(480, 640)
    assert mask.sum() == (471 - 45) * (601 - 41)
    assert mask[45, 41] and not mask[44, 41] and not mask[45, 40] and mask[470, 600] and not mask[471, 600]
    gt = np.full((480, 640), 2.0)
    pred = gt.copy()
    pred[:45] = 9.0  # outside the crop: ignored
    assert image_depth_metrics(pred, gt).rmse == 0
    assert image_depth_metrics(np.zeros((2, 2)), np.zeros((2, 2))) is None
    with pytest.raises(ValueError, match="differ in shape"):
        image_depth_metrics(np.zeros((2, 3)), np.zeros((3, 2)))


def test_cli_on_folders(tmp_path) -> None:
    import cv2

    from genpan.eval.depth import main

    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    g = np.full((8, 10), 2000, np.uint16)
    cv2.imwrite(str(gt / "a.png"), g)
    cv2.imwrite(str(pred / "a.png"), (g * 1.1).astype(np.uint16))
    assert main(["--gt-dir", str(gt), "--pred-dir", str(pred), "--no-eigen-crop", "--out", str(tmp_path / "r")]) == 0
    import json

    m = json.loads((tmp_path / "r" / "depth.json").read_text())
    assert m["abs_rel"] == pytest.approx(0.1) and m["num_images"] == 1
    cv2.imwrite(str(gt / "b.png"), g)
    assert main(["--gt-dir", str(gt), "--pred-dir", str(pred)]) == 2  # b.png has no prediction
    cv2.imwrite(str(pred / "b.png"), np.zeros((8, 10, 3), np.uint8))
    assert main(["--gt-dir", str(gt), "--pred-dir", str(pred)]) == 2  # not 16-bit


def test_disparity_alignment_recovers_depth_up_to_scale_and_shift() -> None:
    from genpan.eval.depth import disparity_to_aligned_depth

    rng = np.random.default_rng(1)
    gt = rng.uniform(1.0, 8.0, (6, 9))
    disp = 1.0 / gt
    pred = 0.37 * disp + 0.05  # any positive affine map of the true disparity
    valid = np.ones_like(gt, bool)
    np.testing.assert_allclose(disparity_to_aligned_depth(pred, gt, valid, 10.0), gt, rtol=1e-9)
