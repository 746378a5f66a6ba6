"""Cityscapes panoptic in COCO form, as written by cityscapesScripts `createPanopticImgs`.

Layout under the Cityscapes root:
    gtFine/cityscapes_panoptic_{split}.json
    gtFine/cityscapes_panoptic_{split}/{city}_{seq}_{frame}_gtFine_panoptic.png
    leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
The JSON's category ids are Cityscapes label ids (7 = road … 33 = bicycle), or train ids 0..18 when the
script ran with `--use-train-id`; both map to the 19 evaluated train ids, 8 of them things. With
`--use-train-id` the script names its output `cityscapes_panoptic_{split}_trainId.json` (and folder):
split "val_trainId" reads it, and so does split "val" when only that variant exists.

The script writes each image's `file_name` as `{stem}_gtFine_leftImg8bit.png` (it derives it from the
`_gtFine_instanceIds.png` name), which is not the photo's name: the photo is found from the stem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genpan.prep.readers.base import Category, make_key
from genpan.prep.readers.coco import CocoPanopticReader

TRAIN_ID_SUFFIX = "_trainId"  # createPanopticImgs --use-train-id: cityscapes_panoptic_{split}_trainId.json

# (label id, train id, name, isthing) of the 19 evaluated Cityscapes classes.
CITYSCAPES_CLASSES: list[tuple[int, int, str, bool]] = [
    (7, 0, "road", False), (8, 1, "sidewalk", False), (11, 2, "building", False), (12, 3, "wall", False),
    (13, 4, "fence", False), (17, 5, "pole", False), (19, 6, "traffic light", False), (20, 7, "traffic sign", False),
    (21, 8, "vegetation", False), (22, 9, "terrain", False), (23, 10, "sky", False), (24, 11, "person", True),
    (25, 12, "rider", True), (26, 13, "car", True), (27, 14, "truck", True), (28, 15, "bus", True),
    (31, 16, "train", True), (32, 17, "motorcycle", True), (33, 18, "bicycle", True),
]


class CityscapesPanopticReader(CocoPanopticReader):
    name = "cityscapes"

    def __init__(self, root: str | Path, split: str = "val") -> None:
        root = Path(root)
        image_split = split.removesuffix(TRAIN_ID_SUFFIX)
        if split == image_split and not (root / "gtFine" / f"cityscapes_panoptic_{split}.json").exists() \
                and (root / "gtFine" / f"cityscapes_panoptic_{split}{TRAIN_ID_SUFFIX}.json").exists():
            split += TRAIN_ID_SUFFIX  # only the --use-train-id output is there
        super().__init__(
            root / "gtFine" / f"cityscapes_panoptic_{split}.json",
            png_dir=root / "gtFine" / f"cityscapes_panoptic_{split}",
            image_dir=root / "leftImg8bit" / image_split,
            dataset="cityscapes",
        )

    def _make_categories(self, categories: list[dict[str, Any]]) -> list[Category]:
        ids = {int(c["id"]) for c in categories}
        uses_train_ids = ids <= set(range(19))
        by_label = {label: (train, name, thing) for label, train, name, thing in CITYSCAPES_CLASSES}
        by_train = {train: (train, name, thing) for _, train, name, thing in CITYSCAPES_CLASSES}
        table = by_train if uses_train_ids else by_label
        unknown = sorted(ids - table.keys())
        if unknown:
            raise ValueError(f"{self.json_path}: category ids {unknown} are not Cityscapes evaluated classes")
        return [Category(i, table[i][1], table[i][2], table[i][0]) for i in sorted(ids)]

    def _image_path(self, image: dict[str, Any]) -> Path:
        name = Path(str(image["file_name"])).name.replace("_gtFine_leftImg8bit", "_leftImg8bit")
        return self.image_dir / name.split("_")[0] / name

    def _key(self, image: dict[str, Any]) -> str:
        return make_key(str(image.get("id") or Path(str(image["file_name"])).stem.removesuffix("_leftImg8bit")))
