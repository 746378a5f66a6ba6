"""Reference losses against slow per-pixel loops written straight from the paper's equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genpan.train import losses as L

B, H, W = 2, 5, 7
DT = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _eds(d: float, D: float, wmin: float) -> float:
    """Eq. 5 written out."""
    return wmin + (1.0 - wmin) * math.exp(-(d * d) / (D * D))


def _gamma(p: float, n_harm: int) -> list[float]:
    """Eq. 3 written out, interleaved sin_0, cos_0, sin_1, cos_1, …"""
    out = []
    for k in range(n_harm):
        out += [math.sin(2**k * math.pi * p), math.cos(2**k * math.pi * p)]
    return out


def _pairs(h: int, w: int):
    """Every vertical and horizontal neighbour pair ((i, j), (i', j'))."""
    for i in range(h):
        for j in range(w):
            if i + 1 < h:
                yield (i, j), (i + 1, j)
            if j + 1 < w:
                yield (i, j), (i, j + 1)


# ---------------------------------------------------------------- fixtures


def instance_scene(seed: int = 0, n_harm: int = 2, channels: int | None = None):
    """Three instances (one crowd) on a 5×7 map per image, with per-pixel u/v as the trainer builds them."""
    g = _gen(seed)
    ins = torch.zeros(B, H, W, dtype=torch.long)
    ins[:, 0:2, 0:3] = 1
    ins[:, 2:5, 4:7] = 2
    ins[:, 3:5, 0:2] = 3  # crowd
    ins[1, 0:2, 0:3] = 0  # image 1 lacks instance 1
    crowd = ins == 3
    valid = (ins > 0) & ~crowd
    u = torch.zeros(B, H, W, dtype=DT)
    v = torch.zeros(B, H, W, dtype=DT)
    for b in range(B):
        for k in ins[b].unique().tolist():
            if k == 0:
                continue
            m = ins[b] == k
            u[b][m] = torch.rand(1, generator=g, dtype=DT) * 2 - 1
            v[b][m] = torch.rand(1, generator=g, dtype=DT) * 2 - 1
    dist = torch.rand(B, H, W, generator=g, dtype=DT) * 6
    c = channels if channels is not None else 4 * n_harm
    pred = (torch.randn(B, c, H, W, generator=g, dtype=DT) * 0.7).requires_grad_()
    return pred, u, v, valid, crowd, ins, dist


# ---------------------------------------------------------------- semantic


def slow_sem(logits, labels, dist, D, wmin):
    num = den = 0.0
    for b in range(logits.shape[0]):
        for i in range(logits.shape[2]):
            for j in range(logits.shape[3]):
                y = int(labels[b, i, j])
                if y == 255:
                    continue
                z = logits[b, :, i, j]
                w = _eds(float(dist[b, i, j]), D, wmin)
                num = num + w * (torch.logsumexp(z, 0) - z[y])
                den += w
    ce = num / den if den > 0 else logits.sum() * 0
    tv, count = 0.0, 0
    for b in range(logits.shape[0]):
        for (i, j), (k, m) in _pairs(logits.shape[2], logits.shape[3]):
            p = torch.softmax(logits[b, :, i, j], 0)
            tv = tv - (p * torch.log_softmax(logits[b, :, k, m], 0)).sum()
            count += 1
    return ce, tv / count


def sem_inputs(seed=0, c=4):
    g = _gen(seed)
    logits = torch.randn(B, c, H, W, generator=g, dtype=DT).requires_grad_()
    labels = torch.randint(0, c, (B, H, W), generator=g)
    labels[0, 0, :3] = 255
    labels[1, 4, 2:] = 255
    dist = torch.rand(B, H, W, generator=g, dtype=DT) * 5
    return logits, labels, dist


def test_sem_matches_slow_loop_values_and_grads():
    logits, labels, dist = sem_inputs()
    ce, tv = L.sem_ce_tv(logits, labels, dist, D=3.0, wmin=0.1)
    ce_ref, tv_ref = slow_sem(logits, labels, dist, 3.0, 0.1)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tv, tv_ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(ce + 0.3 * tv, logits)[0]
    g_ref = torch.autograd.grad(ce_ref + 0.3 * tv_ref, logits)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_sem_gradcheck():
    logits, labels, dist = sem_inputs(1, c=3)
    assert torch.autograd.gradcheck(lambda x: L.sem_ce_tv(x, labels, dist, 3.0, 0.0), (logits,))


def test_sem_all_ignore_gives_zero_ce_and_keeps_tv():
    logits, labels, dist = sem_inputs(2)
    labels = torch.full_like(labels, 255)
    ce, tv = L.sem_ce_tv(logits, labels, dist, 3.0, 0.0)
    assert ce.item() == 0.0
    assert torch.autograd.grad(ce, logits)[0].abs().max().item() == 0.0
    torch.testing.assert_close(tv, slow_sem(logits, labels, dist, 3.0, 0.0)[1])


def test_eds_wmin_one_is_unweighted_cross_entropy():
    logits, labels, dist = sem_inputs(3)
    ce, _ = L.sem_ce_tv(logits, labels, dist, 3.0, 1.0)
    torch.testing.assert_close(ce, F.cross_entropy(logits, labels, ignore_index=255))


# ---------------------------------------------------------------- instance PE


def slow_pe(pred, u, v, valid, crowd, dist, n_harm, D, wmin):
    half = 2 * n_harm
    num = den = 0.0
    for b in range(pred.shape[0]):
        for i in range(H):
            for j in range(W):
                if crowd[b, i, j]:
                    continue
                if valid[b, i, j]:
                    t = torch.tensor(_gamma(float(u[b, i, j]), n_harm) + _gamma(float(v[b, i, j]), n_harm), dtype=DT)
                else:
                    t = torch.zeros(2 * half, dtype=DT)
                d = t - pred[b, :, i, j]
                loss = 0.5 * (torch.sqrt((d[:half] ** 2).sum()) + torch.sqrt((d[half:] ** 2).sum()))
                w = _eds(float(dist[b, i, j]), D, wmin)
                num = num + w * loss
                den += w
    tv, count = 0.0, 0
    for b in range(pred.shape[0]):
        for (i, j), (k, m) in _pairs(H, W):
            tv = tv + torch.sqrt(((pred[b, :, i, j] - pred[b, :, k, m]) ** 2).sum())
            count += 1
    return num / den, tv / count


def test_pe_matches_slow_loop_values_and_grads():
    pred, u, v, valid, crowd, ins, dist = instance_scene(0, n_harm=2)
    pe, tv = L.inst_pe_tv(pred, u, v, valid, crowd, dist, 2, 4.0, 0.05)
    pe_ref, tv_ref = slow_pe(pred, u, v, valid, crowd, dist, 2, 4.0, 0.05)
    torch.testing.assert_close(pe, pe_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tv, tv_ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(pe + 0.7 * tv, pred)[0]
    g_ref = torch.autograd.grad(pe_ref + 0.7 * tv_ref, pred)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_pe_gradcheck():
    pred, u, v, valid, crowd, ins, dist = instance_scene(1, n_harm=1)
    assert torch.autograd.gradcheck(lambda x: L.inst_pe_tv(x, u, v, valid, crowd, dist, 1, 4.0, 0.0), (pred,))


def test_pe_all_void_image_pulls_towards_zero():
    pred, u, v, valid, crowd, ins, dist = instance_scene(2, n_harm=2)
    none = torch.zeros_like(valid)
    pe, _ = L.inst_pe_tv(pred, u, v, none, none, dist, 2, 4.0, 0.0)
    torch.testing.assert_close(pe, slow_pe(pred, u, v, none, none, dist, 2, 4.0, 0.0)[0])
    w = L.eds_weight(dist, 4.0, 0.0)
    norms = 0.5 * (pred[:, :4].norm(dim=1) + pred[:, 4:].norm(dim=1))
    torch.testing.assert_close(pe, (w * norms).sum() / w.sum())


# ---------------------------------------------------------------- DICE


def slow_dice(pred, u, v, valid, crowd, ins, n_harm):
    half = 2 * n_harm
    per_image = []
    for b in range(pred.shape[0]):
        labels = sorted({int(ins[b, i, j]) for i in range(H) for j in range(W) if valid[b, i, j] and ins[b, i, j] > 0})
        if not labels:
            continue
        num = den = 0.0
        for lab in labels:
            pixels = [(i, j) for i in range(H) for j in range(W) if ins[b, i, j] == lab and valid[b, i, j]]
            gu = torch.tensor(_gamma(float(u[b, pixels[0][0], pixels[0][1]]), n_harm), dtype=DT)
            gv = torch.tensor(_gamma(float(v[b, pixels[0][0], pixels[0][1]]), n_harm), dtype=DT)
            w_l = 1.0 / len(pixels)
            for i in range(H):
                for j in range(W):
                    if crowd[b, i, j]:
                        continue
                    dx = torch.sqrt(((pred[b, :half, i, j] - gu) ** 2).sum())
                    dy = torch.sqrt(((pred[b, half:, i, j] - gv) ** 2).sum())
                    p = torch.exp(-dx**2) * torch.exp(-dy**2)
                    r = 1.0 if (i, j) in pixels else 0.0
                    num = num + w_l * r * p
                    den = den + w_l * (r + p)
        per_image.append(1 - 2 * num / den)
    return sum(per_image) / len(per_image)


def test_dice_matches_slow_loop_values_and_grads():
    pred, u, v, valid, crowd, ins, dist = instance_scene(3, n_harm=2)
    # pull predictions near the codes so p is far from 0 and the test has teeth
    target = L.pe_target(u, v, valid, 2).permute(0, 3, 1, 2)
    x = (target + 0.3 * pred.detach()).requires_grad_()
    dice = L.dice_loss(x, u, v, valid, crowd, ins, 2)
    ref = slow_dice(x, u, v, valid, crowd, ins, 2)
    assert 0.05 < dice.item() < 0.95
    torch.testing.assert_close(dice, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(dice, x)[0], torch.autograd.grad(ref, x)[0], rtol=1e-8, atol=1e-12)


def test_dice_gradcheck_and_single_instance():
    pred, u, v, valid, crowd, ins, dist = instance_scene(4, n_harm=1)
    single = ins == 2
    ins1 = torch.where(single, ins, 0)
    assert torch.autograd.gradcheck(lambda p: L.dice_loss(p, u, v, single, crowd, ins1, 1), (pred,))
    torch.testing.assert_close(L.dice_loss(pred, u, v, single, crowd, ins1, 1), slow_dice(pred, u, v, single, crowd, ins1, 1))


def per_image_loop_dice(pred, u, v, valid, ignore, ins, n_harm):
    """The per-image formulation (unique ids, a matrix product per image): a second, independent reference."""
    half = 2 * n_harm
    per_image = []
    for b in range(pred.shape[0]):
        keep = ~ignore[b].reshape(-1)
        pix = pred[b].reshape(pred.shape[1], -1)[:, keep]
        labelled = valid[b].reshape(-1)[keep] & (ins[b].reshape(-1)[keep] > 0)
        if not bool(labelled.any()):
            continue
        ids, inv = torch.unique(ins[b].reshape(-1)[keep][labelled], return_inverse=True)
        area = torch.bincount(inv, minlength=len(ids)).to(pred.dtype)
        u_l = torch.zeros_like(area).index_add_(0, inv, u[b].reshape(-1)[keep][labelled]) / area
        v_l = torch.zeros_like(area).index_add_(0, inv, v[b].reshape(-1)[keep][labelled]) / area
        cu, cv = L.pe_encode(u_l, n_harm), L.pe_encode(v_l, n_harm)
        sq = ((cu[:, :, None] - pix[None, :half]) ** 2).sum(1) + ((cv[:, :, None] - pix[None, half:]) ** 2).sum(1)
        p = torch.exp(-sq)
        w_l = 1.0 / area
        own = p[inv, labelled.nonzero().squeeze(1)]
        per_image.append(1.0 - 2.0 * (w_l[inv] * own).sum() / ((w_l * area).sum() + (w_l[:, None] * p).sum()))
    return torch.stack(per_image).mean()


def test_batched_dice_equals_the_per_image_loop_with_empty_images_and_spare_slots():
    pred, u, v, valid, crowd, ins, dist = instance_scene(6, n_harm=2)
    target = L.pe_target(u, v, valid, 2).permute(0, 3, 1, 2)
    x = (target + 0.3 * pred.detach()).requires_grad_()
    empty_valid = valid.clone()
    empty_valid[1] = False  # an image with no labelled instance counts for nothing
    k = int(ins.max()) + 1
    for n in (None, k, k + 5):  # spare slots of the crowd table change nothing
        got = L.dice_loss(x, u, v, empty_valid, crowd, ins, 2, n)
        ref = per_image_loop_dice(x, u, v, empty_valid, crowd, ins, 2)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(ref, x)[0], rtol=1e-8, atol=1e-12)


def test_a_configured_task_without_targets_is_an_error():
    pred, u, v, valid, crowd, ins, dist = instance_scene(7, n_harm=2)
    cfg = L.LossConfig(num_harmonics=2, backend="torch")
    targets = {"u": u, "v": v, "valid": valid, "ignore": crowd, "dist": dist, "ins": ins}
    outputs = {"inst": pred, "sem": torch.zeros(pred.shape[0], 3, *pred.shape[2:], dtype=pred.dtype)}
    with pytest.raises(ValueError, match="task 'sem' is in the config's tasks but the batch has no 'sem' targets"):
        L.compute_losses(outputs, targets, cfg, tasks=["sem", "inst"])
    with pytest.raises(ValueError, match="task 'depth' .* no 'depth' output"):
        L.compute_losses(outputs, targets, cfg, tasks=["inst", "depth"])
    assert "inst_dice" in L.compute_losses(outputs, targets, cfg, tasks=["inst"])


def test_dice_perfect_prediction_approaches_zero_and_no_instances_is_zero():
    pred, u, v, valid, crowd, ins, dist = instance_scene(5, n_harm=4)
    perfect = L.pe_target(u, v, valid, 4).permute(0, 3, 1, 2)
    # void pixels at 0 sit at distance √L from every code: p = e^{-2L} ≈ 3e-4
    assert L.dice_loss(perfect, u, v, valid, crowd, ins, 4).item() < 1e-2
    none = torch.zeros_like(valid)
    assert L.dice_loss(pred, u, v, none, crowd, ins, 4).item() == 0.0


# ---------------------------------------------------------------- appendix C baselines


def test_rgb_baseline_matches_slow_loop_and_gradcheck():
    pred, u, v, valid, crowd, ins, dist = instance_scene(6, channels=3)
    weight = L.eds_weight(dist, 4.0, 0.0) * ~crowd
    num = den = 0.0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                if crowd[b, i, j]:
                    continue
                ok = bool(valid[b, i, j])
                t = [(float(u[b, i, j]) + 1) / 2 if ok else 0.0, (float(v[b, i, j]) + 1) / 2 if ok else 0.0, 1.0 if ok else 0.0]
                w = _eds(float(dist[b, i, j]), 4.0, 0.0)
                num = num + w * sum(abs(pred[b, c, i, j] - t[c]) for c in range(3))
                den += w
    torch.testing.assert_close(L.rgb_loss(pred, u, v, valid, weight), num / den, rtol=1e-12, atol=1e-12)
    tv = sum((pred[b, :, i, j] - pred[b, :, k, m]).abs().sum() for b in range(B) for (i, j), (k, m) in _pairs(H, W))
    torch.testing.assert_close(L.norm_tv(pred, 1.0), tv / (B * ((H - 1) * W + H * (W - 1))))
    assert torch.autograd.gradcheck(lambda p: L.rgb_loss(p, u, v, valid, weight) + L.norm_tv(p, 1.0), (pred,))


def test_uvcls_baseline_matches_slow_loop_and_gradcheck():
    bins = 5
    pred, u, v, valid, crowd, ins, dist = instance_scene(7, channels=2 * bins)
    weight = L.eds_weight(dist, 4.0, 0.2) * ~crowd
    num = den = 0.0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                if not valid[b, i, j] or crowd[b, i, j]:
                    continue
                bu = min(int((float(u[b, i, j]) + 1) / 2 * bins), bins - 1)
                bv = min(int((float(v[b, i, j]) + 1) / 2 * bins), bins - 1)
                zu, zv = pred[b, :bins, i, j], pred[b, bins:, i, j]
                ce = 0.5 * (torch.logsumexp(zu, 0) - zu[bu] + torch.logsumexp(zv, 0) - zv[bv])
                w = _eds(float(dist[b, i, j]), 4.0, 0.2)
                num = num + w * ce
                den += w
    torch.testing.assert_close(L.uvcls_loss(pred, u, v, valid, weight, bins), num / den, rtol=1e-12, atol=1e-12)
    assert L.uv_bins_of(torch.tensor([-1.0, 1.0, 0.0]), 80).tolist() == [0, 79, 40]
    assert torch.autograd.gradcheck(
        lambda p: L.uvcls_loss(p, u, v, valid, weight, bins) + L.uvcls_tv(p, bins), (pred,)
    )


# ---------------------------------------------------------------- depth


def _slow_norm(vals):
    t = sorted(vals, key=lambda x: float(x.detach()))[(len(vals) - 1) // 2]  # lower median, as torch.median
    s = sum(abs(x - t) for x in vals) / len(vals)
    return [(x - t) / s for x in vals]


def depth_inputs(seed=8):
    g = _gen(seed)
    pred = torch.rand(B, H, W, generator=g, dtype=DT).requires_grad_()
    target = torch.rand(B, H, W, generator=g, dtype=DT) + 0.1
    valid = torch.rand(B, H, W, generator=g) > 0.3
    return pred, target, valid


def test_affine_invariant_matches_slow_loop_and_gradcheck():
    pred, target, valid = depth_inputs()
    per_image = []
    for b in range(B):
        idx = [(i, j) for i in range(H) for j in range(W) if valid[b, i, j]]
        d = _slow_norm([pred[b, i, j] for i, j in idx])
        ds = _slow_norm([target[b, i, j] for i, j in idx])
        per_image.append(sum(abs(a - c) for a, c in zip(ds, d, strict=True)) / len(idx))
    ref = sum(per_image) / B
    out = L.affine_invariant_loss(pred, target, valid)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out, pred)[0], torch.autograd.grad(ref, pred)[0])
    assert torch.autograd.gradcheck(lambda p: L.affine_invariant_loss(p, target, valid), (pred,))
    # invariant to scale and shift of the prediction
    torch.testing.assert_close(L.affine_invariant_loss(3.0 * pred + 0.5, target, valid), out)


def test_silog_matches_slow_loop_and_gradcheck():
    pred, target, valid = depth_inputs(9)
    x = (pred + 0.2).detach().requires_grad_()
    per_image = []
    for b in range(B):
        ds = [math.log(float(x[b, i, j].detach())) - math.log(float(target[b, i, j])) for i in range(H) for j in range(W) if valid[b, i, j]]
        n = len(ds)
        per_image.append(sum(d * d for d in ds) / n - 0.5 * (sum(ds) / n) ** 2)
    out = L.silog_loss(x, target, valid, 0.5)
    assert out.item() == pytest.approx(sum(per_image) / B, rel=1e-12)
    assert torch.autograd.gradcheck(lambda p: L.silog_loss(p, target, valid, 0.5), (x,))
    # λ = 1 is invariant to a global scale of the prediction
    torch.testing.assert_close(L.silog_loss(2.5 * x, target, valid, 1.0), L.silog_loss(x, target, valid, 1.0))


# ---------------------------------------------------------------- combiner


def full_batch(encoding="pe", n_harm=2, bins=5, c=4):
    pred, u, v, valid, crowd, ins, dist = instance_scene(10, n_harm=n_harm,
                                                        channels={"pe": 4 * n_harm, "rgb": 3, "uvcls": 2 * bins}[encoding])
    logits, labels, _ = sem_inputs(11, c=c)
    depth_pred, disp, _ = depth_inputs(12)
    outputs = {"sem": logits, "inst": pred, "depth": depth_pred.detach()[:, None].requires_grad_()}
    targets = {"sem": labels, "dist": dist, "u": u, "v": v, "valid": valid, "ignore": crowd, "ins": ins,
               "disp": disp, "depth": disp * 5}
    return outputs, targets


@pytest.mark.parametrize("encoding", ["pe", "rgb", "uvcls"])
def test_compute_losses_total_is_weighted_sum(encoding):
    outputs, targets = full_batch(encoding)
    cfg = L.LossConfig(sem_weight=0.5, inst_weight=2.0, depth_weight=0.3, sem_tv_weight=0.1, inst_tv_weight=0.2,
                       dice_weight=0.4, D=4.0, num_harmonics=2, inst_encoding=encoding, uv_bins=5, backend="torch")
    terms = L.compute_losses(outputs, targets, cfg)
    expect = 0.5 * (terms["sem_ce"] + 0.1 * terms["sem_tv"]) + 0.3 * terms["depth"]
    inst = terms["inst_main"] + 0.2 * terms["inst_tv"]
    if encoding == "pe":
        inst = inst + 0.4 * terms["inst_dice"]
        pe, _ = L.inst_pe_tv(outputs["inst"], targets["u"], targets["v"], targets["valid"], targets["ignore"],
                             targets["dist"], 2, 4.0, 0.0)
        torch.testing.assert_close(terms["inst_main"], pe)
    else:
        assert "inst_dice" not in terms
    torch.testing.assert_close(terms["total"], expect + 2.0 * inst)
    terms["total"].backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in outputs.values())


def test_compute_losses_skips_absent_tasks_and_uses_silog():
    outputs, targets = full_batch()
    cfg = L.LossConfig(num_harmonics=2, depth_loss="silog", max_depth=4.0, backend="torch")
    terms = L.compute_losses({"depth": outputs["depth"]}, targets, cfg)
    assert set(terms) == {"depth", "total"}
    valid = targets["depth"] > 0
    torch.testing.assert_close(terms["depth"], L.silog_loss(outputs["depth"][:, 0] * 4.0, targets["depth"], valid))
    terms = L.compute_losses(outputs, {k: targets[k] for k in ("sem", "dist")}, cfg)
    assert set(terms) == {"sem_ce", "sem_tv", "total"}


def test_compute_losses_reports_bad_options_and_shapes():
    with pytest.raises(ValueError, match="inst_encoding"):
        L.LossConfig(inst_encoding="xyz")
    with pytest.raises(ValueError, match="backend"):
        L.LossConfig(backend="cuda")
    outputs, targets = full_batch()
    cfg = L.LossConfig(num_harmonics=2, backend="torch")
    with pytest.raises(ValueError, match="'sem' has shape"):
        L.compute_losses({"sem": outputs["sem"][:, :, :4]}, targets, cfg)
    with pytest.raises(ValueError, match="needs targets dist"):
        L.compute_losses({"sem": outputs["sem"]}, {"sem": targets["sem"]}, cfg)
    with pytest.raises(ValueError, match="no task"):
        L.compute_losses({}, targets, cfg)
