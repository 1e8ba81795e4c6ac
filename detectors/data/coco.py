"""COCO-format detection dataset on top of pycocotools.

pycocotools trusts its input and fails deep inside training (a KeyError in the middle of epoch 3)
when a file is not what it should be. Everything a user can get wrong is checked here when the
dataset is built, and reported as one ``UserInputError`` line naming the file and the field.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
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
    coco = COCO()
    coco.dataset = read_coco_json(path)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        coco.createIndex()
    logger.debug("%s: %s", path, out.getvalue().strip())
    return coco


def read_coco_json(path: Path) -> dict[str, Any]:
    """The file's content, validated: every problem is one line naming the file and the entry."""
    if not path.is_file():
        raise UserInputError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))  # text, not bytes: one copy of the file in memory
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    _validate(path, data)
    return data


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
        if image["id"] in image_ids:
            raise UserInputError(f"{path}: images[{index}] repeats image id {image['id']!r}")
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

    Each image's annotations are kept pickled in one buffer (as detectron2's ``DatasetFromList`` keeps
    them): a DataLoader's forked processes read it without copying it, where a list of Python objects
    would be copied into each of them page by page as reading changes the objects' reference counts.
    pycocotools' index (``coco``), which evaluation needs, is built when first asked for.
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 transforms: Transform | None = None) -> None:
        self.ann_file = Path(ann_file)
        data = read_coco_json(self.ann_file)
        self.image_dir = _image_dir(image_dir)
        self.transforms = transforms
        self._coco: COCO | None = None
        self.cat_ids: list[int] = sorted(cat["id"] for cat in data["categories"])
        names = {cat["id"]: str(cat.get("name", cat["id"])) for cat in data["categories"]}
        self.class_names: list[str] = [names[c] for c in self.cat_ids]
        self.cat_id_to_label = {cat_id: i + 1 for i, cat_id in enumerate(self.cat_ids)}
        self.label_to_cat_id = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.ids, self._records, self.has_masks, without = _index_images(data)
        del data
        _release_freed_memory()
        if self.has_masks and without:
            logger.warning("%s: %d annotation(s) without a usable segmentation (first: id %s) are left out of "
                           "training", self.ann_file, len(without), without[0])

    @property
    def coco(self) -> COCO:
        """pycocotools' index of the file, for evaluation (built on first use)."""
        if self._coco is None:
            self._coco = load_coco(self.ann_file)
        return self._coco

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def check_files(self) -> None:
        """Fail at startup, not hours into training, when listed images are missing."""
        _check_images_exist(self.image_dir, (self._records[i]["file_name"] for i in range(len(self))), self.ann_file)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id, record = self.ids[index], self._records[index]
        path = self.image_dir / record["file_name"]
        if not path.is_file():
            raise UserInputError(f"image file not found: {path} (image id {image_id} in "
                                 f"{self.ann_file})")
        try:
            rgb = read_rgb(path)
        except OSError as exc:
            raise UserInputError(f"{path}: cannot read image ({exc})") from None
        if rgb.size != (record["width"], record["height"]):
            raise UserInputError(f"{path}: image is {rgb.width}x{rgb.height} but {self.ann_file} "
                                 f"says {record['width']}x{record['height']} (width x height)")
        image = pil_to_tensor(rgb).float().div_(255.0)
        target = self._target(image_id, record["annotations"], rgb.height, rgb.width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def annotations(self, index: int) -> list[dict[str, Any]]:
        """The ``index``-th image's annotations: as the file has them, with ``segmentation`` usable or None."""
        return self._records[index]["annotations"]

    def _target(self, image_id: int, annotations: list[dict[str, Any]], height: int, width: int) -> Target:
        boxes, labels, masks = [], [], []
        for ann in annotations:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            x1, y1 = max(float(x), 0.0), max(float(y), 0.0)
            x2, y2 = min(float(x + w), float(width)), min(float(y + h), float(height))
            if x2 <= x1 or y2 <= y1:
                continue
            if self.has_masks:
                if ann["segmentation"] is None:
                    continue
                masks.append(_mask(ann["segmentation"], height, width))
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


def check_coco_files(image_dir: str | os.PathLike, ann_file: str | os.PathLike) -> None:
    """What a run checks before it starts, without building the index: the file is valid and every image
    it lists is there."""
    ann_file = Path(ann_file)
    images = read_coco_json(ann_file)["images"]
    _check_images_exist(_image_dir(image_dir), (image["file_name"] for image in images), ann_file)


def _image_dir(image_dir: str | os.PathLike) -> Path:
    if not Path(image_dir).is_dir():
        raise UserInputError(f"image directory not found: {image_dir}")
    return Path(image_dir)


def _check_images_exist(image_dir: Path, file_names, ann_file: Path) -> None:
    paths = [image_dir / name for name in file_names]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise UserInputError(f"image file not found: {missing[0]} ({len(missing)} of "
                             f"{len(paths)} images listed in {ann_file} are missing)")


def _index_images(data: dict[str, Any]) -> tuple[list[int], PickledList, bool, list[int]]:
    """Image ids in order; for each its file name, size and annotations (in the file's order, each with a
    usable segmentation or None); whether any object has a mask; the ids of those without one."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    without, has_masks = [], False
    for ann in data["annotations"]:
        kept = {key: ann[key] for key in ("id", "category_id", "bbox", "iscrowd") if key in ann}
        if ann.get("iscrowd", 0):
            kept["segmentation"] = ann.get("segmentation")
        else:
            kept["segmentation"] = usable_segmentation(ann.get("segmentation"))
            has_masks = has_masks or kept["segmentation"] is not None
            if kept["segmentation"] is None:
                without.append(ann["id"])
        by_image.setdefault(ann["image_id"], []).append(kept)
    data["annotations"].clear()  # each image's objects are freed once its record is pickled
    images = sorted(data["images"], key=lambda image: image["id"])
    records = ({"file_name": image["file_name"], "height": image["height"], "width": image["width"],
                "annotations": by_image.pop(image["id"], [])} for image in images)
    return [image["id"] for image in images], PickledList(records), has_masks, sorted(without)


def _release_freed_memory() -> None:
    """glibc keeps the pages of a parsed JSON file mapped after Python frees it (0.75 GiB of COCO's 1.3
    in one measure): hand them back to the system. Elsewhere, nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A polygon list or an RLE (compressed or not) as an (H, W) uint8 mask, as pycocotools' annToMask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class PickledList:
    """A list of records pickled into one numpy buffer (detectron2's ``NumpySerializedList``): reading an
    item unpickles a fresh copy, so no object in the buffer's pages is ever written after a fork."""

    def __init__(self, records) -> None:
        buffer, ends = bytearray(), []
        for record in records:
            buffer += pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
            ends.append(len(buffer))
        self._ends = np.asarray(ends, dtype=np.int64)
        self._bytes = np.frombuffer(buffer, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        start = int(self._ends[index - 1]) if index else 0
        return pickle.loads(self._bytes[start:int(self._ends[index])].data)

    @property
    def nbytes(self) -> int:
        return self._bytes.nbytes + self._ends.nbytes


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
