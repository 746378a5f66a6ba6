"""A plain folder of images (inference only): every JPEG/PNG under a root, recursively, sorted."""

from __future__ import annotations

from pathlib import Path

from genpan.prep.readers.base import Category, Sample, SampleError, SampleRef, make_key, sha256_hex
from genpan.prep.readers.files import guarded_load, read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ImageFolderReader:
    name = "folder"

    def __init__(self, root: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.suffixes = tuple(s.lower() for s in suffixes)
        self.categories: list[Category] = []

    def refs(self) -> list[SampleRef]:
        paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in self.suffixes)
        refs, seen = [], set()
        for p in paths:
            key = make_key(str(p.relative_to(self.root).with_suffix("")))
            problem = None
            if key in seen:  # e.g. a.jpg and a.png, or names that differ only in dropped characters
                problem = f"another file already has sample key {key}"
                key = f"{key}_{len(refs)}"
            seen.add(key)
            refs.append(SampleRef(key=key, dataset="folder", image_path=str(p), problem=problem))
        return refs

    def load(self, ref: SampleRef) -> Sample | SampleError:
        return guarded_load(ref, self._load)

    def _load(self, ref: SampleRef) -> Sample:
        data, h, w, ext = read_image(ref.image_path)
        return Sample(ref.key, ref.dataset, data, ext, h, w, None, [], None, ref.image_path, sha256_hex(data), "", "")
