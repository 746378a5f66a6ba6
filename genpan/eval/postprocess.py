"""Panoptic post-processing: semantic logits + instance embeddings → COCO panoptic id map (paper 5.1).

The model predicts, per pixel, the spectral code concat(γ(u), γ(v)) of its instance centroid (paper
eq. 2-3, `genpan.labels.pe_target`), and 0 for void/stuff. Post-processing:

1. decode: each embedding goes to the nearest point of a G×G grid of centroids. Every grid code has
   ‖γ(u_a)‖² = ‖γ(v_b)‖² = L, so ‖e − [γ(u_a), γ(v_b)]‖² = (‖e_u‖² − 2 e_u·γ(u_a) + L)
   + (‖e_v‖² − 2 e_v·γ(v_b) + L): the u and v argmins are independent (G + G candidates, not G²).
2. thing pixels: by default those whose semantic argmax is a thing class; optionally the paper's
   zero-vector test (void where 0 is nearer than every grid code).
3. group thing pixels by grid cell; optionally merge groups on adjacent occupied cells (connected
   components of the G×G occupancy grid), which absorbs the jitter of the high harmonics. Only cells
   holding a minimum number of pixels bridge components: at 480² a noisy instance's tails reach far
   cells by a pixel or two, and one-pixel bridges chain distinct instances together.
4. score each group: mean thing probability of the semantic head × mean agreement, where a pixel's
   agreement is max(0, cos(e, code of its decoded cell)) — scale-free, so an under-trained model
   whose outputs shrink toward 0 still scores by direction.
5. matrix NMS (SOLOv2 / Painter, gaussian kernel) on the group masks, top-k, score threshold; then
   paint instances in decayed-score order; an instance keeps the pixels not taken by a better one
   when they are at least `overlap_threshold` of its mask.
6. class each instance by majority vote of the semantic head restricted to thing classes.
7. stuff from the semantic argmax where no instance is; connected components of a stuff class
   smaller than the minimum stuff area become void; what is left of a class is one segment (the COCO
   panoptic convention: one stuff segment per class and image).

All masks and the NMS live on the G×G cell grid (a group's mask is the set of its cells, widened by
`mask_radius_cells`), so their cost does not grow with the image; only decoding and counting touch
every pixel. Quantisation limit: two instances whose centroids fall in the same grid cell share one
code and come out as one instance; with `merge_adjacent`, so do instances on touching cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from scipy import ndimage

from genpan.labels import pe_encode, pe_target
from genpan.prep.targets import instance_map, segment_stats, semantic_map

THING_MODES = ("semantic", "zero_vector")
_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass
class PostprocessConfig:
    """Every threshold of post-processing. Areas are fractions of the output image (h·w), so one
    config serves every resolution; `area_px` turns them into pixels."""

    grid_size: int = 80  # G: centroid grid per axis (Painter's 80×80)
    thing_mode: str = "semantic"  # "semantic": argmax is a thing class; "zero_vector": paper's void test
    merge_adjacent: bool = True  # merge groups on 8-adjacent occupied grid cells
    # cells holding fewer pixels than this fraction of h·w do not bridge components (they join their densest
    # neighbour): with one pixel enough, noise tails of big instances chain neighbours together
    merge_min_cell_frac: float = 2e-5  # ≈ 5 px at 480²
    mask_radius_cells: int = 1  # a group's NMS mask: its cells widened by this Chebyshev radius (empty cells add nothing)
    nms_sigma: float = 2.0  # matrix NMS gaussian kernel: decay exp(−σ·(IoU² − IoU_comp²)) (SOLOv2, Painter)
    nms_pre_top_k: int = 500  # groups entering NMS, best scores first
    nms_top_k: int = 100  # instances kept after NMS (Painter)
    score_threshold: float = 0.1  # decayed score below which an instance is dropped
    overlap_threshold: float = 0.5  # keep an instance when ≥ this fraction of its mask is not taken by a better one
    min_thing_area_frac: float = 1e-4  # ≈ 23 px at 480²; smaller instances are dropped to void
    min_stuff_area_frac: float = 4096 / (640 * 480)  # Panoptic-DeepLab's 4096 px at COCO's typical 640×480
    void_prob_threshold: float = 0.0  # pixels whose top semantic probability is below this are void (0 = off)

    def __post_init__(self) -> None:
        if self.grid_size < 2:
            raise ValueError(f"grid_size must be at least 2, got {self.grid_size}")
        if self.thing_mode not in THING_MODES:
            raise ValueError(f"thing_mode must be one of {THING_MODES}, got {self.thing_mode!r}")
        if self.mask_radius_cells < 0:
            raise ValueError(f"mask_radius_cells must be ≥ 0, got {self.mask_radius_cells}")
        if self.nms_sigma < 0 or self.nms_top_k < 1 or self.nms_pre_top_k < 1:
            raise ValueError("nms_sigma must be ≥ 0 and the NMS top-k values ≥ 1")
        for name in ("overlap_threshold", "merge_min_cell_frac", "min_thing_area_frac", "min_stuff_area_frac", "void_prob_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


def area_px(frac: float, h: int, w: int) -> int:
    """A fractional area threshold in pixels of an h×w map (at least 1)."""
    return max(1, math.ceil(frac * h * w - 1e-9))


def grid_centres(grid_size: int) -> np.ndarray:
    """Centroid coordinate of each grid cell along one axis: cell a covers [−1 + 2a/G, −1 + 2(a+1)/G)."""
    return (2.0 * (np.arange(grid_size) + 0.5) / grid_size - 1.0).astype(np.float64)


def cell_of(p: np.ndarray, grid_size: int) -> np.ndarray:
    """Grid cell index of coordinates p in [-1, 1] (the inverse of `grid_centres`)."""
    return np.clip(np.floor((np.asarray(p) + 1.0) * grid_size / 2.0), 0, grid_size - 1).astype(np.int64)


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


def _segment(seg_id: int, category_id: int, isthing: bool) -> dict[str, Any]:
    return {"id": seg_id, "category_id": int(category_id), "iscrowd": 0, "isthing": isthing, "area": 0, "bbox": [0, 0, 0, 0]}


def _group_cells(counts: np.ndarray, merge: bool, min_dense: int) -> np.ndarray:
    """(G, G) pixel counts → group label per cell (−1 where empty).

    Without merging every occupied cell is a group. With merging, cells holding at least `min_dense`
    pixels form 8-connected components; a sparser occupied cell joins the component of its most
    populated dense neighbour, or stays a group of its own.
    """
    occupied = counts > 0
    groups = np.full(counts.shape, -1, dtype=np.int64)
    if not merge:
        groups[occupied] = np.arange(int(occupied.sum()))
        return groups
    dense = counts >= min_dense
    labels, n = ndimage.label(dense, structure=np.ones((3, 3), dtype=bool))
    groups[dense] = labels[dense] - 1
    sparse = occupied & ~dense
    if sparse.any():
        G = counts.shape[0]
        pad_counts = np.pad(np.where(dense, counts, -1), 1, constant_values=-1)
        pad_groups = np.pad(groups, 1, constant_values=-1)
        best_count = np.full(counts.shape, -1, dtype=np.int64)
        best_group = np.full(counts.shape, -1, dtype=np.int64)
        for dy, dx in _NEIGHBOURS_8:
            nc = pad_counts[1 + dy : 1 + dy + G, 1 + dx : 1 + dx + G]
            ng = pad_groups[1 + dy : 1 + dy + G, 1 + dx : 1 + dx + G]
            better = nc > best_count
            best_count[better], best_group[better] = nc[better], ng[better]
        joins = sparse & (best_group >= 0)
        groups[joins] = best_group[joins]
        alone = sparse & (best_group < 0)
        groups[alone] = n + np.arange(int(alone.sum()))
    return groups


def _nms(
    group_of_cell: np.ndarray,
    counts: np.ndarray,
    prob_sum: np.ndarray,
    agree_sum: np.ndarray,
    cfg: PostprocessConfig,
    min_area: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score groups and run matrix NMS on their cell masks; groups under `min_area` pixels do not enter.

    Returns (order, masks, decayed scores): `masks` is (K, G²) bool over cells, `order` the indices
    of the kept groups best first. Score = mean thing probability × mean agreement over the group's
    own pixels.
    """
    G = cfg.grid_size
    n_groups = int(group_of_cell.max()) + 1 if group_of_cell.size else 0
    if n_groups == 0:
        return np.zeros(0, np.int64), np.zeros((0, G * G), bool), np.zeros(0)
    occupied = group_of_cell >= 0
    gid = group_of_cell[occupied]
    area = np.bincount(gid, weights=counts[occupied], minlength=n_groups)
    score = (np.bincount(gid, weights=prob_sum[occupied], minlength=n_groups) / area) * (
        np.bincount(gid, weights=agree_sum[occupied], minlength=n_groups) / area
    )
    cand = np.argsort(-score, kind="stable")
    cand = cand[area[cand] >= min_area][: cfg.nms_pre_top_k]  # noise singletons would only cost NMS time
    # a group's mask: its cells, widened by the radius around every cell (binary dilation on the grid)
    masks = np.zeros((len(cand), G, G), dtype=bool)
    where = np.full(n_groups, -1, dtype=np.int64)
    where[cand] = np.arange(len(cand))
    sel = occupied & (where[np.maximum(group_of_cell, 0)] >= 0)
    rows = where[group_of_cell[sel]]
    cells = np.flatnonzero(sel)
    masks[rows, cells // G, cells % G] = True
    if cfg.mask_radius_cells > 0:
        r = cfg.mask_radius_cells
        masks = ndimage.binary_dilation(masks, structure=np.ones((1, 2 * r + 1, 2 * r + 1), dtype=bool))
    masks = masks.reshape(len(cand), G * G)
    decayed = score[cand] * matrix_nms_decay(masks, counts, cfg.nms_sigma)
    order = np.argsort(-decayed, kind="stable")
    order = order[decayed[order] >= cfg.score_threshold][: cfg.nms_top_k]
    return order, masks, decayed


def matrix_nms_decay(masks: np.ndarray, pixel_weight: np.ndarray, sigma: float) -> np.ndarray:
    """Matrix NMS decay factors (SOLOv2, gaussian kernel) for masks sorted best score first.

    `masks` (K, M) bool over M cells, each cell weighing `pixel_weight` pixels. For j, over every
    better mask i: decay_j = min_i exp(−σ·IoU_ij²) / exp(−σ·IoU_i,max²), where IoU_i,max is i's own
    largest IoU with a mask better than i (0 for the best mask).
    """
    used = pixel_weight > 0  # empty cells add nothing: dropping them shrinks the matmul ~10×
    dense = torch.from_numpy(np.ascontiguousarray(masks[:, used], dtype=np.float64))
    weighted = dense * torch.from_numpy(pixel_weight[used].astype(np.float64))[None, :]
    # torch, not numpy: numpy's BLAS threads stall for tens of ms on a busy machine, torch obeys set_num_threads
    inter = (weighted @ dense.T).numpy()
    mask_area = weighted.sum(dim=1).numpy()
    union = mask_area[:, None] + mask_area[None, :] - inter
    iou = np.triu(np.divide(inter, union, out=np.zeros_like(inter), where=union > 0), k=1)  # row i better than col j
    iou_cmax = iou.max(axis=0) if len(iou) else np.zeros(0)
    return np.exp(-sigma * (iou**2 - iou_cmax[:, None] ** 2)).min(axis=0) if len(iou) else np.zeros(0)


def _paint(order: np.ndarray, masks: np.ndarray, counts: np.ndarray, cfg: PostprocessConfig, min_area: int) -> np.ndarray:
    """Assign cells to instances in decayed-score order → instance index per cell (−1 = none).

    An instance keeps the cells of its mask no better instance took, when they hold at least
    `overlap_threshold` of its mask's pixels and at least `min_area` pixels; indices are 0..N−1 in order.
    """
    owner = np.full(counts.shape[0], -1, dtype=np.int64)
    n = 0
    for k in order:
        mine = masks[k] & (owner < 0) & (counts > 0)
        kept = counts[mine].sum()
        total = counts[masks[k]].sum()
        if kept == 0 or kept < cfg.overlap_threshold * total or kept < min_area:
            continue
        owner[mine] = n
        n += 1
    return owner


INST_ENCODINGS = ("pe", "rgb", "uvcls")


def as_pe_embeddings(inst: np.ndarray, encoding: str = "pe", num_harmonics: int = 4, uv_bins: int = 80) -> np.ndarray:
    """Any instance head's output (K, h, w) → the PE embeddings (4L, h, w) that `postprocess` decodes.

    The appendix C baselines predict the centroid directly: "rgb" as (u01, v01, instance) with u01 = (u+1)/2,
    "uvcls" as 2·uv_bins logits (u bins then v bins; a bin's centre stands for it). Their (u, v) is encoded
    with γ, so all three encodings share one decode, one grouping and one NMS, as the ablation needs.
    """
    inst = np.asarray(inst, dtype=np.float32)
    if encoding == "pe":
        return inst
    if encoding == "rgb":
        if inst.shape[0] != 3:
            raise ValueError(f"rgb instance output needs 3 channels, got {inst.shape[0]}")
        u, v = 2.0 * inst[0] - 1.0, 2.0 * inst[1] - 1.0
    elif encoding == "uvcls":
        if inst.shape[0] != 2 * uv_bins:
            raise ValueError(f"uvcls instance output needs {2 * uv_bins} channels, got {inst.shape[0]}")
        centre = lambda logits: (logits.argmax(0).astype(np.float32) + 0.5) / uv_bins * 2.0 - 1.0  # noqa: E731
        u, v = centre(inst[:uv_bins]), centre(inst[uv_bins:])
    else:
        raise ValueError(f"unknown instance encoding {encoding!r}; choose one of {INST_ENCODINGS}")
    code = pe_target(np.clip(u, -1, 1), np.clip(v, -1, 1), np.ones(u.shape, bool), num_harmonics)
    return np.ascontiguousarray(code.transpose(2, 0, 1).astype(np.float32))


def ideal_outputs(
    pan_ids: np.ndarray,
    segments: Sequence[dict[str, Any]],
    cat_to_train: dict[int, int],
    thing_categories: set[int],
    num_classes: int,
    num_harmonics: int = 4,
    logit: float = 20.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The outputs a perfect model would give for a ground-truth map: (sem (C, h, w), inst (4L, h, w)).

    `sem` is `logit` on the pixel's train id and 0 elsewhere (all 0 on void, so void has a flat
    distribution of top probability 1/C); `inst` is pe_target of each thing pixel's instance centroid
    (crowd included, as the training targets), 0 elsewhere. Centroids are measured at this resolution.
    """
    h, w = pan_ids.shape
    sem_ids = semantic_map(pan_ids, segments, cat_to_train)
    sem = np.zeros((num_classes, h, w), dtype=np.float32)
    yy, xx = np.nonzero(sem_ids != 255)
    sem[sem_ids[yy, xx].astype(np.int64), yy, xx] = logit
    ins, index_of_segment = instance_map(pan_ids, segments, thing_categories)
    n = max(index_of_segment, default=0)
    u_of, v_of = np.zeros(n + 1), np.zeros(n + 1)
    things = [(seg, idx) for seg, idx in zip(segments, index_of_segment) if idx > 0]
    for (_, idx), st in zip(things, segment_stats(pan_ids, [int(s["id"]) for s, _ in things])):
        u_of[idx], v_of[idx] = st.centroid
    inst = pe_target(u_of[ins], v_of[ins], ins > 0, num_harmonics)  # h, w, 4L
    return sem, np.ascontiguousarray(inst.transpose(2, 0, 1).astype(np.float32))


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def resize_id_map(pan: np.ndarray, segments: list[dict[str, Any]], size: tuple[int, int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """An id map resized to `size` = (H, W) by nearest neighbour at pixel centres (output pixel y samples
    source row floor((y + 0.5)·h/H)), areas and boxes recomputed, segments that vanish dropped.

    The one resize between the model's output grid and the image: predict writes these maps and the
    sweep scores them, so a sweep's best config scores exactly what predict writes."""
    if pan.shape != tuple(size):
        H, W = size
        h, w = pan.shape
        rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
        pan = pan[rows[:, None], cols[None, :]]
    kept = [{**seg, "area": int(st.area), "bbox": [int(v) for v in st.bbox]}
            for seg, st in zip(segments, segment_stats(pan, [s["id"] for s in segments])) if st.area > 0]
    return pan, kept

