"""``python -m orchestrator run EXP.yaml``: one training run through a Ray Train ``TorchTrainer``.

Everything a user can get wrong is checked before the MLflow run is created and before any
worker starts. The run then resumes from its newest checkpoint when a worker dies
(``FailureConfig``) and when the whole command is run again with the same name and output dir.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

import torch

from detectors.backbones import SWIN_SPECS, build_swin
from detectors.backbones.swin import fitting_state_dict
from detectors.data import CocoDetection
from detectors.engines import ENGINES
from detectors.errors import UserInputError
from detectors.params import count_parameters
from orchestrator.checkpointing import STATE, WEIGHTS
from orchestrator.config import ExperimentConfig, check_inputs_exist
from orchestrator.tracking import default_uri, reachable, warn_unreachable
from orchestrator.train_loop import dataset_paths, train_loop_per_worker


def preflight(cfg: ExperimentConfig) -> None:
    """Fail fast, with one line, on anything the run would trip over later."""
    if cfg.backbone.name not in SWIN_SPECS:
        raise UserInputError(f"backbone.name: unknown backbone {cfg.backbone.name!r}; "
                             f"choose one of {', '.join(SWIN_SPECS)}")
    ENGINES.get(cfg.model.engine).check(cfg.model.engine, cfg.model.detector)
    check_inputs_exist(cfg)
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
            "batch_total": cfg.schedule.batch_size * cfg.scaling.workers, "lr": cfg.schedule.lr,
            "gpu_kind": cfg.scaling.gpu_kind or ("gpu" if cfg.scaling.use_gpu else "cpu"),
            "trainable_params": count.trainable, "trainable_percent": round(count.percent, 4)}


def _start_mlflow_run(cfg: ExperimentConfig, uri: str) -> tuple[Any, str | None]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    if not reachable(uri):
        warn_unreachable(uri, "no answer from /health")
        return client, None
    try:
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
        run = client.create_run(experiment_id, run_name=cfg.name)
        for key, value in _params(cfg).items():
            client.log_param(run.info.run_id, key, value)
        return client, run.info.run_id
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        warn_unreachable(uri, str(exc).splitlines()[0])
        return client, None


def run_experiment(cfg: ExperimentConfig, fail_at_step: int | None = None) -> dict[str, Any]:
    import ray
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    preflight(cfg)
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "experiment.yaml"
    resolved.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    uri = cfg.tracking.uri or default_uri(run_dir)
    client, run_id = _start_mlflow_run(cfg, uri)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    storage = run_dir / "ray"
    resume = newest_checkpoint(storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": json.loads(cfg.model_dump_json()), "tracking_uri": uri,
                           "mlflow_run_id": run_id, "fail_at_step": fail_at_step},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                           **({"GPU": cfg.scaling.gpus_per_worker}
                                                              if cfg.scaling.use_gpu else {})},
                                     accelerator_type=cfg.scaling.gpu_kind),
        run_config=RunConfig(name=cfg.name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        resume_from_checkpoint=Checkpoint.from_directory(str(resume)) if resume else None)
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
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


__all__ = ["run_experiment", "preflight", "newest_checkpoint"]
