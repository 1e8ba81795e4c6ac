"""Augmentation must move boxes and masks exactly with the pixels."""

from __future__ import annotations

import pytest
import torch

from detectors.data import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_transforms,
    pad_to_divisible,
)
from detectors.errors import UserInputError


def _sample(height: int = 100, width: int = 200) -> tuple[torch.Tensor, dict]:
    image = torch.rand(3, height, width)
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, 20:40, 10:30] = 1
    target = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
              "masks": masks}
    return image, target


def test_flip_mirrors_box_mask_and_pixels():
    image, target = _sample()
    flipped, out = RandomHorizontalFlip(p=1.0)(image, target)
    assert out["boxes"].tolist() == [[170.0, 20.0, 190.0, 40.0]]
    ys, xs = torch.nonzero(out["masks"][0], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1) == (170, 190)
    assert torch.equal(flipped[..., 0], image[..., -1])
    assert target["boxes"].tolist() == [[10.0, 20.0, 30.0, 40.0]]  # input not modified
    same, unchanged = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and unchanged is target


def test_resize_scales_short_edge_boxes_and_masks():
    image, target = _sample()
    resized, out = ResizeShortestEdge([50], max_size=1000)(image, target)
    assert resized.shape == (3, 50, 100)
    assert out["boxes"].tolist() == [[5.0, 10.0, 15.0, 20.0]]
    assert out["masks"].shape == (1, 50, 100) and out["masks"].dtype == torch.uint8
    ys, xs = torch.nonzero(out["masks"][0], as_tuple=True)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (5, 10, 15, 20)


def test_resize_caps_long_edge_at_max_size():
    image, target = _sample(100, 400)
    resized, out = ResizeShortestEdge([800], max_size=1000)(image, target)
    assert resized.shape[-2:] == (250, 1000)
    assert out["boxes"].tolist() == [[25.0, 50.0, 75.0, 100.0]]


def test_training_transforms_draw_from_the_swin_scales():
    torch.manual_seed(0)
    transforms = build_transforms(train=True, max_size=10_000)
    heights = {transforms(*_sample(100, 150))[0].shape[-2] for _ in range(40)}
    assert heights <= set(range(480, 801, 32)) and len(heights) > 3
    test_image, _ = build_transforms(train=False)(*_sample(100, 150))
    assert test_image.shape[-2:] == (800, 1200)
    empty = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 100, 150, dtype=torch.uint8)}
    _, out = Compose([ResizeShortestEdge([50], 1000)])(torch.rand(3, 100, 150), empty)
    assert out["masks"].shape == (0, 50, 75) and out["boxes"].shape == (0, 4)


def test_bad_transform_settings_name_the_field():
    with pytest.raises(UserInputError, match="short_edge_lengths"):
        ResizeShortestEdge([], max_size=1333)
    with pytest.raises(UserInputError, match="sample_style"):
        ResizeShortestEdge([800], max_size=1333, sample_style="uniform")


def test_pad_to_divisible_pads_bottom_right_to_multiples_of_32():
    images = [torch.ones(3, 50, 70), torch.ones(3, 65, 33)]
    batch, sizes = pad_to_divisible(images)
    assert batch.shape == (2, 3, 96, 96) and sizes == [(50, 70), (65, 33)]
    assert batch[0, :, :50, :70].eq(1).all() and batch[0, :, 50:].eq(0).all()
    assert batch[1, :, :, 33:].eq(0).all()
    exact, _ = pad_to_divisible([torch.ones(3, 64, 32)])
    assert exact.shape == (1, 3, 64, 32)
