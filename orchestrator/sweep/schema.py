"""``python -m orchestrator sweep SWEEP.yaml``: an ablation over experiment fields with Ray Tune.

A sweep file names a base experiment (relative to the sweep file), overrides of it, a search space
over any experiment field by dotted path, optional ASHA early stopping and how many trials run at
once. Each trial is one Ray Train run with its own workers: a function trainable builds the trial's
``TorchTrainer`` (``run_experiment``) with ``TuneReportCallback`` in its ``RunConfig``, so every
report of the Train run reaches Tune and its scheduler (Ray 2.60's Train V2 pattern).

Everything a user can get wrong is found before any trial starts: every grid value is applied to the
base experiment and validated, and each trial's resources are compared with the Ray cluster's.

MLflow: one parent run for the sweep, one child run per trial (``mlflow.parentRunId``) with the
trial's varied fields as params. Running the same sweep again restores it from its Tune state
(``Tuner.restore``) and keeps the parent run, whose id lives in the sweep's storage beside that
state: the base experiment's ``storage`` (``<storage>/<sweep name>/tune``, the trials' Ray Train
runs in ``.../trials``), or by default the sweep's output directory. The trials' own drivers only
wait on their Train runs and log to MLflow; they run on the sweep driver's node, so a tracking
store or output directory on that node's disk serves them on a cluster too.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field, ValidationError, field_validator, model_validator

from detectors.errors import UserInputError
from orchestrator.cluster import check_resources, check_state_api, check_storage_reach, connect
from orchestrator.console import CONSOLE
from orchestrator.config import (ExperimentConfig, Strict, apply_overrides, describe_error, read_yaml_mapping,
                                 safe_name, set_path, validate_experiment)

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# Set per trial by the sweep itself.
RESERVED = ("name", "output_dir", "tracking", "storage")
PARENT_RUN_FILE = "mlflow_parent_run_id"
SWEEP_FILE = "sweep.json"
# The trial's own driver (the function trainable) only waits on its Train run.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}
HEAD_NODE = "node:__internal_head__"  # Ray's resource of the head node
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


# ----------------------------------------------------------------------------- loading and checks

def trial_raw(base_raw: dict[str, Any], values: dict[str, Any], name: str, output_dir: Path,
              tracking_uri: str, per_method: dict[str, dict[str, Any]] | None = None,
              storage: str | None = None) -> dict[str, Any]:
    """The trial's experiment: the base, the trial's values, then what its tuning method sets (``per_method``)."""
    raw = copy.deepcopy(base_raw)
    for path, value in values.items():
        set_path(raw, path, value)
    method = raw.get("tuning", {}).get("method", "e3va")
    for path, value in (per_method or {}).get(method, {}).items():
        set_path(raw, path, value)
    raw["name"] = name
    raw["output_dir"] = str(output_dir)
    raw.setdefault("tracking", {}).update(uri=tracking_uri, run_name=name)
    if storage is not None:
        base_storage = raw.get("storage")
        raw["storage"] = {**(base_storage if isinstance(base_storage, dict) else {}), "path": storage}
    return raw


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


# ----------------------------------------------------------------------------- the trials

def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={_short(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ",".join(_short(v) for v in value)
    return str(value)


def trial_name(sweep_name: str, numbered: bool, trial) -> str:
    """``<sweep>-rank=16`` (plus the trial's number when samples repeat or are random)."""
    parts = [f"{path.rsplit('.', 1)[-1]}={_short(value)}" for path, value in sorted(trial_values(trial.config).items())]
    name = "-".join([sweep_name, *parts])
    if numbered:
        name += f"-{int(trial.trial_id.rsplit('_', 1)[-1])}"
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name)[:120]


def param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


LAST_REPORT = "last_report.json"


def _last_report_callback(cfg: ExperimentConfig):
    """A Train callback that keeps the run's latest report in its storage (what Tune last heard of the trial)."""
    from ray.train import UserCallback
    storage = cfg.run_storage()

    class LastReport(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None or "run/median_seconds_per_iteration" in metrics[0]:  # not every step
                storage.write_text(storage.path(LAST_REPORT), json.dumps(metrics[0]))
    return LastReport()


def _finished_before(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The last report of this trial's run if that run already finished (the sweep was stopped between
    the run's end and Tune hearing of it): a restored trial then reports it again instead of retraining."""
    from mlflow.tracking import MlflowClient
    from orchestrator.tracking import remembered_run_id
    storage = cfg.run_storage()
    run_id, last = remembered_run_id(cfg), storage.read_json(storage.path(LAST_REPORT))
    if run_id is None or last is None or not cfg.tracking.uri:
        return None
    try:
        status = MlflowClient(cfg.tracking.uri).get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - unknown: train (and resume) as usual
        return None
    return last if status == "FINISHED" else None


def _run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """The function trainable: this trial's experiment, as one Ray Train run reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from orchestrator.run import run_experiment
    tune_context = ray.tune.get_context()
    config = trial_values(config)
    raw = trial_raw(context["base_raw"], config, tune_context.get_trial_name(), Path(context["trials_dir"]),
                    context["tracking_uri"], context["per_method"], context["trials_storage"])
    cfg = ExperimentConfig.model_validate(raw)
    finished = _finished_before(cfg)
    if finished is not None:
        ray.tune.report(finished)
        return
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    varied = {path: param_value(value) for path, value in config.items()}
    run_experiment(cfg, parent_run_id=context["parent_run_id"],
                   extra_params={**varied, "sweep": context["sweep"], "sweep.trial_id": tune_context.get_trial_id()},
                   callbacks=[TuneReportCallback(), _last_report_callback(cfg)])


def _driver_on_head() -> bool:
    import ray
    here = ray.get_runtime_context().get_node_id()
    return any(n["NodeID"] == here and HEAD_NODE in n.get("Resources", {}) for n in ray.nodes())


def _trainable(sweep: Sweep, parent_run_id: str | None):
    from ray import tune
    context = {"base_raw": sweep.base_raw, "trials_dir": str(sweep.dir / "trials"), "sweep": sweep.name,
               "tracking_uri": sweep.tracking_uri, "parent_run_id": parent_run_id,
               "per_method": sweep.cfg.per_method(),
               "trials_storage": sweep.trials_storage}
    # the trial drivers run beside this one, where the tracking store and the output dir are
    resources = {**TRIAL_DRIVER_RESOURCES, **({HEAD_NODE: 0.001} if _driver_on_head() else {})}
    return tune.with_resources(tune.with_parameters(_run_trial, context=context), resources)


def _trial_lines(total: int, headline: str):
    """A Tune callback (in this driver): one line as each trial starts and as it ends, with the count.
    Tune pickles it with its state, so it finds the terminal when called, not when made."""
    from ray.tune import Callback

    def say(text: str) -> None:
        from orchestrator.console import CONSOLE
        CONSOLE.say(text)

    class TrialLines(Callback):
        def __init__(self):
            self.ended = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            say(f"trial {trial} started")

        def _ended(self, trial, how: str) -> None:
            self.ended += 1
            result = trial.last_result or {}
            figures = ", ".join(f"{key} {result[key]:.4g}" for key in ("train/loss", headline) if key in result)
            say(f"trial {trial} {how} at step {result.get('step', 0)}" + (f" ({figures})" if figures else "")
                + f"  [{self.ended}/{total} trials ended]")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trial, "ended")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, "failed")
    return TrialLines()


def _scheduler(sweep: Sweep):
    asha = sweep.cfg.asha
    if asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler
    return ASHAScheduler(time_attr="step", metric=asha.metric, mode=asha.resolved_mode,
                         max_t=asha.max_t or sweep.base.schedule.iterations, grace_period=asha.grace_period,
                         reduction_factor=asha.reduction_factor,
                         stop_last_trials=False)  # a trial that reaches max_t ends by itself, logging its results


# ----------------------------------------------------------------------------- MLflow

def _fingerprint(sweep: Sweep) -> dict[str, Any]:
    return {"base": sweep.base_raw, "route": sweep.cfg.route,
            **({"by_method": sweep.cfg.by_method} if sweep.cfg.by_method else {}),
            "space": {k: v.model_dump(exclude_none=True) for k, v in sweep.cfg.space.items()},
            **({"include": sweep.cfg.include} if sweep.cfg.include else {}),
            "num_samples": sweep.cfg.num_samples,
            "asha": sweep.cfg.asha.model_dump() if sweep.cfg.asha else None}


def _parent_run(sweep: Sweep, resuming: bool) -> tuple[Any, str | None]:
    """The sweep's MLflow run: the one it had when it resumes, else a new one."""
    from orchestrator.tracking import experiment_id, open_client, warn_unreachable
    uri = sweep.tracking_uri
    client, answers = open_client(uri)
    if not answers:
        return client, None
    remembered = sweep.storage.path(PARENT_RUN_FILE)
    try:
        if resuming and (run_id := (sweep.storage.read_text(remembered) or "").strip()):
            CONSOLE.say(f"resuming sweep {sweep.name}: MLflow parent run {run_id} "
                        f"(was {client.get_run(run_id).info.status})")
            client.update_run(run_id, "RUNNING")
            return client, run_id
        run = client.create_run(experiment_id(client, sweep.base.tracking.experiment, uri), run_name=sweep.name,
                                tags={"sweep.space": json.dumps(list(sweep.cfg.space)), "sweep.parent": "true"})
        run_id = run.info.run_id
        params = {"sweep_file": str(sweep.path), "base": str(sweep.cfg.base), "num_samples": sweep.cfg.num_samples,
                  "max_concurrent_trials": sweep.cfg.max_concurrent_trials,
                  **{f"space.{k}": v.describe() for k, v in sweep.cfg.space.items()},
                  **({f"asha.{k}": v for k, v in sweep.cfg.asha.model_dump().items()} if sweep.cfg.asha else {})}
        for key, value in params.items():
            if value is not None:
                client.log_param(run_id, key, str(value)[:6000])
        client.log_artifact(run_id, str(sweep.dir / SWEEP_FILE))
        sweep.storage.write_text(remembered, run_id)
        return client, run_id
    except Exception as exc:  # noqa: BLE001 - tracking must never stop the sweep
        warn_unreachable(uri, str(exc).splitlines()[0])
        return client, None


def _close_children(client, sweep: Sweep, results, interrupted: bool, max_t: int | None) -> dict[str, int]:
    """Tag each trial's child run with how the trial ended; runs ASHA stopped end as KILLED.

    A trial finished when its MLflow run did (``run_experiment`` got to its end). A trial Tune ended
    without an error before that was stopped early by ASHA, unless the whole sweep was interrupted.
    """
    from orchestrator.tracking import remembered_run_id
    counts = {"finished": 0, "stopped early": 0, "failed": 0, "unfinished": 0}
    for result in results:
        name = result.path.rstrip("/").rsplit("/", 1)[-1]
        metrics = result.metrics or {}
        run_id = (remembered_run_id(sweep.trial_config(trial_values(result.config), name))
                  if client is not None else None)
        status = None
        if run_id is not None:
            try:
                status = client.get_run(run_id).info.status
            except Exception:  # noqa: BLE001
                run_id = None
        if result.error is not None:
            outcome = "failed"
        elif status == "FINISHED" or (status is None and metrics.get("step", 0) >= (max_t or 0) and not interrupted):
            outcome = "finished"
        elif interrupted:
            outcome = "unfinished"
        else:
            outcome = "stopped early"
        counts[outcome] += 1
        if run_id is None:
            continue
        try:
            client.set_tag(run_id, "sweep.outcome", outcome)
            if outcome == "stopped early":  # Tune killed the trial: its run ended RUNNING, or FAILED on the way
                client.set_tag(run_id, "sweep.stopped_at_step", str(metrics.get("step")))
                client.set_terminated(run_id, "KILLED")
            elif outcome == "unfinished" and status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
        except Exception as exc:  # noqa: BLE001
            CONSOLE.warn(f"MLflow tracking failed for trial {name} ({str(exc).splitlines()[0]})")
    return counts


# ----------------------------------------------------------------------------- the driver

def run_sweep(sweep: Sweep, compare: bool = True) -> dict[str, Any]:
    import ray
    from ray import tune

    connect(dashboard=True)  # its state API is how Train frees the workers of a trial ASHA stopped
    configs = sweep.configs
    fits = check_resources(sweep.path, configs)
    if sweep.cfg.asha is not None:
        check_state_api(sweep.path)
    from orchestrator.run import preflight
    seen = set()
    for cfg in configs:  # data and weights of each distinct setup, once (writes the synthetic data once)
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.backbone.model_dump(mode="json"),
                          cfg.model.engine, cfg.model.detector], sort_keys=True)
        if key not in seen:
            seen.add(key)
            preflight(cfg)
    nodes, here = ray.nodes(), ray.get_runtime_context().get_node_id()
    for cfg in configs:  # the trials' workers may land on other nodes; their storage must reach them
        check_storage_reach(cfg.ray_storage(), nodes, cfg.scaling.worker_resources(), here,
                            fixed_cluster=cfg.scaling.check_cluster)

    # Trials run in the job's working directory, as `run` does, so relative data paths mean the same.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    storage = sweep.storage
    tune_path = storage.path("tune")
    sweep.dir.mkdir(parents=True, exist_ok=True)
    fingerprint = json.dumps(_fingerprint(sweep), sort_keys=True, default=str)
    resuming = tune.Tuner.can_restore(tune_path, storage_filesystem=storage.ray_kwargs().get("storage_filesystem"))
    recorded = storage.read_text(storage.path(SWEEP_FILE))
    if resuming and recorded is not None and recorded != fingerprint:
        raise UserInputError(f"{sweep.path}: {storage.uri} holds a different sweep (base, space or ASHA changed); "
                             f"give this one another name (--set sweep.name=...) or output_dir")
    storage.write_text(storage.path(SWEEP_FILE), fingerprint)
    (sweep.dir / SWEEP_FILE).write_text(fingerprint)  # the parent run's artifact
    client, parent_run_id = _parent_run(sweep, resuming)
    trainable = _trainable(sweep, parent_run_id)
    status = "FAILED"
    started = time.time()
    try:
        if resuming:
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=storage.ray_kwargs().get("storage_filesystem"))
        else:
            tuner = tune.Tuner(
                trainable, param_space=sweep.cfg.param_space(),
                tune_config=tune.TuneConfig(
                    num_samples=sweep.cfg.num_samples, scheduler=_scheduler(sweep),
                    max_concurrent_trials=sweep.cfg.max_concurrent_trials or fits,
                    trial_name_creator=functools.partial(trial_name, sweep.name, _numbered(sweep)),
                    trial_dirname_creator=functools.partial(trial_name, sweep.name, _numbered(sweep))),
                run_config=tune.RunConfig(name="tune", **storage.ray_kwargs(), verbose=1,
                                          callbacks=[_trial_lines(sweep.cfg.num_trials, sweep.base.task.headline)]))
        results = tuner.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent_run_id is not None and status != "FINISHED":
            _terminate(client, parent_run_id, status)
    max_t = (sweep.cfg.asha.max_t if sweep.cfg.asha else None) or sweep.base.schedule.iterations
    # Tune catches SIGINT, saves its state and returns: trials are then unfinished or not even created.
    interrupted = (results.num_terminated + results.num_errors < len(results)
                   or len(results) < sweep.cfg.num_trials)
    counts = _close_children(client if parent_run_id else None, sweep, results, interrupted, max_t)
    if parent_run_id is not None:
        try:
            for key, value in counts.items():
                client.log_metric(parent_run_id, f"trials_{key.replace(' ', '_')}", value)
        except Exception as exc:  # noqa: BLE001
            CONSOLE.warn(f"MLflow tracking at {sweep.tracking_uri} failed ({str(exc).splitlines()[0]})")
    CONSOLE.say(f"sweep {sweep.name}: {len(results)} trials in {time.time() - started:.0f} s: "
                + ", ".join(f"{n} {k}" for k, n in counts.items() if n or k != "unfinished"))
    if interrupted:
        CONSOLE.say(f"sweep {sweep.name} interrupted: run the same command again to resume it")
    for result in results:
        if result.error is not None:
            CONSOLE.say(f"  trial {Path(result.path).name} failed: {str(result.error).strip().splitlines()[-1]}")
    outcome = {"parent_run_id": parent_run_id, "tracking_uri": sweep.tracking_uri, "dir": str(sweep.dir),
               "results": results, "counts": counts, "interrupted": interrupted}
    if compare and parent_run_id is not None:
        from orchestrator.compare import compare_runs
        try:
            outcome["compare"] = compare_runs(sweep.tracking_uri, parent_run_id=parent_run_id,
                                              out=sweep.dir / "compare")
        except UserInputError as exc:
            CONSOLE.say(f"note: no comparison: {exc}")
    if parent_run_id is not None:
        _terminate(client, parent_run_id, "KILLED" if interrupted else "FAILED" if counts["failed"] else "FINISHED")
    return outcome


def _numbered(sweep: Sweep) -> bool:
    return sweep.cfg.num_samples > 1 or sweep.cfg.random


def _terminate(client, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001
        CONSOLE.warn(f"MLflow tracking failed ({str(exc).splitlines()[0]})")


__all__ = ["load_sweep", "run_sweep", "SweepConfig", "Dimension", "AshaConfig"]
