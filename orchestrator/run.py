"""``python -m orchestrator run EXP.yaml``: one training run through a Ray Train ``TorchTrainer``.

Everything a user can get wrong is checked before the MLflow run is created and before any
worker starts, the run's storage among it: it must answer, and every node a worker may land on must
reach it. The run then resumes from its newest complete checkpoint in that storage when a worker
dies (``FailureConfig``) and when the whole command is run again with the same name and storage.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import yaml

import torch

from detectors.backbones import SWIN_SPECS, build_swin
from detectors.backbones.swin import fitting_state_dict
from detectors.errors import UserInputError
from orchestrator.cluster import check_cluster, check_storage_reach, connect
from orchestrator.checkpointing import STATE, WEIGHTS, check_identity, newest_checkpoint
from orchestrator.config import ExperimentConfig, check_inputs_exist
from orchestrator.console import CONSOLE, TrainingProgress, progress_callback, progress_channel
from orchestrator.pretrain import checkpoint_for_workers, resolve_upstream
from orchestrator.tracking import (Tracker, default_uri, metrics_callback, start_mlflow_run,
                                   system_metrics_monitor)
from orchestrator.train_loop import config_identity, train_loop_per_worker


class RunFailedError(RuntimeError):
    """Training failed for a reason that is not the user's input; its message is one line."""


@dataclasses.dataclass(frozen=True)
class Checked:
    """What ``preflight`` found: the checkpoint the run continues from, ``(path, state)``, if any."""
    resume: tuple[str, dict[str, Any]] | None


def preflight(cfg: ExperimentConfig) -> Checked:
    """Fail fast, with one line, on anything the run would trip over later."""
    if cfg.backbone.name not in SWIN_SPECS:
        raise UserInputError(f"backbone.name: unknown backbone {cfg.backbone.name!r}; "
                             f"choose one of {', '.join(SWIN_SPECS)}")
    cfg.task.check_model(cfg)
    check_inputs_exist(cfg)
    storage = cfg.ray_storage(probe=True)
    storage.check()
    resume = newest_checkpoint(storage, storage.path(cfg.name))
    if resume is not None:
        check_identity(resume[0], config_identity(cfg), resume[1])
    resolve_upstream(cfg)  # pre-trains now unless the cache has it
    if cfg.backbone.weight_file() is not None:
        with torch.device("meta"):
            model = build_swin(cfg.backbone.name, **cfg.backbone.overrides)
        try:
            fitting_state_dict(model, cfg.backbone.weight_file())
        except UserInputError as exc:
            raise UserInputError(f"backbone.{'upstream' if cfg.backbone.upstream else 'weights'}: {exc}") from None
    cfg.task.check_files(cfg)
    return Checked(resume)


def build_trainer(cfg: ExperimentConfig, uri: str | None, run_id: str | None, *,
                  resume: tuple[str, dict[str, Any]] | None, fail_at_step: int | None = None,
                  callbacks: Sequence[Any] = (), logged_through: int = 0, progress: Any = None):
    """The ``TorchTrainer`` of one run. Ray Train finds the run's checkpoints under the same name and
    storage path and hands the newest to the workers: a command run again continues the run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = cfg.ray_storage()
    scaling = cfg.scaling
    tracking = [metrics_callback(uri, run_id, logged_through)] if uri and run_id else []
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": json.loads(cfg.model_dump_json()), "fail_at_step": fail_at_step,
                           "progress": progress, "upstream_checkpoint": checkpoint_for_workers(cfg),
                           # for a run stopped before Ray recorded its newest checkpoint
                           "resume_from": resume[0] if resume else None},
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=scaling.worker_resources()),
        run_config=RunConfig(name=cfg.name, **storage.ray_kwargs(),
                             failure_config=_failure_config(FailureConfig, scaling),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=[*tracking, *callbacks]))


def _failure_config(failure_config, scaling):
    """Worker failures restart the group ``max_failures`` times. A group that cannot be started again
    (its node is gone) is retried as often on a fixed cluster, then the run fails with one line; a
    cluster that starts nodes on demand (``check_cluster: false``) waits for them (Ray's default)."""
    return failure_config(max_failures=scaling.max_failures,
                          controller_failure_limit=scaling.max_failures if scaling.check_cluster else -1)


def worker_user_error(exc: BaseException) -> UserInputError | None:
    """The user-input error a worker died of, if that is why training failed."""
    for failure in getattr(exc, "worker_failures", {}).values():
        cause = failure
        while cause is not None and not isinstance(cause, UserInputError):
            cause = cause.__cause__ or getattr(cause, "cause", None)
        if isinstance(cause, UserInputError):
            return cause
        text = str(failure)
        if "UserInputError: " in text:  # Ray may hand back the worker's exception as text only
            return UserInputError(text.rsplit("UserInputError: ", 1)[1].strip().splitlines()[0])
    return None


def run_experiment(cfg: ExperimentConfig, fail_at_step: int | None = None, *,
                   parent_run_id: str | None = None, extra_params: dict[str, Any] | None = None,
                   callbacks: Sequence[Any] = (), show_progress: bool = False,
                   checked: Checked | None = None) -> dict[str, Any]:
    """``checked``: what ``preflight(cfg)`` found, where the caller ran it already (before it wrote anything)."""
    import ray

    resume = (checked or preflight(cfg)).resume  # looked up once: MLflow's record and the workers go by it
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "experiment.yaml"
    resolved.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    connect(dashboard=False)  # Ray turns SIGTERM (``ray job stop``, a scheduler) into SystemExit: a KILLED run
    nodes = ray.nodes()
    if cfg.scaling.check_cluster:
        check_cluster(cfg, nodes)
    check_storage_reach(cfg.ray_storage(), nodes, cfg.scaling.worker_resources(),
                        ray.get_runtime_context().get_node_id(), fixed_cluster=cfg.scaling.check_cluster)
    uri = cfg.tracking.uri or default_uri(run_dir)
    client, run_id = start_mlflow_run(cfg, uri, resuming=resume is not None, parent_run_id=parent_run_id,
                                      extra_params=extra_params)
    status = "FAILED"
    logged_through = _log_checkpointed_reports(uri, run_id, resume, _last_logged_step(client, run_id))
    monitor = system_metrics_monitor(run_id, uri, resume=logged_through > 0) if run_id else None
    try:
        progress = progress_channel() if show_progress else None
        trainer = build_trainer(cfg, uri, run_id, resume=resume, fail_at_step=fail_at_step,
                                logged_through=logged_through,
                                callbacks=[*callbacks, *([] if progress is None else [progress_callback(progress)])],
                                progress=progress)
        try:
            showing = TrainingProgress(progress, cfg.schedule.iterations) if progress is not None else None
            with showing or contextlib.nullcontext():
                result = trainer.fit()
        except Exception as exc:
            user_error = worker_user_error(exc)
            if user_error is not None:
                raise user_error from None
            raise RunFailedError(f"training {cfg.name} failed: {_last_line(exc)}") from exc
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        if run_id is not None:
            try:
                if status == "FINISHED":
                    _log_results(client, run_id, result, resolved, run_dir)
                client.set_terminated(run_id, status)
            except Exception as exc:  # noqa: BLE001
                CONSOLE.warn(f"MLflow tracking at {uri} failed ({str(exc).splitlines()[0]})")
    return {"metrics": result.metrics, "run_id": run_id, "tracking_uri": uri,
            "checkpoint": result.checkpoint.path if result.checkpoint else None}


def _last_logged_step(client, run_id: str | None) -> int:
    """The highest step the MLflow run has metrics for: a resumed run logs only the steps after it."""
    if run_id is None:
        return 0
    try:
        return int(client.get_run(run_id).data.metrics.get("step", 0))
    except Exception:  # noqa: BLE001 - tracking must never stop training
        return 0


def _log_checkpointed_reports(uri: str, run_id: str | None, resume: tuple[str, dict[str, Any]] | None,
                              logged_through: int) -> int:
    """A run resumed from a checkpoint whose reports the driver never logged (it was stopped between
    the checkpoint's upload and the report reaching it): log them now, from the checkpoint. Returns the
    last step MLflow then holds; the steps the workers redo up to it are not logged again."""
    if run_id is None or resume is None:
        return logged_through
    tracker = Tracker(uri, run_id)
    for report in resume[1].get("history", []):
        if report.get("step", 0) > logged_through:
            tracker.log_metrics(report, report["step"])
            logged_through = report["step"]
    return logged_through


def _last_line(exc: BaseException) -> str:
    """The innermost cause's message, as one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _log_results(client, run_id: str, result, resolved: Path, run_dir: Path) -> None:
    client.log_artifact(run_id, str(resolved))
    evaluation = {k: v for k, v in (result.metrics or {}).items() if k.startswith("val/")}
    eval_path = run_dir / "evaluation.json"
    eval_path.write_text(json.dumps(evaluation, indent=2))
    client.log_artifact(run_id, str(eval_path))
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as directory:
            client.log_artifact(run_id, str(Path(directory) / WEIGHTS), "checkpoint")
            client.log_artifact(run_id, str(Path(directory) / STATE), "checkpoint")


__all__ = ["run_experiment", "build_trainer", "preflight", "Checked", "RunFailedError"]
