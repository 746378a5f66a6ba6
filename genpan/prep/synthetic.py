"""The embedded default dataset: small synthetic scenes written in the real COCO panoptic format.

Each image is a scene of textured stuff bands (sky, wall, sand, grass) behind thing instances of four
shape classes (disc, box, triangle, cross) with sizes from ~8 px to half the image, placed so that some
touch and some occlude each other; some scenes hold a crowd region (a cluster of small objects labelled
as one `iscrowd` segment) and an unlabelled void patch. A metric depth map per image puts things in
front of the stuff behind them and is written as a 16-bit PNG in millimetres.

Layout written under `root` (the layout of COCO panoptic, plus depth):
    {split}/{key}.jpg                      images, JPEG
    annotations/panoptic_{split}.json      images, annotations (+ segments_info), categories
    annotations/panoptic_{split}/{key}.png segment ids packed as R + 256·G + 256²·B
    depth_{split}/{key}.png                uint16 depth in mm

Everything is a pure function of (split, seed, index): the same call writes identical files.

    python prep/synthetic.py --out data/synthetic --train 300 --val 60
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from genpan.coco_panoptic import encode_panoptic_png

# Non-contiguous ids as in COCO (things first, stuff later), so the train-id mapping is exercised.
THING_CLASSES = {1: "disc", 2: "box", 3: "triangle", 4: "cross"}
STUFF_CLASSES = {101: "sky", 102: "wall", 103: "sand", 104: "grass"}
# Base colours (RGB) per class; each instance jitters around its class colour.
CLASS_RGB = {
    1: (220, 60, 50), 2: (50, 90, 220), 3: (240, 200, 40), 4: (170, 60, 200),
    101: (120, 170, 235), 102: (150, 110, 90), 103: (210, 190, 140), 104: (60, 150, 60),
}
MIN_VISIBLE_AREA = 12  # px; smaller remnants of occluded instances are painted over as void
DEPTH_MAX_MM = 60000


@dataclass(frozen=True)
class SceneConfig:
    min_size: int = 128
    max_size: int = 256
    min_things: int = 3
    max_things: int = 14
    min_thing_px: float = 8.0  # smallest instance diameter
    crowd_prob: float = 0.25
    void_prob: float = 0.5
    jpeg_quality: int = 90


def categories() -> list[dict]:
    cats = [{"id": i, "name": n, "supercategory": "shape", "isthing": 1, "color": list(CLASS_RGB[i])} for i, n in THING_CLASSES.items()]
    cats += [{"id": i, "name": n, "supercategory": "stuff", "isthing": 0, "color": list(CLASS_RGB[i])} for i, n in STUFF_CLASSES.items()]
    return cats


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    pan_ids: np.ndarray  # (H, W) int32
    segments: list[dict]
    depth_mm: np.ndarray  # (H, W) uint16


def _texture(rng: np.random.Generator, cat: int, h: int, w: int) -> np.ndarray:
    """A class-typical texture, so stuff classes are told apart by appearance, not position alone."""
    base = np.array(CLASS_RGB[cat], np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = rng.normal(0, 1, (h, w)).astype(np.float32)
    if cat == 101:  # sky: vertical gradient, faint noise
        shade = 1.0 - 0.25 * yy / max(h, 1) + 0.02 * noise
    elif cat == 102:  # wall: bricks
        bh, bw = 8, 16
        row = (yy // bh).astype(np.int32)
        mortar = ((yy % bh) < 1) | (((xx + (row % 2) * bw / 2) % bw) < 1)
        shade = np.where(mortar, 1.45, 0.95) + 0.05 * noise
    elif cat == 103:  # sand: speckle
        shade = 1.0 + 0.15 * noise
    else:  # grass: vertical stripes
        shade = 0.85 + 0.2 * np.sin(xx * 1.7 + 0.3 * noise) + 0.06 * noise
    return base[None, None, :] * shade[..., None]


def _shape_mask(rng: np.random.Generator, cat: int, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    shift = 4  # sub-pixel precision for small shapes
    c = (int(round(cx * 16)), int(round(cy * 16)))
    if cat == 1:
        cv2.circle(mask, c, int(round(r * 16)), 1, -1, cv2.LINE_8, shift)
        return mask.astype(bool)
    angle = rng.uniform(0, np.pi)
    if cat == 2:
        pts = [(np.cos(angle + k * np.pi / 2), np.sin(angle + k * np.pi / 2)) for k in range(4)]
        scale = r * 0.95
    elif cat == 3:
        pts = [(np.cos(angle + k * 2 * np.pi / 3), np.sin(angle + k * 2 * np.pi / 3)) for k in range(3)]
        scale = r * 1.1
    else:  # cross: a plus sign made of 12 vertices
        a, b = 1.0, 0.36
        base = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        ca, sa = np.cos(angle), np.sin(angle)
        pts = [(x * ca - y * sa, x * sa + y * ca) for x, y in base]
        scale = r
    poly = np.array([[(cx + scale * x) * 16, (cy + scale * y) * 16] for x, y in pts], np.int32)
    cv2.fillPoly(mask, [poly], 1, cv2.LINE_8, shift)
    return mask.astype(bool)


def make_scene(rng: np.random.Generator, cfg: SceneConfig = SceneConfig()) -> Scene:
    """One scene: stuff bands, then things far to near (painter's order), crowd and void."""
    h = int(rng.integers(cfg.min_size // 8, cfg.max_size // 8 + 1)) * 8
    w = int(rng.integers(cfg.min_size // 8, cfg.max_size // 8 + 1)) * 8
    image = np.zeros((h, w, 3), np.float32)
    cat_map = np.zeros((h, w), np.int32)  # category per pixel; 0 = void
    inst_map = np.zeros((h, w), np.int32)  # local instance number per pixel; 0 = stuff/void
    depth = np.zeros((h, w), np.float32)  # metres

    # Stuff: sky, an optional wall, then one or two ground bands (sand/grass) with wavy borders. The
    # ground plane recedes toward the horizon; a wall stands where the ground below it starts.
    grounds = list(rng.choice([103, 104], size=int(rng.integers(1, 3)), replace=False))
    stuff = [101] + ([102] if rng.random() < 0.5 else []) + grounds
    cuts = np.sort(rng.uniform(0.2, 0.8, len(stuff) - 1))
    xs = np.arange(w, dtype=np.float32)
    yy = np.mgrid[0:h, 0:w][0].astype(np.float32)
    ground_depth = 2.0 + 40.0 * (1.0 - yy / h) ** 2
    top = np.zeros(w, np.float32)
    for i, cat in enumerate(stuff):
        if i + 1 < len(stuff):
            amp, freq, phase = rng.uniform(2, 10), rng.uniform(0.01, 0.06), rng.uniform(0, 6.3)
            bottom = cuts[i] * h + amp * np.sin(freq * xs + phase)
        else:
            bottom = np.full(w, h + 1, np.float32)
        band = (yy >= top[None, :]) & (yy < bottom[None, :])
        tex = _texture(rng, cat, h, w)
        image[band] = tex[band]
        cat_map[band] = cat
        if cat == 101:
            depth[band] = 55.0
        elif cat == 102:
            depth[band] = 2.0 + 40.0 * (1.0 - float(bottom.min()) / h) ** 2
        else:
            depth[band] = ground_depth[band]
        top = bottom

    # Things: log-uniform sizes; some placed touching a previous one; far ones drawn first.
    n = int(rng.integers(cfg.min_things, cfg.max_things + 1))
    placed: list[tuple[float, float, float]] = []
    things = []
    for _ in range(n):
        r = float(np.exp(rng.uniform(np.log(cfg.min_thing_px / 2), np.log(min(h, w) * 0.25))))
        if placed and rng.random() < 0.35:  # touch (or slightly overlap) an earlier instance
            px, py, pr = placed[int(rng.integers(len(placed)))]
            ang = rng.uniform(0, 2 * np.pi)
            d = (pr + r) * rng.uniform(0.85, 1.0)
            cx, cy = px + d * np.cos(ang), py + d * np.sin(ang)
        else:
            cx, cy = rng.uniform(0, w), rng.uniform(h * 0.15, h)
        placed.append((cx, cy, r))
        things.append((int(rng.choice(list(THING_CLASSES))), cx, cy, r, float(rng.uniform(1.0, 0.95 * 20.0))))
    things.sort(key=lambda t: -t[4])  # far → near
    for k, (cat, cx, cy, r, z) in enumerate(things, start=1):
        mask = _shape_mask(rng, cat, h, w, cx, cy, r)
        if not mask.any():
            continue
        z = min(z, float(depth[mask].min()) * 0.9)  # in front of whatever is behind it
        colour = np.clip(np.array(CLASS_RGB[cat], np.float32) + rng.normal(0, 18, 3), 0, 255)
        shade = 0.9 + 0.1 * rng.normal(0, 1, (h, w)).astype(np.float32)
        image[mask] = colour[None, :] * shade[mask][:, None]
        cat_map[mask] = cat
        inst_map[mask] = k
        depth[mask] = z

    # Crowd: a cluster of small same-class objects, labelled as one iscrowd segment.
    crowd_cat = 0
    if rng.random() < cfg.crowd_prob:
        crowd_cat = int(rng.choice(list(THING_CLASSES)))
        ccx, ccy, spread = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.4 * h, 0.9 * h), rng.uniform(10, 24)
        crowd_mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(6, 14))):
            crowd_mask |= _shape_mask(rng, crowd_cat, h, w, ccx + rng.normal(0, spread), ccy + rng.normal(0, spread / 2), rng.uniform(2.5, 5))
        colour = np.array(CLASS_RGB[crowd_cat], np.float32)
        image[crowd_mask] = colour
        cat_map[crowd_mask] = crowd_cat
        inst_map[crowd_mask] = -1
        if crowd_mask.any():
            depth[crowd_mask] = 0.9 * float(depth[crowd_mask].min())

    # Void: an unlabelled patch of clutter (grey checkerboard) — pixels with no annotation.
    if rng.random() < cfg.void_prob:
        vw, vh = int(rng.integers(10, max(11, w // 4))), int(rng.integers(10, max(11, h // 4)))
        vx, vy = int(rng.integers(0, w - vw)), int(rng.integers(0, h - vh))
        ys, xs2 = np.mgrid[vy : vy + vh, vx : vx + vw]
        checker = (((ys // 3) + (xs2 // 3)) % 2).astype(np.float32)
        image[vy : vy + vh, vx : vx + vw] = (90 + 80 * checker)[..., None]
        cat_map[vy : vy + vh, vx : vx + vw] = 0
        inst_map[vy : vy + vh, vx : vx + vw] = 0
        depth[vy : vy + vh, vx : vx + vw] = np.minimum(depth[vy : vy + vh, vx : vx + vw], 4.0)

    pan_ids, segments = _assign_segments(rng, cat_map, inst_map, crowd_cat)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    depth_mm = np.clip(np.rint(depth * 1000.0), 1, DEPTH_MAX_MM).astype(np.uint16)
    return Scene(image=image, pan_ids=pan_ids, segments=segments, depth_mm=depth_mm)


def _distinct_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct random segment ids in [1, 256³) (drawn without a 16M-element permutation)."""
    ids = np.zeros(0, np.int64)
    while len(ids) < n:
        draw = rng.integers(1, 256**3, size=2 * n + 4)
        _, first = np.unique(np.concatenate([ids, draw]), return_index=True)
        ids = np.concatenate([ids, draw])[np.sort(first)]
    return ids[:n]


def _assign_segments(rng: np.random.Generator, cat_map: np.ndarray, inst_map: np.ndarray, crowd_cat: int) -> tuple[np.ndarray, list[dict]]:
    """Random COCO-style segment ids per (category, instance); tiny occluded remnants become void."""
    pan_ids = np.zeros(cat_map.shape, np.int32)
    segments = []
    keys = np.unique(np.stack([cat_map.ravel(), inst_map.ravel()], 1), axis=0)
    ids = _distinct_ids(rng, len(keys))
    for (cat, inst), sid in zip(keys, ids):
        if cat == 0:
            continue
        mask = (cat_map == cat) & (inst_map == inst)
        area = int(mask.sum())
        if cat in THING_CLASSES and inst > 0 and area < MIN_VISIBLE_AREA:
            continue  # stays void, as an annotator would skip a sliver
        ys, xs = np.nonzero(mask)
        pan_ids[mask] = sid
        segments.append(
            {
                "id": int(sid),
                "category_id": int(cat),
                "iscrowd": int(inst == -1),
                "area": area,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            }
        )
    return pan_ids, segments


def generate_split(root: str | Path, split: str, num_images: int, seed: int = 0, cfg: SceneConfig = SceneConfig(), progress: bool = True) -> Path:
    """Write `num_images` scenes of one split under `root`; returns the panoptic JSON path."""
    root = Path(root)
    img_dir, png_dir, depth_dir = root / split, root / "annotations" / f"panoptic_{split}", root / f"depth_{split}"
    for d in (img_dir, png_dir, depth_dir):
        d.mkdir(parents=True, exist_ok=True)
    split_salt = sum(ord(c) * 131**i for i, c in enumerate(split)) % (2**31)
    images, annotations = [], []
    for i in tqdm(range(num_images), desc=f"synthetic {split}", disable=not progress, unit="img"):
        rng = np.random.default_rng([seed, split_salt, i])
        scene = make_scene(rng, cfg)
        key = f"{split}_{i:06d}"
        h, w = scene.pan_ids.shape
        ok, jpg = cv2.imencode(".jpg", scene.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
        if not ok:
            raise RuntimeError("OpenCV failed to encode a JPEG")
        (img_dir / f"{key}.jpg").write_bytes(jpg.tobytes())
        (png_dir / f"{key}.png").write_bytes(encode_panoptic_png(scene.pan_ids))
        ok, dpng = cv2.imencode(".png", scene.depth_mm)
        (depth_dir / f"{key}.png").write_bytes(dpng.tobytes())
        images.append({"id": i + 1, "file_name": f"{key}.jpg", "height": h, "width": w})
        annotations.append({"image_id": i + 1, "file_name": f"{key}.png", "segments_info": scene.segments})
    data = {
        "info": {"description": f"genpan synthetic panoptic, split {split}, seed {seed}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }
    out = root / "annotations" / f"panoptic_{split}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=None, separators=(",", ":")))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the embedded synthetic dataset in COCO panoptic format (+ depth).")
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"), help="output root (default: data/synthetic)")
    parser.add_argument("--train", type=int, default=300, help="number of training images (default: 300)")
    parser.add_argument("--val", type=int, default=60, help="number of held-out validation images (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    parser.add_argument("--min-size", type=int, default=128, help="smallest image side in px (default: 128)")
    parser.add_argument("--max-size", type=int, default=256, help="largest image side in px (default: 256)")
    args = parser.parse_args(argv)
    if args.train < 0 or args.val < 0 or args.min_size < 32 or args.max_size < args.min_size:
        print("error: need --train, --val >= 0 and 32 <= --min-size <= --max-size", file=sys.stderr)
        return 2
    cfg = SceneConfig(min_size=args.min_size, max_size=args.max_size)
    for split, n in (("train", args.train), ("val", args.val)):
        if n:
            path = generate_split(args.out, split, n, args.seed, cfg)
            print(f"wrote {n} {split} images → {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
