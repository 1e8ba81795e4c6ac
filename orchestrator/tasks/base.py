"""What every task answers (``Task``), and the registry the task modules add theirs to."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from detectors.errors import UserInputError
from detectors.registry import Registry


@dataclasses.dataclass(frozen=True)
class Column:
    """A column of ``compare``'s table: a figure the task's runs log (its MLflow key), or with ``delta``
    that figure's difference to the ``full`` run's; ``plotted`` figures can be the y of its figures."""
    header: str
    metric: str
    delta: bool = False
    plotted: bool = False


class Task:
    name: str
    headline: str  # what a sweep's trial lines show and ASHA usually optimises, as reported (val/...)
    columns: tuple[Column, ...]
    own_data: tuple[str, ...]  # fields of ``data`` this task reads that not every task does
    own_model: tuple[str, ...] = ()  # fields of ``model`` only this task reads
    demo_experiment: str  # ``demo --task <name>`` runs this file of experiments/
    input_fields: tuple[str, ...] = ()  # fields of ``data`` naming files that must exist before a run starts

    def models(self) -> Sequence[str]:
        """The names ``model.detector`` may give (``detectors.models``' for this task, unless overridden)."""
        from detectors.models import models_of
        return models_of(self.name)

    def check_config(self, cfg) -> None:
        """Fields that belong to another task, or that this one lacks: ``ValueError`` naming the field."""
        for task in TASKS.values():
            foreign = [f for f in cfg.data.given(*task.own_data) if f not in self.own_data]
            if foreign:
                owners = " and ".join(t.name for t in TASKS.values() if foreign[0] in t.own_data)
                raise ValueError(f"data.{foreign[0]}: a {owners} field, but this experiment's task is {self.name} "
                                 f"(model.detector: {cfg.model.detector})")
            given = [f for f in task.own_model if task is not self
                     and getattr(cfg.model, f) != type(cfg.model).model_fields[f].default]
            if given:
                raise ValueError(f"model.{given[0]}: a {task.name} field, but this experiment's task is {self.name} "
                                 f"(model.detector: {cfg.model.detector})")

    def dataset_paths(self, cfg) -> dict[str, Any]:
        raise NotImplementedError

    def build_datasets(self, cfg) -> tuple[Any, Any]:
        raise NotImplementedError

    def build_val_dataset(self, cfg, paths: dict[str, Any] | None = None):
        raise NotImplementedError

    def check_files(self, cfg) -> None:
        raise NotImplementedError

    def classes(self, dataset) -> list[dict[str, Any]]:
        """The classes the model scores, as a checkpoint carries them: ``[{"id", "name"}]``."""
        raise NotImplementedError

    def num_classes(self, cfg) -> int | None:
        """What the experiment's data tells without reading it (the planner's head size), if it does."""
        raise NotImplementedError

    def build_model(self, cfg, num_classes: int) -> torch.nn.Module:
        from detectors.models import build_model
        return build_model(cfg.model.detector, num_classes, backbone=cfg.backbone.name, tuning=cfg.tuning.method,
                           weights=cfg.backbone.weight_file(), hyperparameters=cfg.tuning.hyperparameters,
                           options=cfg.model.options, drop_path_rate=cfg.backbone.drop_path_rate,
                           **cfg.backbone.overrides)

    def check_model(self, cfg) -> None:
        """The model's options, before anything is built: ``UserInputError`` naming the option."""
        from detectors.models import check_model
        check_model(cfg.model.detector, cfg.model.options)

    def prepare(self, model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
        """The model as the workers train it (before DDP wraps it)."""
        return model

    def collate(self, batch):
        raise NotImplementedError

    def move_batch(self, images, targets, device: torch.device):
        raise NotImplementedError

    def predict_shard(self, cfg, model, dataset, device: torch.device, indices: Sequence[int],
                      on_batch: Callable[[int], None] | None = None, batch_size: int = 2) -> Any:
        """What one rank's share of the split contributes to the score (a picklable state);
        ``on_batch(images done)`` for a progress display."""
        raise NotImplementedError

    def score(self, dataset, states: Sequence[Any]) -> dict[str, float]:
        """The split's figures from every rank's state, computed once (keys without ``val/``)."""
        raise NotImplementedError

    def training_size(self, cfg) -> tuple[int, int]:
        """The largest (height, width) a training image can have (what the planner profiles for)."""
        raise NotImplementedError

    def run_tag(self, cfg) -> str:
        return self.name

    def run_params(self, cfg) -> dict[str, str]:
        """What the run's MLflow params and tags say of the model besides its name."""
        return {}

    def model_id(self, cfg) -> str:
        """The model a checkpoint was made for (a resumed run or a loaded task must build the same)."""
        return cfg.model.detector

    def results_table(self, metrics: dict[str, Any]) -> str:
        """What a finished run prints (empty when it did not evaluate)."""
        raise NotImplementedError

    def dataset_record(self, cfg, paths: dict[str, Any]) -> tuple[str, list[Path], Path]:
        """For MLflow's dataset input: its name, the files its digest covers, the path of its source."""
        raise NotImplementedError

    # Using a trained model (``evaluate``, ``predict``, ``serve``): ``trained`` is an
    # ``orchestrator.trained.TrainedTask`` (its experiment, its model in eval mode, its classes).

    evaluation_data: tuple[str, ...]  # what ``evaluate --data`` takes, e.g. ("IMAGES", "ANNOTATIONS")

    def data_overrides(self, cfg, data: Sequence[str], classes: list[dict[str, Any]]) -> list[str]:
        """``evaluate --data`` as ``--set`` items that make those files the experiment's (``cfg``'s) validation
        split, read as the run read its own (``classes``: the trained model's, for data that does not name its
        own). Paths go through ``quoted``."""
        raise NotImplementedError

    def check_classes(self, trained, dataset) -> None:
        """That ``dataset`` (another validation split) has the classes the model was trained for."""
        if dataset.num_classes != len(trained.classes):
            raise UserInputError(f"{self.data_source(trained.cfg)} has {dataset.num_classes} classes, the model "
                                 f"{trained.source} was trained for {len(trained.classes)}")

    def data_source(self, cfg) -> str:
        """The validation split, in words (what ``evaluate`` scored)."""
        raise NotImplementedError

    def predict(self, trained, picture: torch.Tensor, *, image_id: int = 1, score_threshold: float = 0.5) -> Any:
        """What the model finds on one uint8 (3, H, W) picture, as JSON (``predict``'s files and ``serve``'s
        answers); ``score_threshold`` for tasks that keep only confident findings."""
        raise NotImplementedError

    def write_prediction(self, folder: Path, stem: str, picture: torch.Tensor, found: Any, trained) -> None:
        """``<stem>.json`` and the pictures that show ``found`` (``<stem>.png``, and what else the task draws)."""
        raise NotImplementedError


def quoted(value: Any) -> str:
    """A value for a ``--set`` item, read back as itself (a path like ``runs #1`` or ``yes`` stays a string)."""
    return json.dumps(value, ensure_ascii=False)


def check_data_count(task: Task, data: Sequence[str]) -> None:
    if len(data) != len(task.evaluation_data):
        raise UserInputError(f"--data: a {task.name} run is evaluated on {' '.join(task.evaluation_data)} "
                             f"(got {len(data)} path(s))")
    for what, path in zip(task.evaluation_data, data):
        if not Path(path).exists():
            raise UserInputError(f"--data {what.lower()}: {path} does not exist")


def metric_safe(name: str) -> str:
    """A class name as a piece of a metric key (MLflow allows letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", name).strip() or "_"




TASKS: Registry[Task] = Registry("task")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: the task, under its ``name``, for ``task_of`` and every command."""
    TASKS.register(cls.name)(cls())
    return cls
