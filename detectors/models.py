"""The models built beside the engines' detectors (UPerNet, the linear classifier), by the name an experiment's
``model.detector`` gives: how each is built on a tuned Swin, which options it takes, and a training step on
fixed synthetic data, so that the bench and the memory planner measure every model alike.

Detectors come from the engines (``detectors.engines``). A model registers itself in its own module,
``MODELS.register(name)(ModelSpec(...))``, and that module is named in ``_MODULES`` here, which are
imported on first use (so that importing ``detectors`` stays light).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detectors.errors import UserInputError
from detectors.registry import Registry


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    task: str  # the task whose experiments name this model
    build: Callable[..., nn.Module]  # (tuned backbone, num_classes, **options) -> the model
    # (model in train mode, images, num_classes) -> a loss on fixed random targets, for the bench's steps
    synthetic_loss: Callable[[nn.Module, torch.Tensor, int], Callable[[], torch.Tensor]]
    bench_classes: int  # the classes the bench measures with when it is not told (the papers' dataset's)


MODELS: Registry[ModelSpec] = Registry("model")
_MODULES = ("detectors.segmentation.upernet", "detectors.classification")


def _registered() -> Registry[ModelSpec]:
    for module in _MODULES:
        importlib.import_module(module)
    return MODELS


def model_spec(name: str) -> ModelSpec | None:
    """The model ``name``, or None where it is an engine's detector (or no model at all)."""
    models = _registered()
    return models.get(name) if name in models else None


def models_of(task: str) -> list[str]:
    models = _registered()
    return [name for name in models.names() if models.get(name).task == task]


def check_model(name: str, options: dict) -> None:
    """The model's name and its ``model.options``, before anything is built."""
    spec = _registered().get(name)
    accepted = set(inspect.signature(spec.build).parameters) - {"backbone", "num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserInputError(f"model.options: {', '.join(unknown)} is not an option of {name} "
                             f"(it takes {', '.join(sorted(accepted))})")


def build_model(name: str, num_classes: int, backbone: str = "swin_t", tuning: str = "e3va",
                weights: str | Path | None = None, hyperparameters: dict | None = None, options: dict | None = None,
                **backbone_options: Any) -> nn.Module:
    """Model ``name`` on a Swin ``backbone`` tuned by ``tuning`` (as ``build_detector`` for detectors);
    ``options`` go to its constructor, their names checked first."""
    from detectors.tuning import build_tuned_swin
    check_model(name, options or {})
    tuned = build_tuned_swin(backbone, tuning, hyperparameters, weights=weights, **backbone_options)
    return MODELS.get(name).build(tuned, num_classes, **(options or {}))
