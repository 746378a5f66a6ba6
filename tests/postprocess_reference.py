"""Frozen copy of the per-image post-processing as it stood before the batched rewrite (commit 7c94f19).

Kept only as the reference of the equality tests (tests/test_postprocess_batch.py) and of the speed
comparison (bench/postprocess_speed.py): the library code must give the same id maps and segments.
The per-pixel part is copied; the cell-level steps it calls are the library's own.
Not imported by the library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

# the cell-level steps (grouping, NMS, painting) were not rewritten: both sides share them
from genpan.eval.postprocess import PostprocessConfig, _as_tensor, _group_cells, _nms, _paint, _segment, area_px, grid_centres
from genpan.labels import pe_encode
from genpan.prep.targets import segment_stats

_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

@dataclass
class Decoded:
    """Per-pixel decode of flattened embeddings (P pixels)."""

    a: torch.Tensor  # (P,) u cell index
    b: torch.Tensor  # (P,) v cell index
    dist2: torch.Tensor  # (P,) squared distance to the nearest grid code
    norm2: torch.Tensor  # (P,) ‖e‖², the squared distance to the void code 0
    agreement: torch.Tensor  # (P,) max(0, cos(e, nearest grid code))


def decode_embeddings(inst: Any, grid_size: int, chunk: int = 1 << 16) -> Decoded:
    """Nearest grid code of each embedding, u and v separately (paper 5.1).

    `inst` is (P, 4L) or (4L, h, w) (numpy or torch; the result is flattened row-major over h, w).
    Runs on the tensor's device, in chunks of `chunk` pixels to bound the (P, G) score tables.
    """
    emb = _as_tensor(inst)
    if emb.ndim == 3:
        emb = emb.reshape(emb.shape[0], -1).T
    emb = emb.contiguous()  # row-major pixels: each chunk's matmul reads contiguous rows
    if emb.ndim != 2 or emb.shape[1] % 4:
        raise ValueError(f"instance embeddings need 4L channels, got shape {tuple(emb.shape)}")
    emb = emb.float()
    L = emb.shape[1] // 4
    table = pe_encode(torch.from_numpy(grid_centres(grid_size)).to(emb.device, torch.float32), L)  # G, 2L
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for start in range(0, emb.shape[0], chunk):
        e = emb[start : start + chunk]
        su_max, a = row_max(e[:, : 2 * L] @ table.T)  # max dot product = min distance, since ‖γ‖² = L
        sv_max, b = row_max(e[:, 2 * L :] @ table.T)
        for part, t in zip(parts, (a, b, su_max + sv_max, (e * e).sum(dim=1))):
            part.append(t)
    a, b, dot, norm2 = (torch.cat(p) if p else torch.zeros(0, device=emb.device) for p in parts)
    dist2 = (norm2 - 2.0 * dot + 2.0 * L).clamp_min(0.0)
    code_norm = math.sqrt(2.0 * L)  # ‖[γ(u), γ(v)]‖
    agreement = (dot / (norm2.sqrt() * code_norm).clamp_min(1e-12)).clamp(0.0, 1.0)
    return Decoded(a.long(), b.long(), dist2, norm2, agreement)


def row_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, first argmax) of each row of a (P, G) table, as `scores.max(dim=1)`.

    On the CPU torch's max-with-indices runs ~4× slower than numpy's vectorised argmax along a row
    (measured at P = 65536, G = 80), so the index comes from numpy and the value from a gather.
    """
    if scores.device.type != "cpu" or scores.shape[1] == 0:
        return scores.max(dim=1)
    index = torch.from_numpy(scores.detach().numpy().argmax(axis=1))
    return scores.gather(1, index[:, None]).squeeze(1), index


def top_class(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top logit, first top class) of each pixel of (C, P) logits, as `logits.max(dim=0)`.

    On the CPU a max-with-indices across the outer dimension is ~8× slower than `amax` (306 vs 37 ms
    for C = 133 at 480²); the first class reaching the max is found by filling from the last class down.
    """
    if logits.device.type != "cpu" or logits.shape[0] == 0:
        return logits.max(dim=0)
    top = logits.amax(dim=0)
    label = torch.empty(logits.shape[1], dtype=torch.long)
    for c in range(logits.shape[0] - 1, -1, -1):
        label.masked_fill_(logits[c] == top, c)
    return top, label


def take_columns(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x[:, mask]` for a (C, P) tensor; on the CPU numpy's take along axis 1 is ~3× faster than
    torch's boolean or index_select gather across the inner dimension (C = 133 at 480²)."""
    if x.device.type != "cpu":
        return x[:, mask]
    return torch.from_numpy(np.take(x.detach().numpy(), np.flatnonzero(mask.numpy()), axis=1))


def postprocess(
    sem: Any,
    inst: Any,
    train_to_category: Sequence[int],
    thing_train_ids: set[int],
    config: PostprocessConfig | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image's model outputs → (pan_ids (h, w) int32, segments_info) in COCO panoptic form.

    `sem` (C, h, w) logits over contiguous train ids, `inst` (4L, h, w) embeddings, numpy or torch
    (any device). Segment ids run 1..N (things first, in decayed-score order, then stuff); 0 is void.
    """
    cfg = config or PostprocessConfig()
    sem_t, inst_t = _as_tensor(sem).float(), _as_tensor(inst).float()
    if sem_t.ndim != 3 or inst_t.ndim != 3 or sem_t.shape[1:] != inst_t.shape[1:]:
        raise ValueError(f"sem (C, h, w) and inst (4L, h, w) must share h, w; got {tuple(sem_t.shape)}, {tuple(inst_t.shape)}")
    C, h, w = sem_t.shape
    if len(train_to_category) != C:
        raise ValueError(f"train_to_category has {len(train_to_category)} entries for {C} semantic channels")
    G = cfg.grid_size
    is_thing_class = torch.zeros(C, dtype=torch.bool, device=sem_t.device)
    thing_ids = sorted(int(t) for t in thing_train_ids if 0 <= int(t) < C)
    is_thing_class[thing_ids] = True

    logits = sem_t.reshape(C, -1)  # C, P
    top_logit, label = top_class(logits)
    if cfg.void_prob_threshold > 0:  # top probability = 1 / Σ exp(l − l_max)
        confident = (logits - top_logit).exp().sum(dim=0) <= 1.0 / cfg.void_prob_threshold
    else:
        confident = torch.ones_like(label, dtype=torch.bool)
    dec = decode_embeddings(inst_t, G)
    if cfg.thing_mode == "semantic":
        thing = is_thing_class[label]
    else:
        thing = dec.norm2 > dec.dist2  # zero vector farther than the nearest grid code
    thing &= confident
    if not thing_ids:  # no thing class to vote for: nothing can become an instance
        thing &= False

    # class statistics only where they are used: on thing pixels (C reductions over P are the cost)
    thing_logits = take_columns(logits, thing)  # C, P_thing
    # Σ over thing classes of the softmax, in one exp pass shifted by the top logit already at hand; the
    # (2, C) @ (C, P) product sums the thing rows and all rows at once without gathering either
    shifted = (thing_logits - top_logit[thing]).exp_()
    sums = torch.stack([is_thing_class, torch.ones_like(is_thing_class)]).to(shifted.dtype) @ shifted
    thing_prob = sums[0] / sums[1]
    thing_label = None
    if thing_ids and cfg.thing_mode == "semantic":
        # a thing pixel's top class is a thing class, so it is also its top thing class: no second argmax
        position = torch.full((C,), -1, dtype=torch.long, device=sem_t.device)
        position[thing_ids] = torch.arange(len(thing_ids), device=sem_t.device)
        thing_label = position[label[thing]].cpu().numpy()
    elif thing_ids:
        thing_label = thing_logits[is_thing_class].argmax(dim=0).cpu().numpy()

    # per-cell statistics of thing pixels: the only per-pixel reductions grouping needs
    cell = dec.b * G + dec.a  # row-major over (v, u)
    tcell = cell[thing]
    counts = torch.bincount(tcell, minlength=G * G).cpu().numpy()
    prob_sum = torch.bincount(tcell, weights=thing_prob.double(), minlength=G * G).cpu().numpy()
    agree_sum = torch.bincount(tcell, weights=dec.agreement[thing].double(), minlength=G * G).cpu().numpy()

    min_dense = area_px(cfg.merge_min_cell_frac, h, w)
    group_of_cell = _group_cells(counts.reshape(G, G), cfg.merge_adjacent, min_dense).reshape(-1)  # −1 = empty
    min_thing = area_px(cfg.min_thing_area_frac, h, w)
    order, masks, _ = _nms(group_of_cell, counts, prob_sum, agree_sum, cfg, min_thing)
    owner_of_cell = _paint(order, masks, counts, cfg, min_thing)

    pan = np.zeros(h * w, dtype=np.int32)
    thing_np = thing.cpu().numpy()
    owner_px = np.full(h * w, -1, dtype=np.int64)
    owner_thing = owner_of_cell[tcell.cpu().numpy()]
    owner_px[thing_np] = owner_thing
    segments: list[dict[str, Any]] = []
    n_inst = int(owner_of_cell.max()) + 1 if owner_of_cell.size else 0
    claimed = owner_px >= 0
    if n_inst:  # every painted instance holds pixels, so ids 1..n_inst are all used
        n_thing = len(thing_ids)
        voters = owner_thing >= 0
        votes = np.bincount(owner_thing[voters] * n_thing + thing_label[voters], minlength=n_inst * n_thing)
        winners = votes.reshape(n_inst, n_thing).argmax(axis=1)
        pan[claimed] = owner_px[claimed] + 1
        segments = [_segment(k + 1, train_to_category[thing_ids[int(winners[k])]], True) for k in range(n_inst)]
    next_id = n_inst + 1

    # stuff: unclaimed, confident pixels whose argmax is a stuff class
    label_np = label.cpu().numpy()
    free = (owner_px < 0) & confident.cpu().numpy() & ~is_thing_class.cpu().numpy()[label_np]
    min_stuff = area_px(cfg.min_stuff_area_frac, h, w)
    class_area = np.bincount(label_np[free], minlength=C)
    for cls in np.flatnonzero(class_area >= min_stuff):  # a class smaller in total has no component to keep
        region = (free & (label_np == cls)).reshape(h, w).astype(np.uint8)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
        keep = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_stuff)
        keep = keep[keep > 0]  # component 0 is the background
        if keep.size == 0:
            continue
        pan[np.isin(comp.reshape(-1), keep)] = next_id
        segments.append(_segment(next_id, train_to_category[int(cls)], False))
        next_id += 1

    pan = pan.reshape(h, w)
    for seg, st in zip(segments, segment_stats(pan, [s["id"] for s in segments])):
        seg["area"], seg["bbox"] = st.area, list(st.bbox)
    return pan, segments
