"""Panoptic quality (PQ), exactly as the COCO reference (panopticapi `pq_compute`) defines it.

Per image, a ground-truth (GT) segment g and a predicted segment p of the same category match when

    IoU(g, p) = |g ∩ p| / (|p| + |g| − |g ∩ p| − |p ∩ void|)  >  0.5   (strictly),

where void is id 0 of the GT map; predicted pixels on void count neither for nor against p. Crowd GT
segments (iscrowd = 1) take no part in matching and are never false negatives. An unmatched prediction
is not a false positive when more than half of its pixels lie in GT void plus the crowd segment of its
own category (the reference keeps one crowd segment per category: the last one listed). Per category c,

    PQ_c = Σ_TP IoU / (TP + FP/2 + FN/2),   SQ_c = Σ_TP IoU / TP,   RQ_c = TP / (TP + FP/2 + FN/2),

and All / Things / Stuff are plain means over the categories (of that kind, from the GT JSON's
`isthing`) with TP + FP + FN > 0. This is the PQ of Kirillov et al. (2019) that the paper reports.

Differences from the reference, all on inputs it would mis-handle: GT segment areas are counted on
the GT PNG (the reference trusts the JSON `area`; `PQResult.gt_area_mismatches` counts disagreements);
GT PNG/JSON consistency is checked as strictly as the prediction's; a kind with no counted category
reports PQ = SQ = RQ = 0 with n = 0 (the reference divides by zero).

Speed: one pass over the pixels per image. Segment ids become compact indices through a lookup table,
GT × prediction pairs are counted with one `bincount` of combined indices, and matching works on the
(few) non-empty pairs; images run in a multiprocessing pool. The PNG decode dominates what is left.

Library: `pq_compute` (files) and `pq_image` (in-memory id maps + segment lists); `pq_by_size` splits
thing segments into area buckets (the paper's Figures 4–5). CLI:

    python eval/pq.py --gt-json gt.json --gt-dir gt/ --pred-json pred.json --pred-dir pred/ --out report/
"""

if __package__ in (None, ""):  # run as a script: make the repo root importable
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

from __future__ import annotations  # noqa: E402  (must follow the bootstrap only when run as a script)
