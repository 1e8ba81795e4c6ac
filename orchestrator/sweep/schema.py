"""The sweep file's schema: the search space, ASHA early stopping and the sweep's own fields, as pydantic models."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.config import Strict, safe_name

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# Set per trial by the sweep itself.
RESERVED = ("name", "output_dir", "tracking", "storage")
# Metrics every report of the training loop carries; val/* only where it evaluated.
EVERY_REPORT = ("lr", "seconds_per_iteration", "step", "epoch")


class Dimension(Strict):
    """One searched field: exactly one of a grid, a random choice or a random range."""
    grid: list[Any] | None = Field(None, min_length=1, description="every value, one trial each (x num_samples)")
    choice: list[Any] | None = Field(None, min_length=1, description="one value at random per sample")
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="[low, high): high excluded")

    @model_validator(mode="after")
    def _one(self) -> "Dimension":
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}")
        low_high = self.uniform or self.loguniform or self.randint
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"{given[0]}: low must be below high (got {list(low_high)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive (got {list(self.loguniform)})")
        return self

    @property
    def random(self) -> bool:
        return self.grid is None

    def candidates(self) -> list[Any]:
        """Values checked against the base experiment before any trial: all listed values, or the bounds."""
        if self.grid is not None or self.choice is not None:
            return list(self.grid if self.grid is not None else self.choice)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        return list(self.uniform or self.loguniform)

    def to_tune(self):
        from ray import tune
        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.choice is not None:
            return tune.choice(self.choice)
        if self.randint is not None:
            return tune.randint(*self.randint)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)

    def describe(self) -> str:
        name = next(n for n in DISTRIBUTIONS if getattr(self, n) is not None)
        return f"{name} {json.dumps(getattr(self, name))}"


class AshaConfig(Strict):
    """ASHA early stopping on a metric the training loop reports (e.g. train/loss, val/bbox/AP)."""
    metric: str
    mode: Literal["min", "max"] | None = Field(None, description="default: max for val/*, min otherwise")
    grace_period: int = Field(1, ge=1, description="iterations before a trial can be stopped")
    reduction_factor: float = Field(2, gt=1)
    max_t: int | None = Field(None, ge=1, description="iterations of a full trial; default schedule.iterations")

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str) -> str:
        if not (value.startswith(("train/", "val/")) or value in EVERY_REPORT or value == "peak_memory_mb"):
            raise ValueError(f"{value!r} is not a reported metric; use e.g. train/loss, val/bbox/AP, "
                             f"val/segm/AP, val/segmentation/mIoU, seconds_per_iteration")
        return value

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("max" if self.metric.startswith("val/") else "min")


def _refuse_reserved(keys, verb: str, prefix: str = "") -> None:
    """A field the sweep sets for each trial (``RESERVED``) cannot be searched or given."""
    for key in keys:
        if key.split(".")[0] in RESERVED:
            raise ValueError(f"{prefix}{key}: set by the sweep for each trial; it cannot be {verb}")


class SweepConfig(Strict):
    name: str | None = Field(None, description="default: the sweep file's name")
    base: Path = Field(description="the base experiment YAML, relative to the sweep file")
    overrides: dict[str, Any] = Field({}, description="dotted path -> value, applied to the base experiment")
    space: dict[str, Dimension] = Field(min_length=1)
    include: list[dict[str, Any]] = Field([], description="trials beyond the grid, each a mapping of dotted path "
                                                          "-> value (e.g. controls: {backbone.upstream: null}); "
                                                          "needs a space of grids only")
    num_samples: int = Field(1, ge=1, description="repeats of the grid; draws of the random dimensions")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster holds")
    asha: AshaConfig | None = None
    output_dir: Path | None = Field(None, description="default: <base output_dir>/<name>")
    route: dict[str, str] = Field({}, description="GPU kind per tuning method, e.g. {e3va: 1080ti, full: v100}: "
                                                  "sets each trial's scaling.gpu_kind by its method")

    by_method: dict[str, dict[str, Any]] = Field({}, description="experiment fields per tuning method, e.g. "
                                                                 "{full: {schedule.lr: 1.0e-4}}: set on each trial "
                                                                 "of that method, after the space's values")

    @field_validator("route")
    @classmethod
    def _known_kinds(cls, value: dict[str, str]) -> dict[str, str]:
        from orchestrator.gpu_kinds import check_kind
        return {method: check_kind(kind, f"route.{method}") for method, kind in value.items()}

    @field_validator("by_method")
    @classmethod
    def _known_methods(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from detectors.tuning import variant_table
        flat = {}
        for method, fields in value.items():
            if method not in variant_table():
                raise ValueError(f"{method}: not a tuning method; choose from {', '.join(variant_table())}")
            flat[method] = _flatten_values(fields)
            _refuse_reserved(flat[method], "given", prefix=f"{method}.")
        return flat

    def per_method(self) -> dict[str, dict[str, Any]]:
        """What each method's trials set beyond the space: ``by_method``, and ``route``'s GPU kinds."""
        merged = {method: dict(fields) for method, fields in self.by_method.items()}
        for method, kind in self.route.items():
            merged.setdefault(method, {})["scaling.gpu_kind"] = kind
        return merged

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        return value if value is None else safe_name(value)

    @field_validator("space")
    @classmethod
    def _not_reserved(cls, value: dict[str, Dimension]) -> dict[str, Dimension]:
        _refuse_reserved(value, "searched")
        return value

    @field_validator("include")
    @classmethod
    def _flat_includes(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        flat = [_flatten_values(entry) for entry in value]
        for entry in flat:
            if not entry:
                raise ValueError("an included trial is empty")
            _refuse_reserved(entry, "given")
        return flat

    @model_validator(mode="after")
    def _include_needs_grids(self) -> "SweepConfig":
        if self.include and self.random:
            raise ValueError("include: extra trials need a space of grids only (no choice or random ranges)")
        return self

    @property
    def random(self) -> bool:
        return any(d.random for d in self.space.values())

    @property
    def num_trials(self) -> int:
        grid = math.prod(len(d.grid) for d in self.space.values() if d.grid is not None)
        return (grid + len(self.include)) * self.num_samples

    def grid_trials(self) -> list[dict[str, Any]]:
        """Every trial's values when the space is all grids: the product, then the included trials."""
        keys = list(self.space)
        product = [dict(zip(keys, values)) for values in itertools.product(*(self.space[k].grid for k in keys))]
        return product + [dict(entry) for entry in self.include]

    def param_space(self) -> dict[str, Any]:
        """Tune's search space. With included trials, one grid over whole trials under ``TRIAL_KEY``."""
        from ray import tune
        if self.include:
            return {TRIAL_KEY: tune.grid_search(self.grid_trials())}
        return {k: v.to_tune() for k, v in self.space.items()}


TRIAL_KEY = "trial"  # not an experiment field: the values of a whole trial, when the sweep lists trials


def trial_values(config: dict[str, Any]) -> dict[str, Any]:
    """The experiment fields a trial sets, from Tune's config of it."""
    return dict(config[TRIAL_KEY]) if set(config) == {TRIAL_KEY} else dict(config)


def _flatten(mapping: dict[str, Any], descend, prefix: str = "") -> dict[str, Any]:
    """Nested sections to dotted keys, going into a non-empty mapping where ``descend(key, value)``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and descend(key, value):
            flat.update(_flatten(value, descend, f"{path}."))
        else:
            flat[path] = value
    return flat


def _flatten_space(space: Any) -> Any:
    """Nested sections or dotted keys, to ``{"a.b.c": {grid: [...]}}``."""
    if not isinstance(space, dict):
        return space
    return _flatten(space, lambda key, value: not any(k in DISTRIBUTIONS for k in value))


def _flatten_values(entry: dict[str, Any]) -> dict[str, Any]:
    """``{backbone: {upstream: null}}`` or ``{backbone.upstream: null}`` -> ``{"backbone.upstream": None}``;
    a mapping under a dotted key is one value (``{backbone.upstream: {steps: 5}}``)."""
    return _flatten(entry, lambda key, value: "." not in key)
