"""Parameter counts of tuned backbones, as the papers report them (trainable M, % of the backbone).

Models are built on the meta device: counting Swin-L's 200M parameters costs no memory or time.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from detectors.backbones import build_swin
from detectors.tuning import TUNING_METHODS, resolve_method, variant_table


@dataclasses.dataclass
class ParamCount:
    backbone: str
    method: str
    variant: str
    hyperparameters: dict[str, Any]
    trainable: int       # trainable parameters of the tuned backbone (adapters and norms included)
    total: int           # all parameters of the tuned backbone
    backbone_total: int  # parameters of the plain backbone: what FULL trains

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.backbone_total

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "percent": round(self.percent, 4)}


def count_parameters(backbone: str, method: str, overrides: dict[str, Any] | None = None,
                     **backbone_overrides: Any) -> ParamCount:
    """Count for a method or a named variant (``e3va++``), with hyperparameter overrides;
    ``backbone_overrides`` change the Swin spec (e.g. ``depths`` of a small model)."""
    name, cfg = resolve_method(method, overrides)
    with torch.device("meta"):
        plain_total = sum(p.numel() for p in build_swin(backbone, **backbone_overrides).parameters())
        tuned = TUNING_METHODS.get(name)(cfg).tune(build_swin(backbone, **backbone_overrides))
    return ParamCount(
        backbone=backbone, method=name, variant=method, hyperparameters=dataclasses.asdict(cfg),
        trainable=sum(p.numel() for p in tuned.parameters() if p.requires_grad),
        total=sum(p.numel() for p in tuned.parameters()), backbone_total=plain_total)


# The papers' row order; methods added later follow in registry order.
PAPER_ORDER = ("full", "fixed", "bitfit", "norm", "partial-1", "adapter", "lora", "adaptformer",
               "lorand", "lorand+", "lorand++", "e3va", "e3va+", "e3va++")


def parameter_table(backbone: str) -> list[ParamCount]:
    """Every method and every named variant, in the papers' order."""
    names = sorted(variant_table(), key=lambda n: PAPER_ORDER.index(n) if n in PAPER_ORDER else len(PAPER_ORDER))
    return [count_parameters(backbone, name) for name in names]
