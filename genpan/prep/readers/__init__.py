"""Dataset readers. Each yields one record type (genpan.prep.readers.base.Sample) or a SampleError.

    reader = make_reader("coco", json_path="coco/annotations/panoptic_val2017.json")
    for ref in reader.refs(): sample = reader.load(ref)
"""

from __future__ import annotations

from typing import Any

from genpan.prep.readers.base import Category, Reader, Sample, SampleError, SampleRef, iterate

__all__ = ["Category", "Reader", "Sample", "SampleError", "SampleRef", "iterate", "make_reader", "READER_KINDS"]

READER_KINDS = ("coco", "synthetic", "cityscapes", "nyu_bts", "nyu_mat", "folder")


def make_reader(kind: str, **options: Any) -> Reader:
    """Build a reader by kind. Options per kind:

    coco:       json_path, png_dir=None, image_dir=None, depth_dir=None  (or root + split for the COCO layout)
    synthetic:  root, split                      (COCO layout + depth_{split}/ in mm)
    cityscapes: root, split                      (createPanopticImgs output)
    nyu_bts:    root, filelist
    nyu_mat:    mat_path, splits_path=None, split="test"
    folder:     root
    """
    from genpan.prep.readers.cityscapes import CityscapesPanopticReader
    from genpan.prep.readers.coco import CocoPanopticReader, coco_layout
    from genpan.prep.readers.folder import ImageFolderReader
    from genpan.prep.readers.nyu import NyuBtsReader, NyuMatReader

    try:
        if kind == "coco":
            if "json_path" in options:
                return CocoPanopticReader(**options)
            return coco_layout(options["root"], options["split"], with_depth=bool(options.get("with_depth", False)))
        if kind == "synthetic":
            return coco_layout(options["root"], options["split"], with_depth=True, dataset="synthetic")
        if kind == "cityscapes":
            return CityscapesPanopticReader(options["root"], options.get("split", "val"))
        if kind == "nyu_bts":
            return NyuBtsReader(options["root"], options["filelist"])
        if kind == "nyu_mat":
            return NyuMatReader(options["mat_path"], options.get("splits_path"), options.get("split", "test"))
        if kind == "folder":
            return ImageFolderReader(options["root"])
    except KeyError as exc:
        raise ValueError(f"reader {kind!r} needs option {exc.args[0]!r}; see prep.readers.make_reader") from None
    except TypeError as exc:
        raise ValueError(f"reader {kind!r}: {exc}") from None
    raise ValueError(f"unknown reader kind {kind!r}; choose one of {', '.join(READER_KINDS)}")
