"""NYUv2 depth readers: the BTS-style file list (47K training frames) and the official labeled `.mat`.

BTS list lines are `rgb_path depth_path focal` relative to a root; depth PNGs are uint16 millimetres,
0 = no measurement (lines whose depth is `None` are skipped). The labeled set is MATLAB v7.3 (HDF5):
`images` (N, 3, W, H) uint8 and `depths` (N, W, H) metres as h5py sees them (MATLAB is column-major);
the 654-image test split is `testNdxs` (1-based) of `splits.mat` (MATLAB v5, read with scipy).
Images from the .mat have no file encoding of their own: they are stored as lossless PNG.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from genpan.prep.readers.base import Category, Sample, SampleError, SampleRef, make_key, sha256_hex
from genpan.prep.readers.coco import decode_depth_png_mm
from genpan.prep.readers.files import guarded_load, read_bytes, read_image

NYU_MAX_DEPTH_M = 10.0


def sanitize_depth(depth: np.ndarray) -> tuple[np.ndarray, int]:
    """Non-finite or non-positive depths become 0 (= no measurement); returns the count changed."""
    depth = np.asarray(depth, dtype=np.float32)
    bad = ~np.isfinite(depth) | (depth < 0)
    return np.where(bad, 0.0, depth).astype(np.float32), int(bad.sum())


class NyuBtsReader:
    """NYUv2 frames from a BTS-style file list (`rgb depth focal` per line)."""

    name = "nyu_bts"

    def __init__(self, root: str | Path, filelist: str | Path) -> None:
        self.root = Path(root)
        self.filelist = Path(filelist)
        if not self.filelist.is_file():
            raise FileNotFoundError(f"NYUv2 file list not found: {self.filelist}")
        self.categories: list[Category] = []

    def refs(self) -> list[SampleRef]:
        refs, seen = [], set()
        for lineno, line in enumerate(self.filelist.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            rgb = parts[0].lstrip("/")
            depth = parts[1].lstrip("/") if len(parts) > 1 and parts[1] != "None" else None
            key = make_key(str(Path(rgb).with_suffix("")))
            problem = None
            if depth is None:
                problem = f"{self.filelist.name} line {lineno}: no depth file"
            elif key in seen:
                problem = f"{self.filelist.name} line {lineno}: duplicate entry {rgb}"
                key = f"{key}_dup{lineno}"
            seen.add(key)
            refs.append(
                SampleRef(
                    key=key,
                    dataset="nyu",
                    image_path=str(self.root / rgb),
                    depth_path=str(self.root / depth) if depth else None,
                    meta={"focal": float(parts[2]) if len(parts) > 2 else None},
                    problem=problem,
                )
            )
        return refs

    def load(self, ref: SampleRef) -> Sample | SampleError:
        return guarded_load(ref, self._load)

    def _load(self, ref: SampleRef) -> Sample:
        image_bytes, h, w, ext = read_image(ref.image_path)
        assert ref.depth_path is not None  # refs without depth carry a problem
        depth_bytes = read_bytes(ref.depth_path, "depth PNG")
        depth = decode_depth_png_mm(depth_bytes, ref.depth_path, h, w)
        return Sample(ref.key, ref.dataset, image_bytes, ext, h, w, None, [], depth, ref.image_path,
                      sha256_hex(image_bytes), "", sha256_hex(depth_bytes))


class NyuMatReader:
    """The official labeled NYUv2 `.mat` (HDF5), optionally restricted to a split of `splits.mat`."""

    name = "nyu_mat"

    def __init__(self, mat_path: str | Path, splits_path: str | Path | None = None, split: str = "test") -> None:
        self.mat_path = Path(mat_path)
        if not self.mat_path.is_file():
            raise FileNotFoundError(f"NYUv2 labeled .mat not found: {self.mat_path}")
        self.categories: list[Category] = []
        import h5py

        try:
            with h5py.File(self.mat_path, "r") as f:
                count = int(f["images"].shape[0])
                if f["depths"].shape[0] != count:
                    raise ValueError(f"{self.mat_path}: 'images' and 'depths' hold different numbers of frames")
        except OSError as exc:
            raise ValueError(f"{self.mat_path}: not an HDF5 (MATLAB v7.3) file ({exc})") from None
        except KeyError as exc:
            raise ValueError(f"{self.mat_path}: missing dataset {exc}") from None
        if splits_path is None:
            self.indices = list(range(1, count + 1))
        else:
            from scipy.io import loadmat

            field = {"test": "testNdxs", "train": "trainNdxs"}.get(split)
            if field is None:
                raise ValueError(f"unknown NYUv2 split {split!r}; use 'test' or 'train'")
            try:
                self.indices = [int(i) for i in np.asarray(loadmat(str(splits_path))[field]).ravel()]
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(f"{splits_path}: cannot read {field} ({exc})") from None
            bad = [i for i in self.indices if not 1 <= i <= count]
            if bad:
                raise ValueError(f"{splits_path}: indices {bad[:5]} outside 1..{count}")

    def refs(self) -> list[SampleRef]:
        return [SampleRef(key=f"nyu_{i:04d}", dataset="nyu", image_path=f"{self.mat_path}#{i}", meta={"index": i}) for i in self.indices]

    def load(self, ref: SampleRef) -> Sample | SampleError:
        import h5py

        i = int(ref.meta["index"]) - 1
        try:
            with h5py.File(self.mat_path, "r") as f:
                rgb = np.ascontiguousarray(np.asarray(f["images"][i]).transpose(2, 1, 0))  # (H, W, 3)
                depth = np.asarray(f["depths"][i], dtype=np.float32).T  # (H, W) metres
        except (OSError, KeyError, IndexError) as exc:
            return SampleError(ref.key, ref.dataset, ref.image_path, f"cannot read frame: {exc}")
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or depth.shape != rgb.shape[:2]:
            return SampleError(ref.key, ref.dataset, ref.image_path, f"unexpected frame layout: image {rgb.shape} {rgb.dtype}, depth {depth.shape}")
        depth, _ = sanitize_depth(depth)
        ok, png = cv2.imencode(".png", rgb[..., ::-1])
        if not ok:
            return SampleError(ref.key, ref.dataset, ref.image_path, "cannot encode frame as PNG")
        image_bytes = png.tobytes()
        return Sample(ref.key, ref.dataset, image_bytes, "png", rgb.shape[0], rgb.shape[1], None, [], depth, ref.image_path,
                      sha256_hex(rgb.tobytes()), "", sha256_hex(depth.tobytes()))
