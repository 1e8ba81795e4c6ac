"""Predict a split (or one rank's shard of it) and count its pixels into a confusion matrix.

Scores are taken at each image's own size: the logits of the resized image are resized back before the
argmax. Ranks each predict ``detectors.training.evaluation_shard`` of the split; their matrices add up to
the one a single process counts (``ConfusionMatrix.merge``).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from detectors.data.transforms import normalise
from detectors.segmentation.data import SegmentationFolder
from detectors.segmentation.metrics import ConfusionMatrix
from detectors.segmentation.transforms import EvalTransform
from detectors.segmentation.upernet import UPerNet, slide_inference


@torch.no_grad()
def predict_split(model: UPerNet, dataset: SegmentationFolder, device: torch.device | str = "cpu",
                  indices: Iterable[int] | None = None, slide: tuple[tuple[int, int], tuple[int, int]] | None = None,
                  on_image: Callable[[int], None] | None = None) -> ConfusionMatrix:
    """The confusion matrix of ``model``'s predictions on ``dataset`` (or its ``indices``); whole-image
    inference, or sliding windows when ``slide`` = (crop, stride)."""
    model.eval()
    matrix = ConfusionMatrix(dataset.num_classes)
    for done, index in enumerate(range(len(dataset)) if indices is None else indices, start=1):
        image, labels = dataset[index]
        matrix.update(_labels_at(model, image.to(device), labels.shape[-2:], slide).cpu(), labels)
        if on_image is not None:
            on_image(done)
    return matrix


@torch.no_grad()
def predict_labels(model: UPerNet, picture: torch.Tensor, scale: tuple[int, int],
                   slide: tuple[tuple[int, int], tuple[int, int]] | None = None) -> torch.Tensor:
    """The class of every pixel (H, W) of one uint8 (3, H, W) picture, predicted as the validation split is:
    resized into ``scale``, scored back at the picture's own size."""
    model.eval()
    height, width = picture.shape[-2:]
    resized, _ = EvalTransform(scale)(picture, torch.zeros(height, width, dtype=torch.long))
    return _labels_at(model, resized, (height, width), slide)


def _labels_at(model: UPerNet, image: torch.Tensor, size, slide) -> torch.Tensor:
    image = normalise(image[None])
    logits = model(image) if slide is None else slide_inference(model, image, *slide)
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False).argmax(1)[0]
