"""COCO panoptic reader (JSON + PNG folder), also the base of every COCO-form panoptic dataset.

Validation follows panopticapi: a PNG segment id missing from the JSON, a JSON segment missing from the
PNG, an unknown category id, a missing or truncated file and a size mismatch are each a SampleError
naming the file — never an exception that stops the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from genpan.coco_panoptic import decode_panoptic_png, load_panoptic_json
from genpan.prep.readers.base import (
    Category,
    Sample,
    SampleError,
    SampleRef,
    canonical_json,
    contiguous_train_ids,
    make_key,
    sha256_hex,
)
from genpan.prep.readers.files import SampleProblem, guarded_load, read_bytes, read_image
from genpan.prep.targets import UNLISTED, segment_index_map


class CocoPanopticReader:
    """Reads `panoptic_{split}.json` + its PNG folder + the image folder (+ optional depth PNGs in mm).

    Defaults follow the COCO layout: for `root/annotations/panoptic_val2017.json` the PNGs are in
    `root/annotations/panoptic_val2017/` and the images in `root/val2017/`.
    """

    name = "coco"

    def __init__(
        self,
        json_path: str | Path,
        png_dir: str | Path | None = None,
        image_dir: str | Path | None = None,
        depth_dir: str | Path | None = None,
        dataset: str | None = None,
    ) -> None:
        self.json_path = Path(json_path)
        data = load_panoptic_json(self.json_path)
        split = self.json_path.stem.removeprefix("panoptic_")
        self.png_dir = Path(png_dir) if png_dir else self.json_path.with_suffix("")
        self.image_dir = Path(image_dir) if image_dir else self.json_path.parent.parent / split
        self.depth_dir = Path(depth_dir) if depth_dir else None
        self.dataset = dataset or self.name
        for field in ("images", "annotations", "categories"):
            if not isinstance(data.get(field, []), list):
                raise ValueError(f"{self.json_path}: '{field}' must be a list, got {type(data.get(field)).__name__}")
        cats = data["categories"]
        if not all(isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c.get("id"), bool) for c in cats):
            raise ValueError(f"{self.json_path}: every entry of 'categories' must be an object with an integer 'id'")
        self.categories: list[Category] = self._make_categories(cats)
        self._cat_by_id = {c.id: c for c in self.categories}
        self._data = data

    # -- hooks for COCO-form datasets -------------------------------------------------------------
    def _make_categories(self, categories: list[dict[str, Any]]) -> list[Category]:
        return contiguous_train_ids(categories)

    def _image_path(self, image: dict[str, Any]) -> Path:
        return self.image_dir / str(image["file_name"])

    def _key(self, image: dict[str, Any]) -> str:
        return make_key(Path(str(image["file_name"])).stem)

    # -- listing ----------------------------------------------------------------------------------
    def refs(self) -> list[SampleRef]:
        images, bad_refs = [], []
        for i, image in enumerate(self._data.get("images") or []):
            reason = _malformed_image(image)
            if reason:
                bad_refs.append(self._problem_ref(f"bad_image_{i}", f"images[{i}] of {self.json_path.name}: {reason}"))
            else:
                images.append(image)
        by_id: dict[Any, dict[str, Any]] = {}
        refs: list[SampleRef] = []
        duplicate_ids: set[Any] = set()
        for image in images:
            if image.get("id") in by_id:
                duplicate_ids.add(image.get("id"))
            by_id.setdefault(image.get("id"), image)
        annotations: dict[Any, dict[str, Any]] = {}
        for i, ann in enumerate(self._data.get("annotations") or []):
            reason = _malformed_annotation(ann)
            if reason:
                bad_refs.append(self._problem_ref(f"bad_annotation_{i}", f"annotations[{i}] of {self.json_path.name}: {reason}"))
            else:
                annotations.setdefault(ann.get("image_id"), ann)
        seen_keys: set[str] = set()
        for image in images:
            key = self._key(image)
            ann = annotations.get(image.get("id"))
            problem = None
            if image.get("id") in duplicate_ids:
                problem = f"duplicate image id {image.get('id')} in {self.json_path.name}"
            elif key in seen_keys:
                problem = f"duplicate sample key {key} (two images with the same file name)"
            elif ann is None:
                problem = f"no annotation for image id {image.get('id')} in {self.json_path.name}"
            if problem and key in seen_keys:
                key = f"{key}_dup{len(refs)}"
            seen_keys.add(key)
            label = ann.get("file_name") if ann else None
            refs.append(
                SampleRef(
                    key=key,
                    dataset=self.dataset,
                    image_path=str(self._image_path(image)),
                    label_path=str(self.png_dir / label) if label else None,
                    depth_path=str(self.depth_dir / f"{Path(label or image['file_name']).stem}.png") if self.depth_dir else None,
                    segments=tuple(ann.get("segments_info", [])) if ann else (),
                    meta={"image_id": image.get("id"), "height": image.get("height"), "width": image.get("width")},
                    problem=problem,
                )
            )
        for image_id in annotations.keys() - by_id.keys():
            ann = annotations[image_id]
            refs.append(
                SampleRef(
                    key=make_key(f"orphan_{Path(str(ann.get('file_name', image_id))).stem}"),
                    dataset=self.dataset,
                    image_path="",
                    label_path=str(self.png_dir / str(ann.get("file_name", ""))),
                    problem=f"annotation for image id {image_id} has no entry in 'images' of {self.json_path.name}",
                )
            )
        return refs + bad_refs

    def _problem_ref(self, key: str, problem: str) -> SampleRef:
        return SampleRef(key=key, dataset=self.dataset, image_path=str(self.json_path), problem=problem)

    # -- loading ----------------------------------------------------------------------------------
    def load(self, ref: SampleRef) -> Sample | SampleError:
        try:
            return guarded_load(ref, self._load)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            # a JSON value of the wrong type (a string height, a null category_id, ...)
            return SampleError(ref.key, ref.dataset, str(self.json_path),
                               f"malformed annotation in {self.json_path.name}: {type(exc).__name__}: {exc}")

    def _load(self, ref: SampleRef) -> Sample:
        image_bytes, h, w, ext = read_image(ref.image_path)
        exp_h, exp_w = ref.meta.get("height"), ref.meta.get("width")
        if exp_h is not None and exp_w is not None and (int(exp_h), int(exp_w)) != (h, w):
            raise SampleProblem(f"image is {h}x{w} but the JSON says {exp_h}x{exp_w}", ref.image_path)
        if ref.label_path is None:
            raise SampleProblem("no panoptic label", ref.image_path)
        label_bytes = read_bytes(ref.label_path, "panoptic PNG")
        try:
            pan_ids = decode_panoptic_png(label_bytes, Path(ref.label_path).name)
        except ValueError as exc:
            raise SampleProblem(str(exc), ref.label_path) from None
        if pan_ids.shape != (h, w):
            raise SampleProblem(f"panoptic PNG is {pan_ids.shape[0]}x{pan_ids.shape[1]} but the image is {h}x{w}", ref.label_path)
        segments = [dict(s) for s in ref.segments]
        dense = self._validate_segments(pan_ids, segments, ref.label_path)
        depth_m, depth_hash = self._load_depth(ref, h, w)
        return Sample(
            key=ref.key,
            dataset=ref.dataset,
            image_bytes=image_bytes,
            image_ext=ext,
            height=h,
            width=w,
            pan_ids=pan_ids,
            segments=segments,
            depth_m=depth_m,
            source_path=ref.image_path,
            image_hash=sha256_hex(image_bytes),
            label_hash=sha256_hex(label_bytes + canonical_json(segments)),
            depth_hash=depth_hash,
            dense_index=dense,
        )

    def _validate_segments(self, pan_ids: np.ndarray, segments: list[dict[str, Any]], path: str) -> np.ndarray:
        """The dense segment index of the map (segment_index_map), once every id is known to match."""
        json_ids: list[int] = []
        for seg in segments:
            if "id" not in seg or "category_id" not in seg:
                raise SampleProblem("a segment in segments_info lacks 'id' or 'category_id'", path)
            if int(seg["category_id"]) not in self._cat_by_id:
                raise SampleProblem(f"segment {seg['id']} has unknown category id {seg['category_id']}", path)
            json_ids.append(int(seg["id"]))
        if len(set(json_ids)) != len(json_ids):
            raise SampleProblem("duplicate segment ids in segments_info", path)
        try:
            dense = segment_index_map(pan_ids, json_ids)
        except ValueError as exc:
            raise SampleProblem(str(exc), path) from None
        if (dense == UNLISTED).any():  # rare error path: name the ids
            missing_json = sorted(set(np.unique(pan_ids[dense == UNLISTED]).tolist()))
            raise SampleProblem(f"PNG segment id(s) {missing_json[:5]} not in the JSON", path)
        present = np.bincount(dense.ravel(), minlength=len(json_ids) + 1)[1:]
        missing_png = [sid for sid, n in zip(json_ids, present) if n == 0]
        if missing_png:
            raise SampleProblem(f"JSON segment id(s) {missing_png[:5]} not in the PNG", path)
        return dense

    def _load_depth(self, ref: SampleRef, h: int, w: int) -> tuple[np.ndarray | None, str]:
        if not ref.depth_path:
            return None, ""
        data = read_bytes(ref.depth_path, "depth PNG")
        return decode_depth_png_mm(data, ref.depth_path, h, w), sha256_hex(data)


def decode_depth_png_mm(data: bytes, path: str, h: int, w: int) -> np.ndarray:
    """uint16 PNG in millimetres → float32 metres (0 = no measurement), with checks."""
    depth = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if depth is None:
        raise SampleProblem("depth PNG is not decodable", path)
    if depth.ndim != 2 or depth.dtype != np.uint16:
        raise SampleProblem(f"depth PNG must be single-channel 16-bit (mm), got {depth.dtype} shape {depth.shape}", path)
    if depth.shape != (h, w):
        raise SampleProblem(f"depth PNG is {depth.shape[0]}x{depth.shape[1]} but the image is {h}x{w}", path)
    return depth.astype(np.float32) / 1000.0


def coco_layout(root: str | Path, split: str, with_depth: bool = False, dataset: str = "coco") -> CocoPanopticReader:
    """Reader for the COCO directory layout (`root/annotations/panoptic_{split}.json`, ...)."""
    root = Path(root)
    depth_dir = root / f"depth_{split}" if with_depth else None
    return CocoPanopticReader(root / "annotations" / f"panoptic_{split}.json", depth_dir=depth_dir, dataset=dataset)


def _malformed_image(image: Any) -> str | None:
    if not isinstance(image, dict):
        return f"expected an object, got {type(image).__name__}"
    if not isinstance(image.get("id"), (int, str)) or isinstance(image.get("id"), bool):
        return "'id' must be an integer or a string"
    if not isinstance(image.get("file_name"), str) or not image["file_name"]:
        return "'file_name' must be a non-empty string"
    return None


def _malformed_annotation(ann: Any) -> str | None:
    if not isinstance(ann, dict):
        return f"expected an object, got {type(ann).__name__}"
    if not isinstance(ann.get("image_id"), (int, str)) or isinstance(ann.get("image_id"), bool):
        return "'image_id' must be an integer or a string"
    if not isinstance(ann.get("file_name"), str) or not ann["file_name"]:
        return "'file_name' must be a non-empty string"
    segments = ann.get("segments_info", [])
    if not isinstance(segments, list) or not all(isinstance(seg, dict) for seg in segments):
        return "'segments_info' must be a list of objects"
    return None
