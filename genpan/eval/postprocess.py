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

3'. (`decoder = "soft_vote"`, instead of 3-5) every thing pixel votes for its decoded cell with its
   agreement; the local maxima of the G×G vote histogram (maximum of a (2r+1)² window, ties to the first
   cell in row-major order, at least `vote_min_frac`·h·w votes in the window) are the instance centres;
   each thing pixel joins the centre whose code is nearest its embedding (if it points toward it). An
   instance is scored as a group is; small or low-scoring ones are dropped, no NMS is needed.

`postprocess_batch` takes (B, C, h, w) and (B, 4L, h, w) on any device and runs every per-pixel step
there, batched; the per-cell grouping and NMS, the stuff connected components (one OpenCV call per
stuff class, on the class's bounding box) and the segment statistics run on the CPU. `postprocess` is
a batch of one. On the CPU the class pass goes block by block over pixels, so the logits are read from
memory once, and the thing probability of a confident pixel comes as tight bounds from its top thing
and top stuff logits instead of C exps; an image whose rankings (NMS order, score threshold) the bounds
cannot settle is scored again with exact probabilities, so the decisions are those of the exact scores.

All masks and the NMS live on the G×G cell grid (a group's mask is the set of its cells, widened by
`mask_radius_cells`), so their cost does not grow with the image; only decoding and counting touch
every pixel. Quantisation limit: two instances whose centroids fall in the same grid cell share one
code and come out as one instance; with `merge_adjacent`, so do instances on touching cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from scipy import ndimage

from genpan.labels import pe_encode, pe_target
from genpan.prep.targets import instance_map, segment_stats, semantic_map

THING_MODES = ("semantic", "zero_vector")
DECODERS = ("group", "soft_vote")
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
    # "group": cells → groups → matrix NMS (steps 3-5); "soft_vote": vote-histogram peaks as centres (step 3')
    decoder: str = "group"
    vote_radius_cells: int = 1  # soft_vote: a centre is the maximum of its (2r+1)² window of the vote histogram
    vote_min_frac: float = 1e-4  # soft_vote: a centre's window holds at least this fraction of h·w in votes

    def __post_init__(self) -> None:
        if self.grid_size < 2:
            raise ValueError(f"grid_size must be at least 2, got {self.grid_size}")
        if self.thing_mode not in THING_MODES:
            raise ValueError(f"thing_mode must be one of {THING_MODES}, got {self.thing_mode!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.mask_radius_cells < 0 or self.vote_radius_cells < 0:
            raise ValueError(f"mask_radius_cells and vote_radius_cells must be ≥ 0, got {self.mask_radius_cells}, {self.vote_radius_cells}")
        if self.nms_sigma < 0 or self.nms_top_k < 1 or self.nms_pre_top_k < 1:
            raise ValueError("nms_sigma must be ≥ 0 and the NMS top-k values ≥ 1")
        for name in ("overlap_threshold", "merge_min_cell_frac", "min_thing_area_frac", "min_stuff_area_frac", "void_prob_threshold",
                     "vote_min_frac"):
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


def decode_embeddings(inst: Any, grid_size: int, chunk: int = 4096) -> Decoded:
    """Nearest grid code of each embedding, u and v separately (paper 5.1).

    `inst` is (P, 4L) or (4L, h, w) (numpy or torch; the result is flattened row-major over h, w).
    Runs on the tensor's device, in chunks of `chunk` pixels: the (chunk, G) score tables stay in cache.
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
    table_t = table.T.contiguous()  # a contiguous right operand and a reused output: ~2× faster products at K = 2L
    scores = torch.empty((2 * min(chunk, emb.shape[0]), grid_size), device=emb.device)
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for start in range(0, emb.shape[0], chunk):
        e = emb[start : start + chunk]
        # one product for both halves: the (n, 4L) rows read as (2n, 2L) alternate u and v codes
        s = torch.mm(e.reshape(-1, 2 * L), table_t, out=scores[: 2 * e.shape[0]])
        best, cell = row_max(s)  # max dot product = min distance, since ‖γ‖² = L
        best, cell = best.view(-1, 2), cell.view(-1, 2)
        for part, t in zip(parts, (cell[:, 0], cell[:, 1], best[:, 0] + best[:, 1], (e * e).sum(dim=1))):
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
    A batch of one through `postprocess_batch`.
    """
    sem_t, inst_t = _as_tensor(sem), _as_tensor(inst)
    if sem_t.ndim != 3 or inst_t.ndim != 3 or sem_t.shape[1:] != inst_t.shape[1:]:
        raise ValueError(f"sem (C, h, w) and inst (4L, h, w) must share h, w; got {tuple(sem_t.shape)}, {tuple(inst_t.shape)}")
    return postprocess_batch(sem_t[None], inst_t[None], train_to_category, thing_train_ids, config)[0]


def postprocess_batch(
    sem: Any,
    inst: Any,
    train_to_category: Sequence[int],
    thing_train_ids: set[int],
    config: PostprocessConfig | None = None,
) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
    """A batch of model outputs → one (pan_ids (h, w) int32, segments_info) per image.

    `sem` (B, C, h, w) logits, `inst` (B, 4L, h, w) embeddings, numpy or torch on any device. Every
    per-pixel step (class pass, decode, cell statistics, class vote, stuff map) runs batched on the
    tensors' device; the per-cell grouping and NMS, the stuff connected components and the segment
    statistics run on the CPU. Each image's result equals `postprocess` on that image alone.
    """
    cfg = config or PostprocessConfig()
    sem_t, inst_t = _as_tensor(sem).float(), _as_tensor(inst).float()
    if sem_t.ndim != 4 or inst_t.ndim != 4 or sem_t.shape[0] != inst_t.shape[0] or sem_t.shape[2:] != inst_t.shape[2:]:
        raise ValueError(f"sem (B, C, h, w) and inst (B, 4L, h, w) must share B, h, w; got {tuple(sem_t.shape)}, {tuple(inst_t.shape)}")
    if inst_t.shape[1] % 4:
        raise ValueError(f"instance embeddings need 4L channels, got {inst_t.shape[1]}")
    B, C, h, w = sem_t.shape
    if len(train_to_category) != C:
        raise ValueError(f"train_to_category has {len(train_to_category)} entries for {C} semantic channels")
    if B == 0:
        return []
    dev = sem_t.device
    inst_t = inst_t.to(dev)
    G, P = cfg.grid_size, h * w
    thing_ids = sorted(int(t) for t in thing_train_ids if 0 <= int(t) < C)
    is_thing_class = torch.zeros(C, dtype=torch.bool, device=dev)
    is_thing_class[thing_ids] = True
    logits = sem_t.reshape(B, C, P)
    emb = inst_t.reshape(B, inst_t.shape[1], P)

    dec_all = None
    if cfg.thing_mode == "zero_vector":  # the thing test needs every pixel's decode
        dec_all = _cat_decoded([decode_embeddings(emb[i].T, G) for i in range(B)])
        from_embedding = (dec_all.norm2 > dec_all.dist2).reshape(B, P)  # zero vector farther than the nearest grid code
    else:
        from_embedding = None
    px = class_pass(logits, is_thing_class, from_embedding, cfg.void_prob_threshold, bool(thing_ids))
    tidx = px.thing.reshape(-1).nonzero().squeeze(1)  # thing pixels, image-major then row-major
    img = tidx // P
    rows = gather_pixels(emb, px.thing) if dec_all is None or cfg.decoder == "soft_vote" else None
    dec = _gather_decoded(dec_all, tidx) if dec_all is not None else decode_embeddings(rows, G)
    if px.thing_label is not None:
        thing_label = px.thing_label
    else:  # a thing pixel's top class is a thing class, so it is also its top thing class: no second argmax
        position = torch.full((C,), -1, dtype=torch.long, device=dev)
        position[thing_ids] = torch.arange(len(thing_ids), device=dev)
        thing_label = position[px.label.reshape(-1)[tidx]]
    gcell = img * (G * G) + dec.b * G + dec.a  # image-major, then row-major over (v, u)

    if cfg.decoder == "group":
        owner, n_inst = _decode_groups(gcell, px.thing_prob, dec.agreement, B, h, w, cfg)
    else:
        owner, n_inst = _decode_soft_vote(rows, gcell, img, px.thing_prob, dec.agreement, B, h, w, cfg)

    # class vote: one bincount over (instance of the batch, thing class)
    n_thing = max(len(thing_ids), 1)
    offset_np = np.concatenate([[0], np.cumsum(n_inst)[:-1]]).astype(np.int64)
    offset = torch.from_numpy(offset_np).to(dev)
    voters = (owner >= 0).nonzero().squeeze(1)  # indices once: a boolean mask per gather costs a scan each
    owner_v = owner[voters]
    gid = owner_v + offset[img[voters]]
    total = int(sum(n_inst))
    votes = torch.bincount(gid * n_thing + thing_label[voters], minlength=total * n_thing).cpu().numpy()
    winners = votes.reshape(total, n_thing).argmax(axis=1) if total else np.zeros(0, np.int64)

    pan = torch.zeros(B * P, dtype=torch.int32, device=dev)
    pan[tidx[voters]] = (owner_v + 1).to(torch.int32)
    pan = pan.reshape(B, P)
    # stuff candidates: unclaimed, confident pixels whose argmax is a stuff class (class C = none)
    free = (pan == 0) & ~is_thing_class[px.label]
    if px.confident is not None:
        free &= px.confident
    stuff = torch.where(free, px.label, torch.full_like(px.label, C))
    base = torch.arange(B, device=dev)[:, None] * (C + 1)
    class_area = torch.bincount((stuff + base).reshape(-1), minlength=B * (C + 1)).reshape(B, C + 1)[:, :C].cpu().numpy()
    stuff_np = stuff.to(torch.int32 if C + 1 > 32767 else torch.int16).cpu().numpy()
    pan_np = pan.cpu().numpy()

    min_stuff = area_px(cfg.min_stuff_area_frac, h, w)
    results = []
    for i in range(B):
        k0 = int(offset_np[i])
        segments = [_segment(k + 1, train_to_category[thing_ids[int(winners[k0 + k])]], True) for k in range(n_inst[i])]
        next_id = n_inst[i] + 1
        pan_i = pan_np[i].reshape(h, w)
        stuff_i = stuff_np[i].reshape(h, w)
        for cls in np.flatnonzero(class_area[i] >= min_stuff):  # a class smaller in total has no component to keep
            mask = stuff_i == cls
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # components on the class's bounding box only
            _, comp, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(mask[box]).view(np.uint8), connectivity=8)
            keep = stats[:, cv2.CC_STAT_AREA] >= min_stuff
            keep[0] = False  # component 0 is the background
            if not keep.any():
                continue
            pan_i[box][keep[comp]] = next_id
            segments.append(_segment(next_id, train_to_category[int(cls)], False))
            next_id += 1
        for seg, st in zip(segments, segment_stats(pan_i, [s["id"] for s in segments])):
            seg["area"], seg["bbox"] = st.area, list(st.bbox)
        results.append((pan_i, segments))
    return results


@dataclass
class ThingProb:
    """Σ over thing classes of the softmax at the thing pixels (Nt,), image-major, as bounds lo ≤ p ≤ hi.

    The CPU pass bounds p from the top thing and top stuff logits alone where that pins it down (a
    confident pixel's p is 1 − O(e^−gap)) and computes it elsewhere; `exact` gives one image's exact
    values when the bounds leave a decision open. `exact is None`: lo is hi, the exact values.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    exact: Callable[[int], torch.Tensor] | None = None  # image i → exact p of its thing pixels

    @staticmethod
    def of(p: torch.Tensor) -> ThingProb:
        return ThingProb(p, p)


@dataclass
class ClassPass:
    """Per-pixel semantic results of a batch (B images of P pixels; Nt thing pixels over the batch)."""

    label: torch.Tensor  # (B, P) long: first top class
    confident: torch.Tensor | None  # (B, P) bool: top probability ≥ the void threshold (None: threshold off)
    thing: torch.Tensor  # (B, P) bool: thing pixels
    thing_prob: ThingProb  # (Nt,) Σ over thing classes of the softmax, thing pixels image-major
    thing_label: torch.Tensor | None  # (Nt,) top thing class as a position among the thing ids (zero_vector mode only)


def class_pass(
    logits: torch.Tensor, is_thing_class: torch.Tensor, from_embedding: torch.Tensor | None, void_prob_threshold: float, any_thing: bool
) -> ClassPass:
    """The only passes over the (B, C, P) logits: top class, void test, thing test, thing probability.

    The thing test is "top class is a thing class", or `from_embedding` (B, P) when given (then the top
    thing class is also returned). On the CPU the work goes block by block over pixels, so each block
    is read from memory once and every later step on it hits the cache.
    """
    if cpu_fast_path(logits):
        parts = [_class_pass_cpu(logits[i], is_thing_class.numpy(), None if from_embedding is None else from_embedding[i].numpy(),
                                 void_prob_threshold, any_thing) for i in range(logits.shape[0])]
        conf = torch.stack([p.confident for p in parts]) if void_prob_threshold > 0 else None
        zl = torch.cat([p.thing_label for p in parts]) if from_embedding is not None else None
        prob = ThingProb(torch.cat([p.thing_prob.lo for p in parts]), torch.cat([p.thing_prob.hi for p in parts]),
                         lambda i: parts[i].thing_prob.exact(0))
        return ClassPass(torch.stack([p.label for p in parts]), conf, torch.stack([p.thing for p in parts]), prob, zl)
    top, label = logits.max(dim=1)
    confident = None
    if void_prob_threshold > 0:  # top probability = 1 / Σ exp(l − l_max)
        confident = (logits - top[:, None]).exp().sum(dim=1) <= 1.0 / void_prob_threshold
    thing = is_thing_class[label] if from_embedding is None else from_embedding.clone()
    if confident is not None:
        thing &= confident
    if not any_thing:  # no thing class to vote for: nothing can become an instance
        thing &= False
    rows = logits.transpose(1, 2)[thing]  # Nt, C
    shifted = (rows - top[thing][:, None]).exp()
    weight = torch.stack([is_thing_class, torch.ones_like(is_thing_class)]).to(shifted.dtype)
    sums = shifted @ weight.T
    thing_label = rows[:, is_thing_class].argmax(dim=1) if from_embedding is not None and any_thing else None
    if from_embedding is not None and thing_label is None:
        thing_label = torch.zeros(0, dtype=torch.long, device=logits.device)
    return ClassPass(label, confident, thing, ThingProb.of(sums[:, 0] / sums[:, 1]), thing_label)


def cpu_fast_path(x: torch.Tensor) -> bool:
    """Whether the per-pixel passes take the numpy block path (CPU tensors) or plain torch (any device)."""
    return x.device.type == "cpu"


CPU_BLOCK = 8192  # pixels per block: 133 classes × 8192 px of float32 ≈ 4 MB; measured 20 % faster than 2048 or 16384 at 480²
# a pixel whose bounds on the thing probability are wider than this gets the exact value
PROB_BOUND_WIDTH = 1e-4


def _class_pass_cpu(
    logits: torch.Tensor, is_thing_class: np.ndarray, from_embedding: np.ndarray | None, void_prob_threshold: float, any_thing: bool,
    block: int = CPU_BLOCK,
) -> ClassPass:
    """`class_pass` of one image (C, P) on the CPU, block by block. The thing probability comes as
    bounds from the top thing and top stuff logits (`prob_bounds`), exact where those are loose."""
    lg = logits.detach().numpy()
    C, P = lg.shape
    label = np.empty(P, np.int64)
    top_all = np.empty(P, np.float32)
    thing = np.zeros(P, bool)
    confident = np.empty(P, bool) if void_prob_threshold > 0 else None
    exact_p = ExactThingProb(is_thing_class, block)
    thing_runs, stuff_runs = class_runs(is_thing_class), class_runs(~is_thing_class)
    n_thing = int(is_thing_class.sum())
    thing_rows = np.flatnonzero(is_thing_class)
    scratch = TopClassScratch(C, block)
    los: list[np.ndarray] = []
    his: list[np.ndarray] = []
    zlabels: list[np.ndarray] = []
    for j in range(0, P, block):
        b = lg[:, j : j + block]
        n = b.shape[1]
        top_t, top_s = runs_max(b, thing_runs), runs_max(b, stuff_runs)
        top = np.maximum(top_t, top_s)
        lab = scratch.first_top(b, top)
        label[j : j + n], top_all[j : j + n] = lab, top
        tb = is_thing_class[lab] if from_embedding is None else from_embedding[j : j + n].copy()
        if confident is not None:  # same torch reduction as over the whole image: identical sums
            cb = (torch.from_numpy(b) - torch.from_numpy(top)).exp().sum(dim=0).numpy() <= 1.0 / void_prob_threshold
            confident[j : j + n] = cb
            tb &= cb
        if not any_thing:
            continue
        thing[j : j + n] = tb
        cols = np.flatnonzero(tb)
        if cols.size == 0:
            continue
        if from_embedding is not None:  # top thing class, on the logits themselves (l − l_max can round two apart to a tie)
            zlabels.append(b[np.ix_(thing_rows, cols)].argmax(axis=0))
        lo, hi = prob_bounds(top_t[cols], top_s[cols], n_thing, C - n_thing)
        loose = ~(hi - lo <= PROB_BOUND_WIDTH)  # NaN bounds too
        if loose.any():
            mask = np.zeros(n, bool)
            mask[cols[loose]] = True
            lo[loose] = hi[loose] = exact_p.of_block(b, top, mask)
        los.append(lo)
        his.append(hi)
    zl = torch.from_numpy(np.concatenate(zlabels).astype(np.int64)) if zlabels else torch.zeros(0, dtype=torch.long)
    prob = ThingProb(_cat_or_empty(los), _cat_or_empty(his), lambda _: exact_p.of_image(lg, top_all, thing))
    return ClassPass(torch.from_numpy(label), None if confident is None else torch.from_numpy(confident), torch.from_numpy(thing),
                     prob, zl if from_embedding is not None else None)


def _cat_or_empty(parts: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.float64)


def class_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive True entries of a (C,) bool mask."""
    edges = np.flatnonzero(np.diff(rows, prepend=False, append=False))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def runs_max(b: np.ndarray, runs: list[tuple[int, int]]) -> np.ndarray:
    """Max over the rows in `runs` of each column of a (C, n) block (−inf without rows): row slices
    keep numpy's fast column-wise reduction, which a fancy row index would turn into a copy."""
    out = None
    for s, e in runs:
        m = b[s:e].max(axis=0)
        out = m if out is None else np.maximum(out, m, out=out)
    return np.full(b.shape[1], -np.inf, np.float32) if out is None else out


def prob_bounds(top_thing: np.ndarray, top_stuff: np.ndarray, n_thing: int, n_stuff: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on p = S_t / (S_t + S_s), S = Σ exp(l − l_max) over thing (stuff) classes, from the top
    thing and top stuff logits alone: e^(m_t − l_max) ≤ S_t ≤ n_t e^(m_t − l_max), likewise for S_s, so
    with x = e^(m_s − m_t): 1 / (1 + n_s x) ≤ p ≤ 1 / (1 + x / n_t). Float64: the bounds themselves are exact
    to ~1e-16, far inside the slack the decisions allow."""
    x = np.exp(top_stuff.astype(np.float64) - top_thing)
    with np.errstate(invalid="ignore", over="ignore"):
        return 1.0 / (1.0 + n_stuff * x), 1.0 / (1.0 + x / max(n_thing, 1))


class ExactThingProb:
    """The exact thing probability of chosen columns of (C, n) blocks: gather them shifted by the top
    logit, exp, and one (2, C) @ (C, k) product for Σ over thing classes and over all classes."""

    def __init__(self, is_thing_class: np.ndarray, block: int) -> None:
        self.weight = torch.from_numpy(np.stack([is_thing_class, np.ones_like(is_thing_class)]).astype(np.float32))
        self.buf = np.empty((len(is_thing_class), block), np.float32)
        self.block = block

    def of_block(self, b: np.ndarray, top: np.ndarray, mask: np.ndarray) -> np.ndarray:
        k = _gather_shifted(b, top, mask, self.buf)
        sums = self.weight @ torch.from_numpy(self.buf[:, :k]).exp_()
        return (sums[0] / sums[1]).numpy().astype(np.float64)

    def of_image(self, lg: np.ndarray, top: np.ndarray, thing: np.ndarray) -> torch.Tensor:
        """Exact p of every thing pixel of one image (C, P), in the class pass's blocks."""
        parts = [self.of_block(lg[:, j : j + self.block], top[j : j + self.block], thing[j : j + self.block])
                 for j in range(0, lg.shape[1], self.block) if thing[j : j + self.block].any()]
        return _cat_or_empty(parts)


def _gather_shifted(b: np.ndarray, top: np.ndarray, mask: np.ndarray, out: np.ndarray, max_runs: int = 64) -> int:
    """out[:, :k] = b[:, mask] − top[mask] for the k columns where `mask` holds; returns k.

    Thing pixels come in runs along image rows, so a few slice subtractions gather and shift at
    once; a ragged mask (many short runs) takes numpy's column take instead.
    """
    edges = np.flatnonzero(np.diff(mask, prepend=False, append=False))
    starts, ends = edges[0::2], edges[1::2]
    k = int((ends - starts).sum())
    if k == 0:
        return 0
    if len(starts) > max_runs:
        cols = np.flatnonzero(mask)
        np.take(b, cols, axis=1, out=out[:, :k])
        out[:, :k] -= top[cols]
        return k
    at = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        np.subtract(b[:, s:e], top[s:e], out=out[:, at : at + e - s])
        at += e - s
    return k


class TopClassScratch:
    """(top logit, first top class) of each column of (C, n) float32 blocks, as `logits.max(dim=0)`.

    max-with-index across the outer dimension is ~8× slower than a plain max on the CPU, in numpy as in
    torch. So: the max, then a key that is C − c where a class reaches it and 0 elsewhere, whose max
    gives the first such class; the key is uint8 for C < 256, so the second and third passes are cheap.
    """

    def __init__(self, num_classes: int, block: int) -> None:
        kind = np.uint8 if num_classes < 256 else np.uint16 if num_classes < 65536 else np.int64
        self.C = num_classes
        self.weight = (num_classes - np.arange(num_classes)).astype(kind)[:, None]
        self.eq = np.empty((num_classes, block), bool)
        self.key = np.empty((num_classes, block), kind)
        self.kind = kind

    def top_class(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        top = b.max(axis=0)
        return top, self.first_top(b, top)

    def first_top(self, b: np.ndarray, top: np.ndarray) -> np.ndarray:
        """First class reaching `top` (the column maxima of b) in each column."""
        n = b.shape[1]
        eq, key = self.eq[:, :n], self.key[:, :n]
        np.equal(b, top, out=eq)
        # bool as uint8 (0/1) times the weights: an integer multiply with no cast loop
        np.multiply(eq.view(np.uint8) if self.kind is np.uint8 else eq, self.weight, out=key)
        first = key.max(axis=0).astype(np.int64)
        return self.C - np.maximum(first, 1)  # a NaN column matches no class: the last class


def top_class(logits: torch.Tensor, block: int = CPU_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(top logit, first top class) of each pixel of (C, P) logits, as `logits.max(dim=0)`."""
    if logits.device.type != "cpu" or logits.shape[0] == 0:
        return logits.max(dim=0)
    lg = logits.detach().float().numpy()
    scratch = TopClassScratch(lg.shape[0], block)
    parts = [scratch.top_class(lg[:, j : j + block]) for j in range(0, lg.shape[1], block)]
    if not parts:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate([p[0] for p in parts])), torch.from_numpy(np.concatenate([p[1] for p in parts]))


def gather_pixels(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows (N, K) of the pixels where `mask` (B, P) holds, from (B, K, P) maps, image-major.

    On the CPU torch's index_select along the pixel axis (~3× faster than numpy's take there), then one
    small numpy transpose (~3× faster than torch's), beat a boolean gather across the inner dimension."""
    if not cpu_fast_path(x):
        return x.transpose(1, 2)[mask].contiguous()
    parts = [x[i].detach().index_select(1, torch.from_numpy(np.flatnonzero(mask[i].numpy()))).numpy().T for i in range(x.shape[0])]
    if not parts:
        return torch.zeros((0, x.shape[1]))
    return torch.from_numpy(np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts)))


def _cat_decoded(parts: list[Decoded]) -> Decoded:
    return Decoded(*(torch.cat([getattr(p, f) for p in parts]) for f in ("a", "b", "dist2", "norm2", "agreement")))


def _gather_decoded(dec: Decoded, index: torch.Tensor) -> Decoded:
    return Decoded(*(getattr(dec, f)[index] for f in ("a", "b", "dist2", "norm2", "agreement")))


def _decode_groups(
    gcell: torch.Tensor, thing_prob: ThingProb, agreement: torch.Tensor, B: int, h: int, w: int, cfg: PostprocessConfig
) -> tuple[torch.Tensor, list[int]]:
    """Grouping decoder: cells → groups → matrix NMS → painted instances (steps 3-5).

    Returns the instance of every thing pixel (its image's 0..n−1, −1 = none) and n per image. The
    per-cell sums are one bincount over the batch's B·G² cells, in pixel order as for one image alone.
    An image whose NMS the probability bounds leave open is redone with its exact probabilities.
    """
    G = cfg.grid_size
    n_cells = B * G * G
    counts = torch.bincount(gcell, minlength=n_cells).cpu().numpy().reshape(B, G * G)
    prob_lo, prob_hi = (x.reshape(B, G * G) for x in _cell_sums(gcell, thing_prob, n_cells))
    agree_sum = torch.bincount(gcell, weights=agreement.double(), minlength=n_cells).cpu().numpy().reshape(B, G * G)
    min_dense = area_px(cfg.merge_min_cell_frac, h, w)
    min_thing = area_px(cfg.min_thing_area_frac, h, w)
    owner_of_cell = np.full((B, G * G), -1, dtype=np.int64)
    n_inst = []
    start = np.concatenate([[0], np.cumsum(counts.sum(axis=1))]).tolist()  # image i's thing pixels: [start[i], start[i + 1])
    for i in range(B):
        group_of_cell = _group_cells(counts[i].reshape(G, G), cfg.merge_adjacent, min_dense).reshape(-1)  # −1 = empty
        nms = _nms(group_of_cell, counts[i], prob_lo[i], agree_sum[i], cfg, min_thing, None if thing_prob.exact is None else prob_hi[i])
        if nms is None:
            exact = _exact_cell_sums(gcell, thing_prob, i, G * G, start[i], start[i + 1])
            nms = _nms(group_of_cell, counts[i], exact, agree_sum[i], cfg, min_thing)
        order, masks, _ = nms
        owner_of_cell[i] = _paint(order, masks, counts[i], cfg, min_thing)
        n_inst.append(int(owner_of_cell[i].max()) + 1)  # every painted instance holds pixels: ids 0..n−1 all used
    owner = torch.from_numpy(owner_of_cell.reshape(-1)).to(gcell.device)[gcell]
    return owner, n_inst


def _cell_sums(index: torch.Tensor, prob: ThingProb, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Σ of the lower and of the upper probability bounds per bin of `index` (one array twice when exact)."""
    lo = torch.bincount(index, weights=prob.lo.double(), minlength=n).cpu().numpy()
    hi = lo if prob.exact is None else torch.bincount(index, weights=prob.hi.double(), minlength=n).cpu().numpy()
    return lo, hi


def _exact_cell_sums(gcell: torch.Tensor, prob: ThingProb, i: int, n_cells: int, start: int, end: int) -> np.ndarray:
    """Σ of image i's exact thing probabilities per cell, summed in pixel order as the batch's bincount;
    [start, end) are image i's thing pixels (image-major)."""
    return torch.bincount(gcell[start:end] - i * n_cells, weights=prob.exact(i).double().to(gcell.device), minlength=n_cells).cpu().numpy()


def vote_peaks(votes: torch.Tensor, radius: int, min_mass: float) -> torch.Tensor:
    """Local maxima of (B, H, W) vote histograms (H = W = G) → (B, H, W) bool.

    A peak has votes, is the maximum of its (2r+1)² window, and the window holds at least `min_mass`
    votes. Ties go to the cell first in row-major order (strictly above the neighbours before it, at
    least equal to those after), so a plateau gives one peak.
    """
    _, H, W = votes.shape
    r = radius
    pad = torch.nn.functional.pad(votes, (r, r, r, r), value=-1.0)  # votes are ≥ 0: the border never wins
    peak = votes > 0
    mass = votes.clone()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy, dx) == (0, 0):
                continue
            nb = pad[:, r + dy : r + dy + H, r + dx : r + dx + W]
            peak &= votes > nb if (dy, dx) < (0, 0) else votes >= nb
            mass += nb.clamp_min(0.0)
    return peak & (mass >= min_mass)


def _decode_soft_vote(
    rows: torch.Tensor, gcell: torch.Tensor, img: torch.Tensor, thing_prob: ThingProb, agreement: torch.Tensor,
    B: int, h: int, w: int, cfg: PostprocessConfig, chunk: int = 1 << 15,
) -> tuple[torch.Tensor, list[int]]:
    """Soft-vote decoder: every thing pixel votes for its decoded cell with its agreement; the local
    maxima of the G×G vote histogram are the instance centres; each pixel joins the centre whose code
    is nearest to its embedding, if it points toward it (positive dot product). An instance is scored as a group is (mean thing probability × mean
    agreement); those under the minimum area or the score threshold are dropped, the best `nms_top_k`
    kept, in score order. Returns the instance of every thing pixel (−1 = none) and n per image. An
    image whose ranking the probability bounds leave open is redone with its exact probabilities.
    """
    G, dev = cfg.grid_size, rows.device
    L = rows.shape[1] // 4
    votes = torch.bincount(gcell, weights=agreement.double(), minlength=B * G * G).reshape(B, G, G)
    peaks = vote_peaks(votes, cfg.vote_radius_cells, float(area_px(cfg.vote_min_frac, h, w)))
    centre = peaks.reshape(B, G * G).nonzero()  # K, 2: (image, cell), image-major
    K = centre.shape[0]
    owner = torch.full_like(gcell, -1)
    if K == 0:
        return owner, [0] * B
    axis = torch.from_numpy(grid_centres(G)).to(dev, torch.float32)
    codes = torch.cat([pe_encode(axis[centre[:, 1] % G], L), pe_encode(axis[centre[:, 1] // G], L)], dim=1)  # K, 4L
    k_per_image = torch.bincount(centre[:, 0], minlength=B).cpu().tolist()
    px_per_image = torch.bincount(img, minlength=B).cpu().tolist()
    nearest = torch.empty_like(gcell)
    p0 = k0 = 0
    for i in range(B):  # nearest centre of the pixel's own image: min ‖e − c‖² = max e·c, as all codes have ‖c‖² = 2L
        ki, ni = k_per_image[i], px_per_image[i]
        if ki:
            for s in range(p0, p0 + ni, chunk):
                e = rows[s : min(s + chunk, p0 + ni)]
                best, k = row_max(e @ codes[k0 : k0 + ki].T)
                # a pixel pointing away from every centre (or a zero code: void under a thing argmax) joins none
                nearest[s : s + e.shape[0]] = torch.where(best > 0, k0 + k, -1)
        else:
            nearest[p0 : p0 + ni] = -1
        p0, k0 = p0 + ni, k0 + ki
    has = nearest >= 0
    near = nearest[has]
    area = torch.bincount(near, minlength=K).cpu().numpy()
    prob_lo, prob_hi = _cell_sums(near, ThingProb(thing_prob.lo[has], thing_prob.hi[has], thing_prob.exact), K)
    agree = torch.bincount(near, weights=agreement[has].double(), minlength=K).cpu().numpy()
    min_thing = area_px(cfg.min_thing_area_frac, h, w)
    local = np.full(K, -1, dtype=np.int64)
    n_inst = []
    k0 = p0 = 0
    for i in range(B):
        ki, ni = k_per_image[i], px_per_image[i]
        ar, ag = area[k0 : k0 + ki], agree[k0 : k0 + ki]
        eligible = ar >= min_thing
        lo, hi = prob_lo[k0 : k0 + ki], prob_hi[k0 : k0 + ki]
        order = rank(*_centre_scores(lo, hi, ag, ar), eligible, cfg.nms_top_k, cfg.score_threshold)
        if order is None:
            mine = has[p0 : p0 + ni]
            exact = torch.bincount(nearest[p0 : p0 + ni][mine] - k0, weights=thing_prob.exact(i).to(dev)[mine].double(), minlength=ki)
            exact_np = exact.cpu().numpy()
            order = rank(*_centre_scores(exact_np, exact_np, ag, ar), eligible, cfg.nms_top_k, cfg.score_threshold)
        local[k0 + order] = np.arange(len(order))
        n_inst.append(len(order))
        k0, p0 = k0 + ki, p0 + ni
    owner[has] = torch.from_numpy(local).to(dev)[near]
    return owner, n_inst


def _centre_scores(prob_lo: np.ndarray, prob_hi: np.ndarray, agree: np.ndarray, area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score bounds (mean thing probability × mean agreement, 0 without pixels) from the bounds of the
    probability sums; one array twice when they are exact."""
    def score(prob: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(area > 0, (prob / np.maximum(area, 1)) * (agree / np.maximum(area, 1)), 0.0)

    lo = score(prob_lo)
    if prob_hi is prob_lo:
        return lo, lo
    return lo * (1 - SCORE_SLACK), score(prob_hi) * (1 + SCORE_SLACK)


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
    prob_sum_hi: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Score groups and run matrix NMS on their cell masks; groups under `min_area` pixels do not enter.

    Returns (order, masks, decayed scores): `masks` is (K, G²) bool over cells, `order` the indices
    of the kept groups best first. Score = mean thing probability × mean agreement over the group's
    own pixels. With `prob_sum_hi`, `prob_sum` and it bound the probability sums: the result is the one
    the exact sums give, or None where the bounds cannot tell.
    """
    G = cfg.grid_size
    n_groups = int(group_of_cell.max()) + 1 if group_of_cell.size else 0
    if n_groups == 0:
        return np.zeros(0, np.int64), np.zeros((0, G * G), bool), np.zeros(0)
    occupied = group_of_cell >= 0
    gid = group_of_cell[occupied]
    area = np.bincount(gid, weights=counts[occupied], minlength=n_groups)
    agree = np.bincount(gid, weights=agree_sum[occupied], minlength=n_groups) / area
    score = (np.bincount(gid, weights=prob_sum[occupied], minlength=n_groups) / area) * agree
    score_hi = score
    if prob_sum_hi is not None:
        score_hi = (np.bincount(gid, weights=prob_sum_hi[occupied], minlength=n_groups) / area) * agree * (1 + SCORE_SLACK)
        score = score * (1 - SCORE_SLACK)
    cand = rank(score, score_hi, area >= min_area, cfg.nms_pre_top_k)  # noise singletons would only cost NMS time
    if cand is None:
        return None
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
    decay = matrix_nms_decay(masks, counts, cfg.nms_sigma)  # depends on the order of `cand` only, not on the scores
    decayed = score[cand] * decay
    decayed_hi = decayed if score_hi is score else score_hi[cand] * decay
    order = rank(decayed, decayed_hi, np.ones(len(cand), bool), cfg.nms_top_k, cfg.score_threshold)
    if order is None:
        return None
    return order, masks, decayed


# relative margin around bounded scores for the float32 rounding of the exact thing probability that
# the exact path decides on: ~1e-7 in practice (16 float32 ulps here); the worst case for a sum of C
# exps is C ulps, but scores that close are ties up to rounding, which the exact path breaks by noise too
SCORE_SLACK = 1e-6


def rank(lo: np.ndarray, hi: np.ndarray, eligible: np.ndarray, top_k: int, threshold: float | None = None) -> np.ndarray | None:
    """Indices of the eligible scores (≥ `threshold` when given), best first, ties to the lower index,
    at most `top_k`: `argsort(-score, kind="stable")` filtered. `hi is lo`: the scores themselves.

    Otherwise every score is only known to lie in [lo, hi]: the result is the one any such scores give,
    or None when the intervals leave a kept/dropped call or the order of the kept ones open.
    """
    if hi is lo:
        order = np.argsort(-lo, kind="stable")
        keep = eligible[order] if threshold is None else eligible[order] & (lo[order] >= threshold)
        return order[keep][:top_k]
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return None
    kept = eligible if threshold is None else eligible & (lo >= threshold)
    if threshold is not None and (kept != (eligible & (hi >= threshold))).any():
        return None
    order = np.argsort(-(lo + hi), kind="stable")
    order = order[kept[order]][: top_k + 1]  # the first one left out must rank below the last one in
    if (lo[order[:-1]] <= hi[order[1:]]).any():
        return None
    return order[:top_k]


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

