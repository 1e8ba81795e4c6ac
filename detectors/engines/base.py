"""One detector interface for every engine.

A detector is built from (engine, detector name, tuned backbone, number of classes). In training
mode ``forward(images, targets)`` returns the loss dict; ``predict(images)`` returns, per image,
``boxes`` (xyxy, in the coordinates of the image it was given), ``scores``, ``labels`` (1..K) and,
where the detector segments, ``masks`` (N x 1 x H x W probabilities). The neck and the heads always
train; the backbone trains as its tuning method decided when it was built.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from detectors.errors import UserInputError
from detectors.registry import Registry


@dataclasses.dataclass(frozen=True)
class Engine:
    """A detection library: the detectors it offers and how to build one on a tuned backbone."""

    detectors: tuple[str, ...]
    build: Callable[..., "Detector"]             # (detector, tuned_backbone, num_classes) -> Detector
    missing: Callable[[], str | None] = lambda: None  # why it cannot run here, or None
    options: Callable[[str], frozenset[str]] = lambda detector: frozenset()  # what the detector accepts

    def check(self, name: str, detector: str, options: Mapping[str, object] = ()) -> None:
        """Availability, name and options, before anything is built or started."""
        reason = self.missing()
        if reason:
            raise UserInputError(f"engine {name}: {reason}")
        if detector not in self.detectors:
            raise UserInputError(f"unknown detector {detector!r} for engine {name}; "
                                 f"choose one of {', '.join(self.detectors)}")
        unknown = sorted(set(options) - self.options(detector))
        if unknown:
            raise UserInputError(f"unknown option(s) {', '.join(unknown)} for {name}'s {detector} (model.options); "
                                 f"valid: {', '.join(sorted(self.options(detector)))}")


ENGINES: Registry[Engine] = Registry("detector engine")


class Detector(nn.Module):
    """Base class: engines subclass it and fill ``engine``, ``name``, ``has_masks``, ``backbone``."""

    engine: str = ""
    name: str = ""
    has_masks: bool = False

    @property
    def backbone(self) -> nn.Module:
        """The tuned backbone inside (for parameter counts and checkpoint fingerprints)."""
        raise NotImplementedError

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor],
                output_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict[str, torch.Tensor]]:
        """Per image: ``boxes`` (N x 4, x1 y1 x2 y2), ``scores``, ``labels`` (1..K) and, for mask
        detectors, ``masks`` (N x 1 x H x W, bool).

        The predictions are in the frame of ``output_sizes[i]`` (H, W), the image's size before the
        data pipeline resized it, or in the input's frame when it is None. Masks are pasted at that
        size and binarised exactly as the framework the detector comes from does it, so the
        figures match that framework's own evaluation.
        """
        raise NotImplementedError
