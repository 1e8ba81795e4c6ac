"""``python -m orchestrator run EXP.yaml``: one training run through a Ray Train ``TorchTrainer``.

Everything a user can get wrong is checked before the MLflow run is created and before any
worker starts. The run then resumes from its newest checkpoint when a worker dies
(``FailureConfig``) and when the whole command is run again with the same name and output dir.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

import torch

from detectors.backbones import SWIN_SPECS, build_swin
from detectors.backbones.swin import fitting_state_dict
from detectors.data import CocoDetection
from detectors.engines import ENGINES
from detectors.errors import UserInputError
from detectors.params import count_parameters
from orchestrator.checkpointing import STATE, WEIGHTS, check_identity
from orchestrator.config import ExperimentConfig, check_inputs_exist
from orchestrator.tracking import default_uri, experiment_id, open_client, warn_unreachable
from orchestrator.train_loop import config_identity, dataset_paths, train_loop_per_worker


def preflight(cfg: ExperimentConfig) -> None:
    """Fail fast, with one line, on anything the run would trip over later."""
    if cfg.backbone.name not in SWIN_SPECS:
        raise UserInputError(f"backbone.name: unknown backbone {cfg.backbone.name!r}; "
                             f"choose one of {', '.join(SWIN_SPECS)}")
    ENGINES.get(cfg.model.engine).check(cfg.model.engine, cfg.model.detector)
    check_inputs_exist(cfg)
    resume = newest_checkpoint(cfg.run_dir.resolve() / "ray")
    if resume is not None:
        check_identity(resume, config_identity(cfg))
    if cfg.backbone.weights is not None:
        with torch.device("meta"):
            model = build_swin(cfg.backbone.name, **cfg.backbone.overrides)
        try:
            fitting_state_dict(model, cfg.backbone.weights)
        except UserInputError as exc:
            raise UserInputError(f"backbone.weights: {exc}") from None
    paths = dataset_paths(cfg)
    for split in ("train", "val"):
        CocoDetection(paths[f"{split}_images"], paths[f"{split}_json"]).check_files()


def check_cluster(cfg: ExperimentConfig, nodes: list[dict]) -> None:
    """One line, before anything starts, when the cluster's nodes can never hold the run's workers."""
    need = cfg.scaling.worker_resources()
    alive = [node["Resources"] for node in nodes if node.get("Alive", True)]
    fits = sum(min(int(node.get(name, 0) / amount + 1e-9) for name, amount in need.items()) for node in alive)
    if fits < cfg.scaling.workers:
        have = sorted({name for node in alive for name in node
                       if name.startswith("gpu_") or name in ("CPU", "GPU") or name in need})
        raise UserInputError(f"scaling: {cfg.scaling.workers} workers each needing {need} do not fit this cluster "
                             f"(room for {fits}; its nodes offer {', '.join(have)}); set scaling.check_cluster=false "
                             f"if it starts nodes on demand")


def newest_checkpoint(storage: Path) -> Path | None:
    """The checkpoint with the highest step among those Ray persisted for this run."""
    best, best_step = None, -1
    for state in storage.glob(f"**/{STATE}"):
        if (state.parent / WEIGHTS).is_file():
            step = json.loads(state.read_text()).get("step", -1)
            if step > best_step:
                best, best_step = state.parent, step
    return best


def _params(cfg: ExperimentConfig) -> dict[str, Any]:
    count = count_parameters(cfg.backbone.name, cfg.tuning.method, cfg.tuning.hyperparameters,
                             **cfg.backbone.overrides)
    return {"method": count.method, "variant": cfg.tuning.method, **count.hyperparameters,
            "backbone": cfg.backbone.name, "detector": cfg.model.detector, "engine": cfg.model.engine,
            "batch_per_worker": cfg.schedule.batch_size, "workers": cfg.scaling.workers,
            **({"batch_total": sum(cfg.batch_sizes())} if cfg.batch_sizes() else {}), "lr": cfg.schedule.lr,
            "gpu_kind": cfg.scaling.gpu_kind or ("any gpu" if cfg.scaling.use_gpu else "cpu"),
            "trainable_params": count.trainable, "trainable_percent": round(count.percent, 4)}


MLFLOW_RUN_FILE = "mlflow_run_id"


def start_mlflow_run(cfg: ExperimentConfig, uri: str, *, parent_run_id: str | None = None,
                     extra_params: dict[str, Any] | None = None) -> tuple[Any, str | None]:
    """The MLflow run of this training run: the one it had before when it resumes, else a new one.

    Returns ``(client, None)`` when the tracking server cannot be reached: training goes on.
    """
    client, answers = open_client(uri)
    if not answers:
        return client, None
    remembered = cfg.run_dir / MLFLOW_RUN_FILE
    try:
        if remembered.is_file() and newest_checkpoint(cfg.run_dir / "ray") is not None:
            run_id = remembered.read_text().strip()
            status = client.get_run(run_id).info.status
            if status == "FINISHED":
                raise UserInputError(f"{cfg.run_dir} already holds the finished run {run_id}; "
                                     f"give the experiment another name (--set name=...) or output_dir")
            client.update_run(run_id, "RUNNING")
            print(f"resuming MLflow run {run_id} (was {status})", flush=True)
            return client, run_id
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
        run = client.create_run(experiment_id(client, cfg.tracking.experiment, uri), run_name=cfg.name, tags=tags)
        for key, value in {**_params(cfg), **(extra_params or {})}.items():
            client.log_param(run.info.run_id, key, value)
        remembered.write_text(run.info.run_id)
        return client, run.info.run_id
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        warn_unreachable(uri, str(exc).splitlines()[0])
        return client, None


def build_trainer(cfg: ExperimentConfig, uri: str | None, run_id: str | None, *, fail_at_step: int | None = None,
                  callbacks: Sequence[Any] = ()):
    """The ``TorchTrainer`` of one run. Ray Train finds the run's checkpoints under the same name and
    storage path and hands the newest to the workers: a command run again continues the run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = cfg.run_dir.resolve() / "ray"
    scaling = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": json.loads(cfg.model_dump_json()), "tracking_uri": uri,
                           "mlflow_run_id": run_id, "fail_at_step": fail_at_step,
                           # for a run stopped before Ray recorded its newest checkpoint
                           "resume_from": str(resume) if (resume := newest_checkpoint(storage)) else None},
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=scaling.worker_resources()),
        run_config=RunConfig(name=cfg.name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks)))


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
                   callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    import ray

    preflight(cfg)
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "experiment.yaml"
    resolved.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    if not ray.is_initialized():
        # Ray turns SIGTERM (``ray job stop``, a scheduler) into SystemExit: the run ends as KILLED.
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    if cfg.scaling.check_cluster:
        check_cluster(cfg, ray.nodes())
    uri = cfg.tracking.uri or default_uri(run_dir)
    client, run_id = start_mlflow_run(cfg, uri, parent_run_id=parent_run_id, extra_params=extra_params)
    status = "FAILED"
    try:
        trainer = build_trainer(cfg, uri, run_id, fail_at_step=fail_at_step, callbacks=callbacks)
        try:
            result = trainer.fit()
        except Exception as exc:
            user_error = worker_user_error(exc)
            if user_error is not None:
                raise user_error from None
            raise
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        if run_id is not None:
            try:
                if status == "FINISHED":
                    _log_results(client, run_id, result, resolved, run_dir)
                client.set_terminated(run_id, status)
            except Exception as exc:  # noqa: BLE001
                print(f"warning: MLflow tracking at {uri} failed ({str(exc).splitlines()[0]})", flush=True)
    return {"metrics": result.metrics, "run_id": run_id, "tracking_uri": uri,
            "checkpoint": result.checkpoint.path if result.checkpoint else None}


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


__all__ = ["run_experiment", "build_trainer", "start_mlflow_run", "preflight", "newest_checkpoint"]
