"""Using what was trained: ``evaluate`` a run's model again, ``predict`` with pictures.

Both load through ``orchestrator.trained``; ``predict`` with several runs holds their frozen
backbone once and, for E3VA and FIXED, runs it once per image for all of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from detectors.errors import UserInputError
from orchestrator.console import CONSOLE
from orchestrator.trained import TrainedTask, load_tasks, load_trained, mlflow_run_id

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------
# evaluate


def evaluate_run(source: str, *, data: Sequence[str] | None = None, overrides: Sequence[str] = (),
                 weights: str | None = None, tracking_uri: str | None = None, out: str | None = None,
                 as_json: bool = False, log: bool = False, batch_size: int = 2) -> dict[str, float]:
    """The task's figures (COCO AP, mIoU, accuracy) of the run's model on its validation split, or on
    ``data`` (the paths the task's ``evaluation_data`` names, e.g. images and annotations)."""
    task = load_trained(source, weights=weights, tracking_uri=tracking_uri, overrides=overrides, data=data)
    kind = task.cfg.task
    val = kind.build_val_dataset(task.cfg)
    kind.check_classes(task, val)
    from tqdm import tqdm
    with computing_as_trained(task), tqdm(total=len(val), unit="image", desc="evaluating",
                                          disable=not CONSOLE.isatty(), leave=False) as bar:
        state = kind.predict_shard(task.cfg, task.detector, val, torch.device("cpu"), range(len(val)),
                                   on_batch=lambda done: bar.update(done - bar.n), batch_size=batch_size)
        figures = kind.score(val, [state])
    named = {f"val/{k}": v for k, v in figures.items()}
    report = {k.replace("/", "_"): v for k, v in named.items()}
    destination = Path(out) if out else _default_evaluation_file(source)
    _write_atomically(destination, json.dumps(report, indent=2))
    if as_json:
        CONSOLE.say(json.dumps(report))
    else:
        CONSOLE.say(f"{task.name} ({task.cfg.tuning.method} {task.cfg.backbone.name} {task.cfg.model.detector}) on "
                    f"{kind.data_source(task.cfg)}:")
        CONSOLE.say(kind.results_table(named))
        CONSOLE.say(f"\nevaluation: {destination}")
    if log:
        _log_to_run(source, tracking_uri, figures)
    return report


@contextlib.contextmanager
def computing_as_trained(task: TrainedTask) -> Iterator[None]:
    """Torch's CPU threads as the run's workers had them (cpus_per_worker): the same arithmetic, in
    the same order, gives the same figures and detections to the last bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(task.cfg.scaling.cpus_per_worker)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _default_evaluation_file(source: str) -> Path:
    run_id = mlflow_run_id(source)
    return Path(f"evaluation-{run_id}.json") if run_id else Path(source) / "evaluation-again.json"


def _log_to_run(source: str, tracking_uri: str | None, figures: dict[str, float]) -> None:
    """The figures into the run they came from, as ``evaluate_bbox_AP``..., beside its ``val_`` ones."""
    from orchestrator.tracking import Tracker
    run_id, uri = mlflow_run_id(source), tracking_uri
    if run_id is None:
        from orchestrator.config import load_experiment
        from orchestrator.tracking import default_uri, remembered_run_id
        from orchestrator.trained import experiment_of
        cfg = load_experiment(experiment_of(Path(source)))
        uri = tracking_uri or cfg.tracking.uri or default_uri(cfg.run_dir.resolve())
        run_id = remembered_run_id(cfg)
        if run_id is None:
            raise UserInputError(f"--log: {source} does not record its MLflow run (give runs:/<run_id>)")
    Tracker(uri, run_id).log_metrics({f"evaluate/{k}": v for k, v in figures.items()}, step=0)
    CONSOLE.say(f"logged to MLflow run {run_id} as evaluate_*")


# --------------------------------------------------------------------------------------------
# predict


def predict_images(sources: Sequence[str], images: Sequence[str], out: str, *, score_threshold: float = 0.5,
                   weights: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Per task and image, ``<out>/<task>/<image>.json`` (what was found) and ``.png`` (it, drawn), and
    what else the task writes (label maps)."""
    files = _image_files(images)
    pictures = []
    for path in files:  # every image decodes before anything is written
        try:
            pictures.append(read_picture(path))
        except OSError as exc:  # Pillow's UnidentifiedImageError is one
            raise UserInputError(f"{path}: cannot decode it as an image ({str(exc).splitlines()[0][:120]})") from None
    tasks, shared = load_tasks(sources, weights=weights, tracking_uri=tracking_uri)
    print_storage(tasks)
    staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=_parent_of(out)))
    try:
        from tqdm import tqdm
        progress = tqdm(total=len(files), unit="image", disable=not CONSOLE.isatty(), leave=False)
        with computing_as_trained(tasks[0]):
            _predict_all(tasks, shared, files, pictures, staging, score_threshold, progress)
        progress.close()
        _publish(staging, Path(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    CONSOLE.say(f"predictions for {len(files)} image(s) by {len(tasks)} task(s) in {out}/"
                f"{{{','.join(t.name for t in tasks)}}}/")
    return {"tasks": [t.name for t in tasks], "images": [str(f) for f in files], "frozen_passes": shared.computed}


def read_picture(source) -> torch.Tensor:
    """An image file (a path or a binary file object) as a uint8 3 x H x W RGB tensor."""
    from torchvision.transforms.functional import pil_to_tensor

    from detectors.data.images import read_rgb
    return pil_to_tensor(read_rgb(source))


def _predict_all(tasks, shared, files, pictures, staging: Path, score_threshold: float, progress) -> None:
    for index, (path, picture) in enumerate(zip(files, pictures), start=1):
        found = predict_tasks(tasks, shared, picture, image_id=index, score_threshold=score_threshold)
        for task in tasks:
            folder = staging / task.name
            folder.mkdir(exist_ok=True)
            task.cfg.task.write_prediction(folder, path.stem, picture, found[task.name], task)
        progress.update()


def predict_tasks(tasks: Sequence[TrainedTask], shared, picture: torch.Tensor, *, image_id: int = 1,
                  score_threshold: float = 0.5) -> dict[str, Any]:
    """Each task's findings on one picture (its task's ``predict``); the frozen pass tasks share runs once
    for all of them that read the picture alike."""
    try:
        return {task.name: task.cfg.task.predict(task, picture, image_id=image_id, score_threshold=score_threshold)
                for task in tasks}
    finally:
        shared.clear()  # the picture's features are not kept past it


def print_storage(tasks: list[TrainedTask]) -> None:
    """The papers' storage argument, measured: what each task stores against a fully fine-tuned copy,
    for the backbone (what the methods differ in) and the whole detector (the heads train in all)."""
    def mb(n: int) -> str:
        return f"{n / 2**20:.2f}"
    rows = [[t.name, t.cfg.tuning.method, mb(t.trained_bytes(backbone_only=True)), mb(t.full_bytes(backbone_only=True)),
             mb(t.trained_bytes()), mb(t.full_bytes())] for t in tasks]
    CONSOLE.say(tabulate(rows, headers=["task", "method", "backbone trained MB", "backbone full MB",
                                        "detector trained MB", "detector full MB"], disable_numparse=True))


def _image_files(images: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in images:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise UserInputError(f"--images: {item} does not exist")
    if not files:
        raise UserInputError(f"--images: no images in {', '.join(images)}")
    stems = [f.stem for f in files]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise UserInputError(f"--images: two images named {twice[0]} (their outputs would overwrite each other)")
    return files


def _parent_of(out: str) -> Path:
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _publish(staging: Path, out: Path) -> None:
    """Move every finished file into ``out`` (made if need be); files already there stay unless replaced."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in staging.iterdir():
        (out / folder.name).mkdir(exist_ok=True)
        for file in folder.iterdir():
            os.replace(file, out / folder.name / file.name)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
