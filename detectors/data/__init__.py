"""Datasets, augmentation and dataset tooling for detection training.

Pure PyTorch, pycocotools, numpy and Pillow: this package runs on a GPU box without Ray or MLflow.
"""

import importlib
from typing import Any

from detectors.data.coco import CocoDetection, collate_fn, load_coco
from detectors.data.synthetic import SHAPE_CLASSES, make_synthetic_coco
from detectors.data.transforms import (
    SWIN_MAX_SIZE,
    SWIN_TEST_SHORT_EDGE,
    SWIN_TRAIN_SHORT_EDGES,
    Compose,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_transforms,
    pad_to_divisible,
)

# The VOC names load on first use, so that ``python -m detectors.data.voc`` does not find its
# own module already imported by this package (runpy warns about that double import).
_LAZY = {"VOC_CLASSES": "detectors.data.voc", "convert_voc_to_coco": "detectors.data.voc"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SHAPE_CLASSES",
    "SWIN_MAX_SIZE",
    "SWIN_TEST_SHORT_EDGE",
    "SWIN_TRAIN_SHORT_EDGES",
    "VOC_CLASSES",
    "CocoDetection",
    "Compose",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "build_transforms",
    "collate_fn",
    "convert_voc_to_coco",
    "load_coco",
    "make_synthetic_coco",
    "pad_to_divisible",
]
