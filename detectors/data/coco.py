"""COCO-format detection dataset on top of pycocotools.

pycocotools trusts its input and fails deep inside training (a KeyError in the middle of epoch 3)
when a file is not what it should be. Everything a user can get wrong is checked here when the
dataset is built, and reported as one ``UserInputError`` line naming the file and the field.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.transforms.functional import pil_to_tensor

from detectors.data.images import read_rgb
from detectors.errors import UserInputError

logger = logging.getLogger(__name__)

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """Load and validate a COCO instances file; pycocotools' progress prints go to the log."""
    path = Path(ann_file)
    if not path.is_file():
        raise UserInputError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    _validate(path, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()) as out:
        coco.createIndex()
    logger.debug("%s: %s", path, out.getvalue().strip())
    return coco


def _validate(path: Path, data: Any) -> None:
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: not a COCO instances file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserInputError(f"{path}: not a COCO instances file, missing key '{key}'")
    for index, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise UserInputError(f"{path}: categories[{index}] has no 'id'")
    image_ids = set()
    for index, image in enumerate(data["images"]):
        for field in ("id", "file_name", "height", "width"):
            if not isinstance(image, dict) or field not in image:
                raise UserInputError(f"{path}: images[{index}] has no '{field}'")
        image_ids.add(image["id"])
    cat_ids = {cat["id"] for cat in data["categories"]}
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "id" not in ann:
            raise UserInputError(f"{path}: annotations[{index}] has no 'id'")
        where = f"{path}: annotation id {ann['id']}"
        if ann.get("category_id") not in cat_ids:
            raise UserInputError(
                f"{where} has category_id {ann.get('category_id')!r}, not in 'categories'")
        if ann.get("image_id") not in image_ids:
            raise UserInputError(f"{where} has image_id {ann.get('image_id')!r}, not in 'images'")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise UserInputError(f"{where} has no valid 'bbox' [x, y, w, h]: {bbox!r}")


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets in the format torchvision's detection models take.

    Category ids are remapped to contiguous labels 1..K (0 is background for the R-CNN heads);
    ``label_to_cat_id`` maps them back for evaluation. ``masks`` are present when any non-crowd
    annotation has a usable segmentation (``has_masks``): VOC-style box-only data yields none. Then,
    as detectron2 does, polygons of fewer than three points are dropped and an annotation left without
    a segmentation (``segmentation: []``) is left out of training, with one warning naming how many
    and the first id; evaluation still scores against it. Crowd annotations and boxes without area
    inside the image are left out of training too (COCOeval uses them as the file has them).
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 transforms: Transform | None = None) -> None:
        self.ann_file = Path(ann_file)
        self.coco = load_coco(self.ann_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise UserInputError(f"image directory not found: {self.image_dir}")
        self.transforms = transforms
        self.ids: list[int] = sorted(self.coco.imgs)
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.cat_id_to_label = {cat_id: i + 1 for i, cat_id in enumerate(self.cat_ids)}
        self.label_to_cat_id = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.class_names: list[str] = [str(self.coco.cats[c].get("name", c)) for c in self.cat_ids]
        self.segmentations = {ann["id"]: usable_segmentation(ann.get("segmentation"))
                              for ann in self.coco.anns.values() if not ann.get("iscrowd", 0)}
        self.has_masks = any(self.segmentations.values())
        without = sorted(i for i, segmentation in self.segmentations.items() if not segmentation)
        if self.has_masks and without:
            logger.warning("%s: %d annotation(s) without a usable segmentation (first: id %s) are left out of "
                           "training", self.ann_file, len(without), without[0])

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def check_files(self) -> None:
        """Fail at startup, not hours into training, when listed images are missing."""
        missing = [path for path in map(self._image_path, self.ids) if not path.is_file()]
        if missing:
            raise UserInputError(f"image file not found: {missing[0]} ({len(missing)} of "
                                 f"{len(self.ids)} images listed in {self.ann_file} are missing)")

    def _image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self._image_path(image_id)
        if not path.is_file():
            raise UserInputError(f"image file not found: {path} (image id {image_id} in "
                                 f"{self.ann_file})")
        try:
            rgb = read_rgb(path)
        except OSError as exc:
            raise UserInputError(f"{path}: cannot read image ({exc})") from None
        if rgb.size != (info["width"], info["height"]):
            raise UserInputError(f"{path}: image is {rgb.width}x{rgb.height} but {self.ann_file} "
                                 f"says {info['width']}x{info['height']} (width x height)")
        image = pil_to_tensor(rgb).float().div_(255.0)
        target = self._target(image_id, rgb.height, rgb.width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _target(self, image_id: int, height: int, width: int) -> Target:
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            x1, y1 = max(float(x), 0.0), max(float(y), 0.0)
            x2, y2 = min(float(x + w), float(width)), min(float(y + h), float(height))
            if x2 <= x1 or y2 <= y1:
                continue
            if self.has_masks:
                segmentation = self.segmentations[ann["id"]]
                if not segmentation:
                    continue
                masks.append(self.coco.annToMask({**ann, "segmentation": segmentation}))
            boxes.append([x1, y1, x2, y2])
            labels.append(self.cat_id_to_label[ann["category_id"]])
        target: Target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": int(image_id),
            "orig_size": (height, width),
        }
        if self.has_masks:
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
            target["masks"] = torch.from_numpy(stacked.astype(np.uint8, copy=False))
        return target


def usable_segmentation(segmentation: Any) -> Any:
    """Polygons of at least three points (as detectron2 keeps them), an RLE as is, or None."""
    if isinstance(segmentation, dict):
        return segmentation if segmentation.get("counts") is not None else None
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        return polygons or None
    return None


def collate_fn(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor],
                                                                      list[Target]]:
    """Keep images a list: they differ in size until ``pad_to_divisible`` batches them."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
