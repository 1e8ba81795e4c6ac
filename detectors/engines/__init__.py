"""Detector engines. ``torchvision`` always works; ``detectron2`` where the user installed it."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from detectors.engines import torchvision_engine  # noqa: F401 - registers the engine
from detectors.engines.base import ENGINES, Detector, Engine
from detectors.errors import UserInputError
from detectors.tuning import build_tuned_swin

DETECTRON2_INSTALL = ("pip install 'setuptools<82' && pip install --no-build-isolation "
                      "'git+https://github.com/facebookresearch/detectron2.git'")


def _detectron2_missing() -> str | None:
    if importlib.util.find_spec("detectron2") is None:
        return f"detectron2 is not installed; install it from source: {DETECTRON2_INSTALL}"
    return None


def _build_detectron2(detector: str, backbone, num_classes: int, **options) -> Detector:
    from detectors.engines.detectron2_engine import build_detectron2_detector  # imports detectron2
    return build_detectron2_detector(detector, backbone, num_classes, **options)


ENGINES.register("detectron2")(Engine(detectors=("cascade_mask_rcnn", "retinanet"), build=_build_detectron2,
                                      missing=_detectron2_missing,
                                      options=lambda detector: frozenset({"config_file", "opts"})))


def build_detector(engine: str, detector: str, num_classes: int, backbone: str = "swin_t",
                   tuning: str = "e3va", weights: str | Path | None = None,
                   hyperparameters: dict[str, Any] | None = None, detector_options: dict[str, Any] | None = None,
                   **backbone_options: Any) -> Detector:
    """Build ``detector`` of ``engine`` on a Swin ``backbone`` tuned by ``tuning``.

    Names and availability are checked before anything large is built. ``backbone_options`` go to
    ``build_swin`` (e.g. ``drop_path_rate``, or ``depths``/``embed_dim`` for a tiny test model);
    ``detector_options`` to the engine's detector constructor.
    """
    spec = ENGINES.get(engine)
    spec.check(engine, detector, detector_options or {})
    if num_classes < 1:
        raise UserInputError(f"num_classes must be at least 1, got {num_classes}")
    tuned = build_tuned_swin(backbone, tuning, hyperparameters, weights=weights, **backbone_options)
    return spec.build(detector, tuned, num_classes, **(detector_options or {}))


__all__ = ["ENGINES", "Detector", "Engine", "build_detector", "DETECTRON2_INSTALL"]
