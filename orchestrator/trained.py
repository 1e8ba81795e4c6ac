"""What a finished run left, as a model ready to predict: ``load_trained`` and ``load_tasks``.

A run leaves its resolved experiment (``experiment.yaml``) and adapter-only checkpoints
(``trainable.safetensors`` + ``state.json``): in its run directory and storage, and as MLflow
artifacts. The frozen backbone comes from the experiment's ``backbone.weights`` (or the seeded
initialisation the run used) and must have the fingerprint the checkpoint records; the adapters,
norms and heads come from the checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from detectors.errors import UserInputError
from detectors.sharing import SharedBackbone, share_backbone
from orchestrator.checkpointing import STATE, WEIGHTS, backbone_fingerprint, load_checkpoint, newest_checkpoint
from orchestrator.config import ExperimentConfig, load_experiment

EXPERIMENT_FILE = "experiment.yaml"


@dataclasses.dataclass
class TrainedTask:
    """One trained task: its experiment, its model (``detector``, in eval mode) and its classes."""
    name: str
    source: str
    cfg: ExperimentConfig
    detector: Any  # detectors.engines.base.Detector
    classes: list[dict[str, Any]]  # in label order: {"id": what predictions call it (COCO's category id), "name"}
    checkpoint: Path
    state: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.state.get("identity", {}).get("fingerprint", "")

    def trained_bytes(self, backbone_only: bool = False) -> int:
        """What this task stores: its trained weights (no optimizer state), or those of them in the backbone."""
        inside = {name for name, p in self.detector.named_parameters()
                  if any(p is q for q in self.detector.backbone.parameters())} if backbone_only else None
        with safe_open(str(self.checkpoint / WEIGHTS), "pt") as weights:
            return sum(_slice_bytes(weights, k) for k in weights.keys()
                       if k.startswith("model/") and (inside is None or k.removeprefix("model/") in inside))

    def full_bytes(self, backbone_only: bool = False) -> int:
        """A fully fine-tuned copy: every parameter (of the backbone), stored per task."""
        module = self.detector.backbone if backbone_only else self.detector
        return sum(p.numel() * p.element_size() for p in module.parameters())


def _slice_bytes(weights, key: str) -> int:
    tensor_slice = weights.get_slice(key)
    count = 1
    for size in tensor_slice.get_shape():
        count *= size
    return count * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(tensor_slice.get_dtype(), 4)


def load_trained(source: str | Path, *, weights: str | None = None, tracking_uri: str | None = None,
                 overrides: Sequence[str] = (), data: Sequence[str] | None = None) -> TrainedTask:
    """The model a run trained, from ``source``: a run directory, a checkpoint directory, or an
    MLflow run (``runs:/<run_id>``, its artifacts downloaded from ``tracking_uri``).

    ``weights`` replaces the experiment's ``backbone.weights``; ``overrides`` are ``--set`` items
    for the experiment; ``data`` another validation split (what the task's ``evaluation_data`` names).
    """
    source = str(source)
    experiment, checkpoint = _locate(source, tracking_uri)
    if weights is not None:
        overrides = [*overrides, f"backbone.weights={weights}"]
    cfg = load_experiment(experiment, overrides)
    state = _read_state(checkpoint)
    classes = state.get("identity", {}).get("classes") or _classes_from_data(cfg)
    if data is not None:
        cfg = load_experiment(experiment, [*overrides, *cfg.task.data_overrides(cfg, data, classes)])
    _check_frozen_weights_exist(cfg)
    torch.manual_seed(cfg.seed)  # the run's frozen initialisation, where no weights file is named
    from orchestrator.train_loop import build_model, config_identity
    detector = build_model(cfg, len(classes))
    fingerprint = backbone_fingerprint(detector.backbone)
    theirs = state.get("identity", {}).get("fingerprint")
    if theirs is not None and theirs != fingerprint:
        given = cfg.backbone.weight_file() or f"the seeded initialisation (seed {cfg.seed})"
        raise UserInputError(f"checkpoint {checkpoint} was trained on other frozen weights than {given}: its "
                             f"fingerprint is {theirs[:12]}, these weights' is {fingerprint[:12]}")
    load_checkpoint(checkpoint, detector, None, None, identity={**config_identity(cfg), "fingerprint": fingerprint})
    return TrainedTask(name=cfg.name, source=source, cfg=cfg, detector=detector.eval(), classes=classes,
                       checkpoint=checkpoint, state=state)


def _check_frozen_weights_exist(cfg: ExperimentConfig) -> None:
    if cfg.backbone.upstream is not None:  # the cached pre-training, or the same one trained again
        from orchestrator.pretrain import pretrained_checkpoint
        pretrained_checkpoint(cfg.backbone.upstream, "backbone.upstream")
    if cfg.backbone.weights is not None and not Path(cfg.backbone.weights).is_file():
        raise UserInputError(f"backbone.weights: {cfg.backbone.weights} does not exist (give the frozen backbone's "
                             f"weights with --weights)")


def load_tasks(sources: Sequence[str | Path], **kwargs: Any) -> tuple[list[TrainedTask], SharedBackbone]:
    """Several trained tasks on one frozen backbone, held once (see ``detectors.sharing``)."""
    tasks = [load_trained(source, **kwargs) for source in sources]
    first = tasks[0]
    for task in tasks[1:]:
        if task.fingerprint != first.fingerprint:
            raise UserInputError(f"{task.source} and {first.source} were trained on different frozen backbones "
                                 f"(fingerprints {task.fingerprint[:12]} and {first.fingerprint[:12]}); one "
                                 f"backbone serves only the tasks trained on it")
    _unique_names(tasks)
    return tasks, share_backbone([task.detector.backbone for task in tasks])


def _unique_names(tasks: list[TrainedTask]) -> None:
    """Tasks are named by their experiment; a name given twice gets the run it came from added."""
    names = [task.name for task in tasks]
    for index, task in enumerate(tasks):
        if names.count(task.name) > 1:
            task.name = f"{task.name}-{index + 1}"


def mlflow_run_id(source: str) -> str | None:
    """``runs:/<run_id>[/...]`` -> the run id; None for a path."""
    return source.removeprefix("runs:/").strip("/").split("/")[0] if source.startswith("runs:/") else None


def _locate(source: str, tracking_uri: str | None) -> tuple[Path, Path]:
    """(experiment file, checkpoint directory) of ``source``."""
    if source.startswith("runs:/"):
        return _download_run(source, tracking_uri)
    path = Path(source)
    if not path.exists():
        raise UserInputError(f"{source}: no such run or checkpoint directory (give a run directory, a checkpoint "
                             f"directory or runs:/<run_id>)")
    if not path.is_dir():
        raise UserInputError(f"{source}: not a directory (give a run directory, a checkpoint directory or "
                             f"runs:/<run_id>)")
    if (path / STATE).is_file():
        return experiment_of(path), path
    if not (path / EXPERIMENT_FILE).is_file():
        raise UserInputError(f"{source}: holds neither {EXPERIMENT_FILE} (a run directory) nor {STATE} "
                             f"(a checkpoint directory)")
    return path / EXPERIMENT_FILE, _run_checkpoint(path)


def experiment_of(path: Path) -> Path:
    """The experiment file of the run ``path`` (a run or checkpoint directory) belongs to: here or above."""
    for folder in (path, *path.resolve().parents):
        if (folder / EXPERIMENT_FILE).is_file():
            return folder / EXPERIMENT_FILE
    raise UserInputError(f"{path}: no {EXPERIMENT_FILE} here or in the folders above (give the run directory)")


def _run_checkpoint(run_dir: Path) -> Path:
    """The run's newest complete checkpoint: in its storage, or the one MLflow's artifacts hold."""
    if (run_dir / "checkpoint" / STATE).is_file():
        return run_dir / "checkpoint"
    cfg = load_experiment(run_dir / EXPERIMENT_FILE)
    storage = cfg.ray_storage()
    found = newest_checkpoint(storage, storage.path(cfg.name))
    if found is None:
        raise UserInputError(f"{run_dir}: the run has no complete checkpoint in {storage.uri}")
    path = found[0]
    if not storage.remote:
        return Path(path)
    import pyarrow.fs
    local = Path(tempfile.mkdtemp(prefix="e3va-checkpoint-"))
    pyarrow.fs.copy_files(path, str(local), source_filesystem=storage.filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def _download_run(source: str, tracking_uri: str | None) -> tuple[Path, Path]:
    import mlflow
    from mlflow.exceptions import MlflowException
    run_id = mlflow_run_id(source)
    destination = Path(tempfile.mkdtemp(prefix=f"e3va-run-{run_id[:8]}-"))
    try:
        client = mlflow.tracking.MlflowClient(tracking_uri)
        client.get_run(run_id)
        for name in (EXPERIMENT_FILE, "checkpoint"):
            client.download_artifacts(run_id, name, str(destination))
    except MlflowException as exc:
        where = tracking_uri or mlflow.get_tracking_uri()
        raise UserInputError(f"{source}: no such MLflow run at {where} ({str(exc).splitlines()[0][:200]})") from None
    if not (destination / EXPERIMENT_FILE).is_file() or not (destination / "checkpoint" / STATE).is_file():
        raise UserInputError(f"{source}: the run has no {EXPERIMENT_FILE} and checkpoint/ artifacts (did it finish?)")
    return destination / EXPERIMENT_FILE, destination / "checkpoint"


def _read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read checkpoint {checkpoint}: {exc}") from None
    if not isinstance(state, dict) or not (checkpoint / WEIGHTS).is_file():
        raise UserInputError(f"checkpoint {checkpoint} is incomplete: it needs {STATE} and {WEIGHTS}")
    return state


def _classes_from_data(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Checkpoints from before the classes were recorded: read them from the experiment's data."""
    try:
        return cfg.task.classes(cfg.task.build_val_dataset(cfg))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"the checkpoint does not name its classes and the experiment's data cannot be read "
                             f"({exc})") from None
