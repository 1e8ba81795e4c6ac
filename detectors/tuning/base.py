"""What every tuning method is: a frozen dataclass of hyperparameters and an ``apply`` step.

A method takes a freshly built (and possibly pre-trained) ``SwinBackbone`` and returns the module
the detector uses as its backbone: the same object, frozen and perhaps with adapters injected, or
a wrapper around it (E3VA's highway). Whatever it returns maps images to the same
``{res2..res5}`` NCHW feature dict and marks exactly the parameters that train with
``requires_grad``. Nothing outside ``detectors/tuning`` knows which method runs.
"""
from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from detectors.backbones.swin import SwinBackbone, SwinBlock, build_swin
from detectors.errors import UserInputError
from detectors.registry import Registry


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base class of every method's hyperparameters (fields carry ``metadata={"help": ...}``)."""

    def check(self) -> None:
        """Raise UserInputError for values that make no sense; called after construction."""


class TuningMethod(ABC):
    """A way to decide what in the backbone trains, and what is added to it."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # Named presets from the papers, e.g. {"e3va+": {"rank": 16}}.
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    # Hyperparameters that trade time for memory and change nothing else (the same gradients), e.g.
    # {"recompute": True}: what the planner may switch on where the method does not fit otherwise.
    memory_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    @abstractmethod
    def apply(self, backbone: SwinBackbone) -> nn.Module:
        """Freeze / inject in place; return the module to use as the backbone."""

    def tune(self, backbone: SwinBackbone) -> nn.Module:
        """``apply`` on a random stream of the method's own, seeded by one draw from the global one.

        Every method, FIXED included, takes exactly one number from the global generator, so whatever
        is built after it (an FPN, the heads) draws the same numbers whichever method runs: at one seed,
        every method's detector starts from the same neck and heads, and the method's own modules
        still follow the seed.
        """
        seed = int(torch.randint(0, 2 ** 62, (), device="cpu"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.apply(backbone)


TUNING_METHODS: Registry[type[TuningMethod]] = Registry("tuning method")


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def unfreeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(True)


def iter_blocks(backbone: SwinBackbone) -> Iterator[SwinBlock]:
    for stage in backbone.layers:
        yield from stage.blocks


def variant_table() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every selectable name: the methods themselves and their papers' named variants."""
    table = {}
    for name in TUNING_METHODS.names():
        cls = TUNING_METHODS.get(name)
        table[name] = (name, {})
        for variant, hparams in cls.variants.items():
            table[variant] = (name, dict(hparams))
    return table


def hyperparameter_names(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(TUNING_METHODS.get(method).Config)]


def resolve_method(name: str, overrides: dict[str, Any] | None = None) -> tuple[str, MethodConfig]:
    """Turn a method or variant name plus user overrides into (method name, validated config)."""
    table = variant_table()
    if name not in table:
        raise UserInputError(f"unknown tuning method {name!r}; choose one of {', '.join(table)}")
    method, hparams = table[name]
    config_cls = TUNING_METHODS.get(method).Config
    types = typing.get_type_hints(config_cls)
    for key, value in (overrides or {}).items():
        if key not in types:
            valid = ", ".join(types) or "none"
            raise UserInputError(f"unknown hyperparameter {key!r} for method {method}; valid: {valid}")
        hparams[key] = _coerce(method, key, types[key], value)
    cfg = config_cls(**hparams)
    cfg.check()
    return method, cfg


def memory_savers(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's ``memory_options`` that neither the variant ``name`` nor ``overrides`` already set:
    what a planner may switch on without overruling the user (empty where there is nothing to switch)."""
    resolve_method(name, overrides)  # unknown names and bad values fail here, naming themselves
    method, hparams = variant_table()[name]
    given = {**hparams, **(overrides or {})}
    return {k: v for k, v in TUNING_METHODS.get(method).memory_options.items() if k not in given}


def result_hyperparameters(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved hyperparameters that decide what the method computes: its ``memory_options`` left
    out, so a checkpoint trained with recomputation resumes without it, and the other way round."""
    method, cfg = resolve_method(name, overrides)
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TUNING_METHODS.get(method).memory_options}


def _coerce(method: str, key: str, expected: type, value: Any) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise UserInputError(f"hyperparameter {key}={value!r} for method {method} must be {expected.__name__}")
    return value


def build_tuning(name: str, **overrides: Any) -> TuningMethod:
    """``build_tuning("e3va", rank=16)`` or ``build_tuning("lorand++")``."""
    method, cfg = resolve_method(name, overrides)
    return TUNING_METHODS.get(method)(cfg)


def build_tuned_swin(name: str, tuning: str = "full", hyperparameters: dict[str, Any] | None = None,
                     weights: str | Path | None = None, **backbone_options: Any) -> nn.Module:
    """A Swin ``name`` (pre-trained from ``weights`` if given) tuned by ``tuning`` with ``hyperparameters``.

    The method's name and values are checked before anything large is built; ``backbone_options`` go to
    ``build_swin`` (``drop_path_rate``, or ``depths``/``embed_dim`` for a tiny test model).
    """
    method = build_tuning(tuning, **(hyperparameters or {}))
    return method.tune(build_swin(name, weights=weights, **backbone_options))


def positive(method: str, **values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise UserInputError(f"hyperparameter {key}={value} for method {method} must be positive")
