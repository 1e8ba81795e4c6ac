"""One trial: its experiment, its name, and the function trainable that runs it as one Ray Train run."""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import ExperimentConfig, set_path
from orchestrator.sweep.schema import trial_values

if TYPE_CHECKING:
    from orchestrator.sweep.loading import Sweep

# The trial's own driver (the function trainable) only waits on its Train run.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}
HEAD_NODE = "node:__internal_head__"  # Ray's resource of the head node
# Tune caps how many trials it starts, not how many it brings back when a sweep resumes: a trial that finds the
# cluster full waits for another trial's workers to finish instead of failing after Ray Train's 60 s.
# (Every trial fits the cluster on its own: the sweep checks that before the first one starts.)
WORKER_WAIT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_WAIT_S = 24 * 3600


def wait_for_workers() -> None:
    """Let this trial's Ray Train run wait as long as a sweep may need for its workers (unless the user says)."""
    os.environ.setdefault(WORKER_WAIT_VARIABLE, str(WORKER_WAIT_S))


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
    wait_for_workers()
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
