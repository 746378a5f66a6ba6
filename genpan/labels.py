"""The label conventions every stage shares, and the math defined on them (numpy or torch, no I/O).

- semantic map: uint8 contiguous train id per pixel, `IGNORE` (255) = void/ignore; crowd keeps its class.
- instance map: uint16 index per pixel, `NO_INSTANCE` (0) = no thing instance. Every thing segment, crowd
  included, gets an index (1-based, in segments order); crowd is flagged in the segment table, not in the map.
- centroid (u, v): mean of the segment's pixel centres, normalised to [-1, 1] with the
  `align_corners=False` convention: u = 2·(x + 0.5)/W − 1 (x = column), v = 2·(y + 0.5)/H − 1.
- boundary distance: a pixel is a boundary pixel when a 4-neighbour inside the image has another
  segment id (void is a segment of its own); every pixel stores its Euclidean distance to the nearest
  boundary pixel centre. Crop edges are not boundaries.

`eds_weight` and `pe_encode`/`pe_target` accept numpy arrays or torch tensors, so prep, the trainer,
the Triton kernels' tests and post-processing all use this single definition.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

IGNORE = 255
NO_INSTANCE = 0
# dist.zst stores round(min(d, clip) · scale); the scale is a shard parameter (json params.dist_scale).
# Default: half pixels up to 127.5 px in uint8. The EDS weight exp(-(s·d)²/D²) moves by at most
# 0.043·s/4 for D = 20 over a quarter pixel, and past 127.5 px (·s ≥ 0.5) every weight is wmin for D ≤ 40;
# a 16-bit 1/64 px map cost 2.7× the bytes and 2.4× the decode time at COCO sizes.
DEFAULT_DIST_SCALE = 2
DEFAULT_DIST_CLIP = 127.5  # px; 127.5 · 2 = 255 fits uint8
DIST_SCALES = (1, 2, 4, 8, 16, 32, 64)  # divisors of DIST_SCALE, so every stored value is a whole batch unit
DIST_SCALE = 64  # the loader's batch unit (int16, 1/64 px), and the fixed scale of shards before PREP_VERSION 2



def decode_distance(stored: Any, scale: int = DEFAULT_DIST_SCALE) -> Any:
    """dist.zst values → distance in px (numpy or torch)."""
    if _is_torch(stored):
        return stored.float() / scale
    return np.asarray(stored, dtype=np.float32) / np.float32(scale)


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _xp(x: Any) -> Any:
    return sys.modules["torch"] if _is_torch(x) else np


def eds_weight(dist: Any, D: float = 20.0, wmin: float = 0.0, scale: float = 1.0) -> Any:
    """Edge Distance Sampling weight (paper eq. 5): w = wmin + (1 − wmin)·exp(−(s·d)²/D²).

    `scale` is the resize factor s between the image the distance was measured on and the one the
    loss sees, so D is always in pixels of the loss resolution.
    """
    if D <= 0:
        raise ValueError(f"EDS D must be positive, got {D}")
    if not 0.0 <= wmin <= 1.0:
        raise ValueError(f"EDS wmin must lie in [0, 1], got {wmin}")
    xp = _xp(dist)
    sd = dist * scale
    return wmin + (1.0 - wmin) * xp.exp(-(sd * sd) / (D * D))


def pe_encode(p: Any, num_harmonics: int = 4) -> Any:
    """Spectral positional embedding γ(p) (paper eq. 3), last axis of size 2L.

    γ(p) = (sin(2^l π p), cos(2^l π p)) for l = 0..L−1, interleaved as sin_0, cos_0, sin_1, cos_1, ….
    ‖γ(p)‖² = L for every p, so instance codes lie on a sphere and void (0) sits at its centre.
    """
    xp = _xp(p)
    if xp is np:
        freqs = (2.0 ** np.arange(num_harmonics)) * np.pi
        ang = np.asarray(p, dtype=np.float64)[..., None] * freqs
        return np.stack([np.sin(ang), np.cos(ang)], axis=-1).reshape(*ang.shape[:-1], 2 * num_harmonics)
    freqs = (2.0 ** xp.arange(num_harmonics, dtype=p.dtype, device=p.device)) * np.pi
    ang = p[..., None] * freqs
    return xp.stack([xp.sin(ang), xp.cos(ang)], dim=-1).reshape(*ang.shape[:-1], 2 * num_harmonics)


def pe_target(u: Any, v: Any, valid: Any, num_harmonics: int = 4) -> Any:
    """Instance target per pixel (paper eq. 2-3): concat(γ(u), γ(v)) of size 4L, 0 where not valid."""
    xp = _xp(u)
    if xp is np:
        code = np.concatenate([pe_encode(u, num_harmonics), pe_encode(v, num_harmonics)], axis=-1)
        return code * np.asarray(valid, dtype=code.dtype)[..., None]
    code = xp.cat([pe_encode(u, num_harmonics), pe_encode(v, num_harmonics)], dim=-1)
    return code * valid.to(code.dtype)[..., None]
