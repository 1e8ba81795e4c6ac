"""Detection augmentation in the style of detectron2 and the Swin detection recipes.

Every transform takes and returns ``(image, target)`` so that boxes and masks can never drift
out of step with the pixels. Randomness comes from torch's global generator: DataLoader seeds it
differently in each worker, and ``torch.manual_seed`` makes a run reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from detectors.errors import UserInputError

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]

# The statistics every Swin checkpoint was pre-trained with (on 0..1 pixels; times 255 for 0..255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = torch.tensor([255 * v for v in IMAGENET_MEAN]).view(1, 3, 1, 1)
_STD_255 = torch.tensor([255 * v for v in IMAGENET_STD]).view(1, 3, 1, 1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) with ImageNet's statistics, as the backbones were pre-trained."""
    return (images.float() - _MEAN_255.to(images.device)) / _STD_255.to(images.device)

# Multi-scale training of the Swin detection papers: short edge 480..800 in steps of 32.
SWIN_TRAIN_SHORT_EDGES: tuple[int, ...] = tuple(range(480, 801, 32))
SWIN_TEST_SHORT_EDGE = 800
SWIN_MAX_SIZE = 1333


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class ResizeShortestEdge:
    """Scale so the short edge has a sampled length, unless that pushes the long edge past
    ``max_size``, in which case the long edge is ``max_size`` (detectron2's rule).

    ``sample_style='choice'`` draws one of ``short_edge_lengths``; ``'range'`` draws an integer
    between its two values. A single length gives the deterministic test-time resize.
    """

    def __init__(self, short_edge_lengths: Sequence[int], max_size: int,
                 sample_style: str = "choice") -> None:
        lengths = [int(v) for v in short_edge_lengths]
        if not lengths or min(lengths) <= 0:
            raise UserInputError(f"short_edge_lengths must be positive integers, got "
                                 f"{list(short_edge_lengths)!r}")
        if max_size <= 0:
            raise UserInputError(f"max_size must be positive, got {max_size!r}")
        if sample_style not in ("choice", "range"):
            raise UserInputError(f"sample_style must be 'choice' or 'range', got {sample_style!r}")
        if sample_style == "range" and len(lengths) != 2:
            raise UserInputError(f"sample_style 'range' needs two short_edge_lengths (min, max), "
                                 f"got {lengths!r}")
        self.short_edge_lengths = lengths
        self.max_size = int(max_size)
        self.sample_style = sample_style

    def _sample(self) -> int:
        if self.sample_style == "range":
            low, high = sorted(self.short_edge_lengths)
            return int(torch.randint(low, high + 1, ()).item())
        return self.short_edge_lengths[int(torch.randint(len(self.short_edge_lengths), ()))]

    def output_size(self, height: int, width: int, short_edge: int) -> tuple[int, int]:
        scale = short_edge / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        new_h, new_w = self.output_size(height, width, self._sample())
        if (new_h, new_w) == (height, width):
            return image, target
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        target = dict(target)
        if "boxes" in target:
            factors = torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
            target["boxes"] = target["boxes"] * factors
        if "masks" in target:
            target["masks"] = _resize_masks(target["masks"], new_h, new_w)
        return image, target

    def __repr__(self) -> str:
        return (f"ResizeShortestEdge({self.short_edge_lengths}, max_size={self.max_size}, "
                f"sample_style={self.sample_style!r})")


def _resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour, so masks stay binary."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width))
    resized = F.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0]
    return resized.to(masks.dtype)


class RandomHorizontalFlip:
    """Mirror image, boxes and masks with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise UserInputError(f"flip probability must be in [0, 1], got {p!r}")
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()).item() >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        if "boxes" in target:
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def build_transforms(train: bool,
                     short_edge_lengths: Sequence[int] = SWIN_TRAIN_SHORT_EDGES,
                     max_size: int = SWIN_MAX_SIZE,
                     test_short_edge: int = SWIN_TEST_SHORT_EDGE,
                     flip_prob: float = 0.5,
                     sample_style: str = "choice") -> Compose:
    """Training: multi-scale resize and flip. Test: one fixed resize, no flip."""
    if train:
        return Compose([ResizeShortestEdge(short_edge_lengths, max_size, sample_style),
                        RandomHorizontalFlip(flip_prob)])
    return Compose([ResizeShortestEdge([test_short_edge], max_size)])


def pad_to_divisible(images: Sequence[torch.Tensor],
                     divisor: int = 32) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Batch images of different sizes, zero-padded at the bottom and right.

    Swin downsamples by 32, and padding only at the far edges keeps box coordinates valid.
    Returns the batch and each image's size before padding.
    """
    if not images:
        raise ValueError("pad_to_divisible needs at least one image")
    if divisor <= 0:
        raise ValueError(f"divisor must be positive, got {divisor}")
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    height = -(-max(h for h, _ in sizes) // divisor) * divisor
    width = -(-max(w for _, w in sizes) // divisor) * divisor
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], height, width))
    for slot, img in zip(batch, images):
        slot[:, : img.shape[-2], : img.shape[-1]].copy_(img)
    return batch, sizes
