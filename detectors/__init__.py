"""Pure-PyTorch side of the project: Swin backbone, tuning methods, detectors, data, evaluation.

Never imports Ray, MLflow or ``orchestrator``: everything here runs where only torch, timm and
torchvision are installed.

    >>> import detectors
    >>> model = detectors.build_backbone("swin_t", tuning="e3va", rank=16)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from detectors.backbones import SWIN_SPECS
from detectors.errors import UserInputError
from detectors.tuning import TUNING_METHODS, build_tuned_swin, variant_table

__all__ = ["build_backbone", "SWIN_SPECS", "TUNING_METHODS", "UserInputError", "variant_table"]


def build_backbone(name: str, tuning: str = "full", weights: str | Path | None = None,
                   drop_path_rate: float = 0.2, **hyperparameters: Any) -> nn.Module:
    """A Swin backbone (pre-trained from ``weights`` if given) tuned by ``tuning``.

    ``tuning`` is a method (``e3va``) or a named variant (``e3va++``); ``hyperparameters`` override
    its defaults (``rank=16``). The result maps images (B, 3, H, W) to ``{res2..res5}`` NCHW maps
    and has ``out_channels``, ``strides`` and ``size_divisibility``.
    """
    return build_tuned_swin(name, tuning, hyperparameters, weights=weights, drop_path_rate=drop_path_rate)
