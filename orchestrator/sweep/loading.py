"""Reading a sweep file, and checking every trial it can make against the base experiment before any starts."""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from detectors.errors import UserInputError
from orchestrator.config import ExperimentConfig, apply_overrides, describe_error, validate_experiment
from orchestrator.sweep.schema import SweepConfig, _flatten_space
from orchestrator.sweep.trials import trial_raw
from orchestrator.yaml_files import read_yaml_mapping


class Sweep:
    """A validated sweep: its config, the base experiment (raw and validated) and where it writes."""

    def __init__(self, path: Path, cfg: SweepConfig, base_raw: dict[str, Any], base: ExperimentConfig):
        self.path, self.cfg, self.base_raw, self.base = path, cfg, base_raw, base
        self.name = cfg.name or path.stem
        self.dir = (cfg.output_dir or base.output_dir / self.name).resolve()
        self.tracking_uri = base.tracking.uri or _default_uri(base)
        # explicit base storage: everything of the sweep in <it>/<sweep name>; by default its output dir
        self.storage = (base.storage.open(self.dir).child(self.name) if base.storage.path
                        else base.storage.open(self.dir))
        self.trials_storage = self.storage.child("trials").uri if base.storage.path else None
        self.configs: list[ExperimentConfig] = []  # the checked trial setups (random ranges at their bounds)

    def trial_config(self, values: dict[str, Any], name: str) -> ExperimentConfig:
        return ExperimentConfig.model_validate(trial_raw(self.base_raw, values, name, self.dir / "trials",
                                                         self.tracking_uri, self.cfg.per_method(),
                                                         self.trials_storage))


def _default_uri(base: ExperimentConfig) -> str:
    from orchestrator.tracking import default_uri
    return default_uri(base.run_dir.resolve())


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Read and check a sweep file. ``--set sweep.FIELD=V`` sets a field of the sweep itself
    (e.g. ``sweep.max_concurrent_trials=1``); any other ``--set`` overrides the base experiment."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file")
    own = [item.removeprefix("sweep.") for item in overrides if item.startswith("sweep.")]
    experiment_overrides = [item for item in overrides if not item.startswith("sweep.")]
    raw = apply_overrides(raw, own)
    raw["space"] = _flatten_space(raw.get("space"))
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserInputError(f"{path}: {describe_error(exc.errors()[0])}") from None

    base_path = cfg.base if cfg.base.is_absolute() else path.parent / cfg.base
    as_text = [f"{key}={json.dumps(value)}" for key, value in cfg.overrides.items()] + experiment_overrides
    try:
        base_raw = apply_overrides(read_yaml_mapping(base_path, "base experiment"), as_text)
        base = validate_experiment(base_path, copy.deepcopy(base_raw))
    except UserInputError as exc:
        raise UserInputError(f"{path}: base: {exc}") from None
    sweep = Sweep(path, cfg, base_raw, base)
    sweep.configs = _check_space(sweep)
    if cfg.asha is not None:
        _check_asha(sweep, sweep.configs)
    return sweep


def _check_space(sweep: Sweep) -> list[ExperimentConfig]:
    """Apply every candidate value to the base experiment, one field at a time and then together.

    Returns the distinct trial configurations that were checked (random ranges at their bounds).
    """
    space = sweep.cfg.space

    def validate(values: dict[str, Any], label: str) -> ExperimentConfig:
        try:
            return sweep.trial_config(values, "check")
        except ValidationError as exc:
            problem = describe_error(exc.errors()[0])
        except UserInputError as exc:
            problem = str(exc)
        hint = ""
        if "tuning.method" in values and "hyperparameter" in problem and sweep.base_raw.get("tuning", {}).get(
                "hyperparameters"):
            hint = " (a method sweep needs overrides: {tuning.hyperparameters: {}})"
        raise UserInputError(f"{sweep.path}: {label}: {problem}{hint}")

    for key, dimension in space.items():
        for value in dimension.candidates():
            validate({key: value}, f"space.{key}={json.dumps(value)}")
    keys = list(space)
    combinations = list(itertools.islice(itertools.product(*(space[k].candidates() for k in keys)), 2000))
    configs = []
    for combination in combinations:
        values = dict(zip(keys, combination))
        label = "space: the trial " + ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
        configs.append(validate(values, label))
    for index, values in enumerate(sweep.cfg.include):
        label = f"include[{index}]: the trial " + ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
        configs.append(validate(values, label))
    return configs


def _check_asha(sweep: Sweep, configs: list[ExperimentConfig]) -> None:
    asha = sweep.cfg.asha
    where = f"{sweep.path}: asha"
    if asha.max_t is None and sweep.base.schedule.iterations is None:
        raise UserInputError(f"{where}.max_t: required when the base experiment counts schedule.epochs")
    for cfg in configs:
        evaluate, checkpoint = cfg.evaluation.period, cfg.checkpoint.period
        if asha.metric.startswith("val/"):
            if not evaluate or (checkpoint and checkpoint % evaluate):
                raise UserInputError(
                    f"{where}.metric: {asha.metric} is only in the reports that evaluate: set evaluation.period "
                    f"(now {evaluate}) and make checkpoint.period (now {checkpoint}) 0 or a multiple of it")
        max_t = asha.max_t or cfg.schedule.iterations
        if max_t is not None and asha.grace_period >= max_t:
            raise UserInputError(f"{where}.grace_period: {asha.grace_period} must be below the trial's "
                                 f"{max_t} iterations")
