"""Tasks: what differs between object detection, semantic segmentation and image classification, each
defined once, in its own module here.

A task knows its data (which fields of ``data`` it reads, how the datasets are built and checked), its
model, how a batch reaches the device, how a validation split is scored over several ranks (its
evaluator: each rank's ``predict_shard`` state, merged and scored once by ``score``), the metric sweeps
optimise (its headline), its columns in ``compare``, and what a trained model's prediction on a
picture looks like (``predict``, ``write_prediction``). The training loop, ``run``, ``sweep``,
``plan``, ``compare``, ``evaluate``, ``predict`` and ``serve`` ask the experiment's task
(``task_of(cfg)``) and never branch on a task's name. An experiment names its task by its model
(``model.detector: upernet``) or explicitly (``model.task: segmentation``).

A new task is a new module in this package: a ``Task`` subclass decorated with ``@register_task``.
Every module here is imported with the package, so nothing else has to name it.
"""
from __future__ import annotations

import importlib
import pkgutil

from orchestrator.tasks.base import TASKS, Column, Task, check_data_count, metric_safe, quoted, register_task

_HELPERS = {"base", "pictures"}  # modules of this package that define no task
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _HELPERS:
        importlib.import_module(f"{__name__}.{_module.name}")


def task_of(cfg) -> Task:
    """The experiment's task: ``model.task`` when given, else the one whose models include ``model.detector``."""
    named = cfg.model.task
    if named is not None:
        if named not in TASKS:
            raise ValueError(f"model.task: unknown task {named!r}; choose one of {', '.join(TASKS.names())}")
        task = TASKS.get(named)
        if cfg.model.detector not in task.models():
            raise ValueError(f"model.detector: {cfg.model.detector!r} is not a {named} model "
                             f"(those are: {', '.join(task.models())})")
        return task
    for task in TASKS.values():
        if cfg.model.detector in task.models():
            return task
    known = ", ".join(f"{task.name} ({', '.join(task.models())})" for task in TASKS.values())
    raise ValueError(f"model.detector: unknown model {cfg.model.detector!r}; the tasks and their models: {known}")


__all__ = ["Column", "Task", "TASKS", "check_data_count", "metric_safe", "quoted", "register_task", "task_of"]
