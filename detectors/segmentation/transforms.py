"""The Swin semantic-segmentation recipe's pipeline, on ``(image uint8 (3, H, W), labels int64 (H, W))``.

Training (``TrainTransform``): resize to the 2048x512 scale times a ratio in [0.5, 2.0] (keeping the
aspect ratio), a random 512x512 crop in which no class covers more than 75% of the labelled pixels (ten
tries), a horizontal flip, photometric distortion, and padding to the crop size (labels with 255,
ignored). Testing (``EvalTransform``): resize to the scale, keeping the aspect ratio. Randomness comes
from torch's global generator.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from detectors.segmentation.upernet import IGNORE_INDEX

ADE20K_SCALE = (2048, 512)  # (long edge, short edge) the image is fitted into
ADE20K_CROP = (512, 512)


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """The size that fits (height, width) into ``scale`` = (long, short) edges, keeping the ratio (mmcv's rule)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize(image: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image.round().clamp(0, 255).to(torch.uint8), labels


class TrainTransform:
    def __init__(self, scale: Sequence[int] = ADE20K_SCALE, crop: Sequence[int] = ADE20K_CROP,
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip: float = 0.5):
        self.scale, self.crop, self.ratio_range = tuple(scale), tuple(crop), ratio_range
        self.cat_max_ratio, self.flip = cat_max_ratio, flip

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        image, labels = resize(image, labels, rescale_size(*image.shape[1:], [s * ratio for s in self.scale]))
        image, labels = self.random_crop(image, labels)
        if float(torch.rand(())) < self.flip:
            image, labels = image.flip(-1), labels.flip(-1)
        image = photometric_distortion(image)
        return pad_to(image, labels, self.crop)

    def random_crop(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        crop_h, crop_w = self.crop
        height, width = labels.shape
        for _ in range(10):
            top = int(torch.randint(0, max(height - crop_h, 0) + 1, ()))
            left = int(torch.randint(0, max(width - crop_w, 0) + 1, ()))
            window = labels[top:top + crop_h, left:left + crop_w]
            counts = torch.bincount(window[window != IGNORE_INDEX].flatten())
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return image[:, top:top + crop_h, left:left + crop_w], window


def photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """Brightness (+-32), contrast (0.5-1.5), saturation (0.5-1.5) and hue (+-18 of 180 degrees),
    each applied with probability 0.5, contrast before or after the colour changes (mmseg's order)."""
    def maybe() -> bool:
        return float(torch.rand(())) < 0.5

    def uniform(low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high))

    if maybe():
        image = (image.float() + uniform(-32, 32)).clamp(0, 255).to(torch.uint8)
    contrast_first = maybe()
    if contrast_first and maybe():
        image = TF.adjust_contrast(image, uniform(0.5, 1.5))
    if maybe():
        image = TF.adjust_saturation(image, uniform(0.5, 1.5))
    if maybe():
        image = TF.adjust_hue(image, uniform(-18, 18) / 360)
    if not contrast_first and maybe():
        image = TF.adjust_contrast(image, uniform(0.5, 1.5))
    return image


def pad_to(image: torch.Tensor, labels: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom and right to at least ``size``: images with 0, labels with the ignore label."""
    pad_h, pad_w = max(size[0] - labels.shape[0], 0), max(size[1] - labels.shape[1], 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        labels = F.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    return image, labels


class EvalTransform:
    def __init__(self, scale: Sequence[int] = ADE20K_SCALE):
        self.scale = tuple(scale)

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image resized into the scale; the labels as they are (scores are taken at the original size)."""
        resized, _ = resize(image, labels, rescale_size(*image.shape[1:], self.scale))
        return resized, labels
