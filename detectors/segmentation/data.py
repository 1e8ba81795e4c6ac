"""Semantic-segmentation data in the ADE20K layout, and a seeded synthetic set in the same layout.

ADE20K on disk is ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with a label PNG of the
same stem in ``annotations/{training,validation}/``. Its labels are 0-150 with 0 = "other", which is
not scored: ``reduce_zero_label`` turns 0 into 255 (ignored) and 1-150 into 0-149. Any dataset laid out
the same way (Cityscapes-style custom sets, converted) works with its own class list.

Every problem is one line naming the file or folder: a split without its annotation folder, an image
without its label PNG, a label value that is no class (other than 255).
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from detectors.data._atomic import atomic_write_bytes, atomic_write_json, written_with
from detectors.data.images import read_rgb
from detectors.data.synthetic import SHAPE_CLASSES, _draw_image
from detectors.errors import UserInputError
from detectors.segmentation.upernet import IGNORE_INDEX

SPLITS = ("training", "validation")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SYNTHETIC_VERSION = 1


class SegmentationFolder(Dataset):
    """``(image uint8 (3, H, W), labels int64 (H, W))`` pairs of one split of an ADE20K-layout folder."""

    def __init__(self, root: str | Path, split: str, class_names: Sequence[str], reduce_zero_label: bool = False,
                 transforms: Callable | None = None):
        if split not in SPLITS:
            raise UserInputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.root, self.split = Path(root), split
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.reduce_zero_label, self.transforms = reduce_zero_label, transforms
        self.image_dir, self.label_dir = self.root / "images" / split, self.root / "annotations" / split
        self.images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if self.image_dir.is_dir() else []

    def check_files(self, cache_dir: str | Path | None = None) -> Path | None:
        """Every folder and label file there, and every label value a class, before any training starts.

        Label files are checked on all CPUs (Pillow decodes without Python's lock). With ``cache_dir``, a
        folder that passed before (``remember_check``) is not read again until a label file is added, removed
        or rewritten; the marker to remember this check by is returned (None when it was remembered), for the
        caller to write once everything it checks has passed."""
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise UserInputError(f"{folder} is missing: an ADE20K-layout dataset has images/{self.split} and "
                                     f"annotations/{self.split} under {self.root}")
        if not self.images:
            raise UserInputError(f"{self.image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        labels = {entry.name: entry for entry in os.scandir(self.label_dir)}
        for image in self.images:
            if f"{image.stem}.png" not in labels:
                raise UserInputError(f"{image} has no label file {self.label_dir / (image.stem + '.png')}")
        marker = Path(cache_dir) / f"labels-{self._fingerprint(labels)}.ok" if cache_dir is not None else None
        if marker is not None and marker.is_file():
            return None
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for _ in pool.map(self.check_label_values, range(len(self.images))):
                pass
        return marker

    def _fingerprint(self, labels: dict[str, os.DirEntry]) -> str:
        """The label files this split reads (name, size, modification time) and the classes they are checked
        against."""
        digest = hashlib.sha256(f"{self.label_dir.resolve()}|{self.num_classes}|{self.reduce_zero_label}".encode())
        for image in self.images:
            stat = labels[f"{image.stem}.png"].stat()
            digest.update(f"\n{image.stem}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:32]

    def check_label_values(self, index: int) -> None:
        """A label that is no class (other than 255) fails here, by its file, not in a training step:
        8-bit label images are checked by their histogram (milliseconds), others read in full."""
        highest = self.num_classes if self.reduce_zero_label else self.num_classes - 1
        path = self.label_path(index)
        try:
            with Image.open(path) as picture:
                counts = picture.histogram() if picture.mode in ("L", "P") else None
        except OSError as exc:
            raise UserInputError(f"cannot read label file {path}: {exc}") from None
        if counts is None:
            self.read_labels(index)
            return
        wrong = [value for value in range(highest + 1, IGNORE_INDEX) if counts[value]]
        if wrong:
            raise UserInputError(f"{path}: label value {wrong[-1]} is not a class of this dataset "
                                 f"({self.num_classes} classes{', 0 ignored' if self.reduce_zero_label else ''}; "
                                 f"255 = ignore)")

    def __len__(self) -> int:
        return len(self.images)

    def label_path(self, index: int) -> Path:
        return self.label_dir / f"{self.images[index].stem}.png"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.asarray(read_rgb(self.images[index])).copy()).permute(2, 0, 1)
        labels = self.read_labels(index)
        if labels.shape != image.shape[1:]:
            raise UserInputError(f"{self.label_path(index)} is {tuple(labels.shape)} pixels, its image "
                                 f"{self.images[index].name} {tuple(image.shape[1:])}")
        return self.transforms(image, labels) if self.transforms is not None else (image, labels)

    def read_labels(self, index: int) -> torch.Tensor:
        path = self.label_path(index)
        try:
            with Image.open(path) as picture:
                raw = np.asarray(picture)
        except OSError as exc:
            raise UserInputError(f"cannot read label file {path}: {exc}") from None
        if raw.ndim != 2:
            raise UserInputError(f"{path} is not a single-channel label image (mode with {raw.ndim} dimensions)")
        labels = torch.from_numpy(raw.astype(np.int64))
        if self.reduce_zero_label:  # 0 ("other") is ignored, 1..K become 0..K-1
            labels = torch.where(labels == 0, IGNORE_INDEX, labels - 1)
            labels[labels == IGNORE_INDEX - 1] = IGNORE_INDEX
        wrong = labels[(labels >= self.num_classes) & (labels != IGNORE_INDEX)]
        if wrong.numel():
            shown = int(wrong.max()) + (1 if self.reduce_zero_label else 0)
            raise UserInputError(f"{path}: label value {shown} is not a class of this dataset "
                                 f"({self.num_classes} classes{', 0 ignored' if self.reduce_zero_label else ''}; "
                                 f"255 = ignore)")
        return labels


def remember_check(marker: Path | None) -> None:
    """Write a marker ``check_files`` returned; one that cannot be written costs the next run the same check."""
    if marker is not None:
        try:
            atomic_write_json(marker, {"checked": marker.stem})
        except OSError:
            pass


def make_synthetic_segmentation(out_dir: str | Path, num_train: int = 48, num_val: int = 16,
                                image_size: tuple[int, int] = (128, 160), num_classes: int = 3,
                                seed: int = 0) -> dict:
    """The synthetic shapes (as the detection set draws them) as an ADE20K-layout segmentation set:
    class 0 is the textured background, 1..num_classes the shapes. Written once; a manifest of the
    parameters, written last, makes a later call with the same ones return at once."""
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise UserInputError(f"num_classes must be between 1 and {len(SHAPE_CLASSES)}, got {num_classes!r}")
    out = Path(out_dir)
    height, width = int(image_size[0]), int(image_size[1])
    params = {"version": _SYNTHETIC_VERSION, "num_train": num_train, "num_val": num_val,
              "image_size": [height, width], "num_classes": num_classes, "seed": seed}
    result = {"root": str(out), "class_names": ["background", *SHAPE_CLASSES[:num_classes]],
              "reduce_zero_label": False}
    manifest = out / "manifest.json"
    if written_with(manifest, params):
        return result
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        for index in range(1, count + 1):
            rng = np.random.default_rng([seed, split_index, index])
            pixels, objects = _draw_image(rng, height, width, num_classes)
            labels = np.zeros((height, width), dtype=np.uint8)
            for category_id, _, rle in objects:
                labels[mask_utils.decode(rle).astype(bool)] = category_id
            atomic_write_bytes(out / "images" / split / f"{index:06d}.jpg", _encode(pixels, "JPEG"))
            atomic_write_bytes(out / "annotations" / split / f"{index:06d}.png", _encode(labels, "PNG"))
    atomic_write_json(manifest, params)
    return result


def _encode(pixels: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind, **({"quality": 95} if kind == "JPEG" else {}))
    return buffer.getvalue()
