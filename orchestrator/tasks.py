"""Tasks: what differs between object detection and semantic segmentation, each defined once.

A task knows its data (which fields of ``data`` it reads, how the datasets are built and checked), its
model, how a batch reaches the device, how a validation split is scored over several ranks, the
metric sweeps optimise (its headline) and its columns in ``compare``. The training loop, ``run``,
``sweep``, ``plan`` and ``compare`` ask the experiment's task (``task_of(cfg)``) and never branch on
a task's name. An experiment names its task by its model (``model.detector: upernet``) or explicitly
(``model.task: segmentation``).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from detectors.errors import UserInputError

DETECTION_DATA = ("train_images", "train_json", "val_images", "val_json", "train_short_edges", "test_short_edge",
                  "max_size")
SEGMENTATION_DATA = ("root", "classes", "reduce_zero_label", "scale", "ratio_range", "crop_size", "cat_max_ratio",
                     "slide_stride")


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
    own_data: tuple[str, ...]  # fields of ``data`` only this task reads
    serves_pictures = False  # predict and serve answer a picture with what this task's models find

    def models(self) -> Sequence[str]:
        raise NotImplementedError

    def check_config(self, cfg) -> None:
        """Fields that belong to another task, or that this one lacks: ``ValueError`` naming the field."""
        for task in TASKS.values():
            foreign = [f for f in cfg.data.given(*task.own_data) if f not in self.own_data]
            if foreign:
                raise ValueError(f"data.{foreign[0]}: a {task.name} field, but this experiment's task is {self.name} "
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
        raise NotImplementedError

    def check_model(self, cfg) -> None:
        raise NotImplementedError

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


class DetectionTask(Task):
    """Boxes (and instance masks) on COCO-format data; COCO AP through pycocotools."""
    name = "detection"
    headline = "val/bbox/AP"
    columns = (Column("AP box", "val_bbox_AP", plotted=True), Column("AP50", "val_bbox_AP50"),
               Column("delta", "val_bbox_AP", delta=True), Column("AP mask", "val_segm_AP", plotted=True),
               Column("delta", "val_segm_AP", delta=True))
    own_data = DETECTION_DATA
    serves_pictures = True

    def models(self) -> Sequence[str]:
        from detectors.engines import ENGINES
        return [name for engine in ENGINES.names() for name in ENGINES.get(engine).detectors]

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        d = cfg.data
        paths = [d.train_images, d.train_json, d.val_images, d.val_json]
        if d.synthetic is None and any(p is None for p in paths):
            raise ValueError("data: give either 'synthetic' or all of train_images, train_json, val_images, val_json")
        if d.synthetic is not None and any(p is not None for p in paths):
            raise ValueError("data: give either 'synthetic' or dataset paths, not both")

    def dataset_paths(self, cfg) -> dict[str, Any]:
        from detectors.data import make_synthetic_coco
        if cfg.data.synthetic is not None:
            s = cfg.data.synthetic
            return make_synthetic_coco(s.folder(), num_train=s.num_train, num_val=s.num_val,
                                       image_size=tuple(s.image_size), num_classes=s.num_classes, seed=s.seed,
                                       colours=s.colours)
        return {"train_images": cfg.data.train_images, "train_json": cfg.data.train_json,
                "val_images": cfg.data.val_images, "val_json": cfg.data.val_json}

    def build_datasets(self, cfg):
        from detectors.data import CocoDetection, build_transforms
        paths = self.dataset_paths(cfg)
        d = cfg.data
        train = CocoDetection(paths["train_images"], paths["train_json"],
                              build_transforms(True, d.train_short_edges, d.max_size, flip_prob=d.flip))
        return train, self.build_val_dataset(cfg, paths)

    def build_val_dataset(self, cfg, paths=None):
        from detectors.data import CocoDetection, build_transforms
        paths = paths or self.dataset_paths(cfg)
        d = cfg.data
        return CocoDetection(paths["val_images"], paths["val_json"],
                             build_transforms(False, test_short_edge=d.test_short_edge, max_size=d.max_size))

    def check_files(self, cfg) -> None:
        from detectors.data.coco import check_coco_files
        paths = self.dataset_paths(cfg)
        for split in ("train", "val"):
            check_coco_files(paths[f"{split}_images"], paths[f"{split}_json"])

    def classes(self, dataset) -> list[dict[str, Any]]:
        from detectors.training import check_num_classes
        check_num_classes(dataset, dataset.num_classes)
        return [{"id": dataset.label_to_cat_id[label], "name": name}
                for label, name in enumerate(dataset.class_names, start=1)]

    def num_classes(self, cfg) -> int | None:
        return cfg.data.synthetic.num_classes if cfg.data.synthetic is not None else None

    def build_model(self, cfg, num_classes: int):
        from detectors.engines import build_detector
        return build_detector(cfg.model.engine, cfg.model.detector, num_classes, backbone=cfg.backbone.name,
                              tuning=cfg.tuning.method, weights=cfg.backbone.weight_file(),
                              hyperparameters=cfg.tuning.hyperparameters, detector_options=cfg.model.options,
                              drop_path_rate=cfg.backbone.drop_path_rate, **cfg.backbone.overrides)

    def check_model(self, cfg) -> None:
        from detectors.engines import ENGINES
        ENGINES.get(cfg.model.engine).check(cfg.model.engine, cfg.model.detector, cfg.model.options)

    def collate(self, batch):
        from detectors.data import collate_fn
        return collate_fn(batch)

    def move_batch(self, images, targets, device):
        from detectors.training import move_batch
        return move_batch(images, targets, device)

    def predict_shard(self, cfg, model, dataset, device, indices, on_batch=None, batch_size=2):
        from detectors.training import predict_dataset
        return predict_dataset(model, dataset, device, batch_size, indices=indices, on_batch=on_batch).get_state()

    def score(self, dataset, states):
        from detectors.training import evaluate_shards
        return evaluate_shards(dataset, states)

    def training_size(self, cfg) -> tuple[int, int]:
        return max(cfg.data.train_short_edges), cfg.data.max_size

    def model_id(self, cfg) -> str:
        return f"{cfg.model.engine}/{cfg.model.detector}"

    def run_params(self, cfg) -> dict[str, str]:
        return {"engine": cfg.model.engine}

    def run_tag(self, cfg) -> str:
        return "instance-segmentation" if cfg.model.detector in ("mask_rcnn", "cascade_mask_rcnn") else "detection"

    def results_table(self, metrics):
        from tabulate import tabulate
        columns = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        rows = [[kind] + [f"{metrics.get(f'val/{kind}/{name}', float('nan')):.1f}" for name in columns]
                for kind in ("bbox", "segm") if f"val/{kind}/AP" in metrics]
        return tabulate(rows, headers=["", *columns], disable_numparse=True) if rows else ""

    def dataset_record(self, cfg, paths):
        synthetic = cfg.data.synthetic
        name = (f"synthetic-shapes-{synthetic.num_train}+{synthetic.num_val}" if synthetic is not None
                else Path(paths["train_json"]).stem)
        return name, [Path(paths["train_json"]), Path(paths["val_json"])], Path(paths["train_json"])


class SegmentationTask(Task):
    """Per-pixel classes on an ADE20K-layout folder with UPerNet; mIoU, mAcc and aAcc over the split."""
    name = "segmentation"
    headline = "val/segmentation/mIoU"
    columns = (Column("mIoU", "val_segmentation_mIoU", plotted=True), Column("delta", "val_segmentation_mIoU",
                                                                              delta=True),
               Column("mAcc", "val_segmentation_mAcc"), Column("aAcc", "val_segmentation_aAcc"))
    own_data = SEGMENTATION_DATA
    detection_model_fields = ("engine",)

    def models(self) -> Sequence[str]:
        from detectors.segmentation.upernet import SEGMENTERS
        return list(SEGMENTERS)

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        given = [f for f in self.detection_model_fields
                 if getattr(cfg.model, f) != type(cfg.model).model_fields[f].default]
        if given:
            raise ValueError(f"model.{given[0]}: a detection field, but this experiment's task is segmentation "
                             f"(model.detector: {cfg.model.detector})")
        d = cfg.data
        if (d.synthetic is None) == (d.root is None):
            raise ValueError("data: give either 'synthetic' or 'root' (an ADE20K-layout folder), one of them")
        if d.root is not None and d.classes is None:
            raise ValueError("data.classes: required with data.root: the class names in label order, or 'ade20k'")
        if d.synthetic is not None and d.classes is not None:
            raise ValueError("data.classes: the synthetic set names its own classes (background and its shapes)")
        if d.ratio_range[0] <= 0 or d.ratio_range[0] > d.ratio_range[1]:
            raise ValueError(f"data.ratio_range: expected 0 < low <= high (got {list(d.ratio_range)})")
        sizes = cfg.batch_sizes()
        if sizes is not None and min(sizes) < 2 and not (cfg.scaling.use_gpu and cfg.scaling.workers > 1):
            raise ValueError(f"schedule.batch_size: {self.batch_norm_needs_two()}")

    @staticmethod
    def batch_norm_needs_two() -> str:
        return ("UPerNet needs at least 2 images per worker: its pyramid pooling normalises a 1x1 map with "
                "BatchNorm, which one image cannot (on several GPUs SyncBatchNorm counts every worker's)")

    def dataset_paths(self, cfg) -> dict[str, Any]:
        from detectors.segmentation import make_synthetic_segmentation
        d = cfg.data
        if d.synthetic is not None:
            s = d.synthetic
            return make_synthetic_segmentation(s.folder(), num_train=s.num_train, num_val=s.num_val,
                                               image_size=tuple(s.image_size), num_classes=s.num_classes, seed=s.seed)
        return {"root": str(d.root), "class_names": d.class_names(), "reduce_zero_label": d.reduce_zero_label}

    def _split(self, paths: dict[str, Any], split: str, transforms=None):
        from detectors.segmentation import SegmentationFolder
        return SegmentationFolder(paths["root"], split, paths["class_names"], paths["reduce_zero_label"], transforms)

    def build_datasets(self, cfg):
        from detectors.segmentation import TrainTransform
        paths = self.dataset_paths(cfg)
        d = cfg.data
        train = self._split(paths, "training", TrainTransform(d.scale, d.crop_size, tuple(d.ratio_range),
                                                              d.cat_max_ratio, d.flip))
        return train, self.build_val_dataset(cfg, paths)

    def build_val_dataset(self, cfg, paths=None):
        from detectors.segmentation import EvalTransform
        return self._split(paths or self.dataset_paths(cfg), "validation", EvalTransform(cfg.data.scale))

    def check_files(self, cfg) -> None:
        from detectors.segmentation.data import remember_check
        paths = self.dataset_paths(cfg)
        cache = Path(cfg.output_dir) / "checked-labels"  # a folder that passed once is not read again
        markers = [self._split(paths, split).check_files(cache_dir=cache) for split in ("training", "validation")]
        for marker in markers:  # only once both passed: a failed check writes nothing
            remember_check(marker)

    def classes(self, dataset) -> list[dict[str, Any]]:
        return [{"id": index, "name": name} for index, name in enumerate(dataset.class_names)]

    def num_classes(self, cfg) -> int | None:
        if cfg.data.synthetic is not None:
            return cfg.data.synthetic.num_classes + 1  # and the background
        return len(cfg.data.class_names())

    def build_model(self, cfg, num_classes: int):
        from detectors.segmentation.upernet import build_segmenter
        return build_segmenter(cfg.model.detector, num_classes, backbone=cfg.backbone.name, tuning=cfg.tuning.method,
                               weights=cfg.backbone.weight_file(), hyperparameters=cfg.tuning.hyperparameters,
                               options=cfg.model.options, drop_path_rate=cfg.backbone.drop_path_rate,
                               **cfg.backbone.overrides)

    def check_model(self, cfg) -> None:
        from detectors.segmentation.upernet import check_segmenter
        check_segmenter(cfg.model.detector, cfg.model.options)

    def prepare(self, model, device, world):
        # The recipe's heads normalise with SyncBatchNorm over every GPU's images; it runs on CUDA only.
        if world > 1 and device.type == "cuda":
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def collate(self, batch):
        images, labels = zip(*batch)
        return torch.stack(images), torch.stack(labels)

    def move_batch(self, images, targets, device):
        from detectors.segmentation.evaluation import normalise
        if images.shape[0] < 2 and device.type != "cuda":  # (a batch-size mapping or 'auto' chose 1)
            raise UserInputError(f"schedule.batch_size: {self.batch_norm_needs_two()}")
        return normalise(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)

    def predict_shard(self, cfg, model, dataset, device, indices, on_batch=None, batch_size=1):
        from detectors.segmentation.evaluation import predict_split  # one image at a time: each has its size
        slide = (tuple(cfg.data.crop_size), tuple(cfg.data.slide_stride)) if cfg.data.slide_stride else None
        return predict_split(model, dataset, device, indices=indices, slide=slide, on_image=on_batch).matrix

    def score(self, dataset, states):
        from detectors.segmentation import ConfusionMatrix
        matrix = ConfusionMatrix(dataset.num_classes).merge(states)
        names = [metric_safe(name) for name in dataset.class_names]
        return {f"segmentation/{key}": value for key, value in matrix.scores(names).items()}

    def training_size(self, cfg) -> tuple[int, int]:
        return tuple(cfg.data.crop_size)

    def run_tag(self, cfg) -> str:
        return "semantic-segmentation"

    def results_table(self, metrics):
        from tabulate import tabulate
        columns = ("mIoU", "mAcc", "aAcc")
        if "val/segmentation/mIoU" not in metrics:
            return ""
        return tabulate([[f"{metrics[f'val/segmentation/{name}']:.1f}" for name in columns]], headers=columns,
                        disable_numparse=True)

    def dataset_record(self, cfg, paths):
        root = Path(paths["root"])
        synthetic = cfg.data.synthetic
        name = (f"synthetic-segmentation-{synthetic.num_train}+{synthetic.num_val}" if synthetic is not None
                else root.name)
        files = sorted((root / "annotations").rglob("*.png"))[:2000]  # the labels: what a dataset version changes
        return name, files, root


def metric_safe(name: str) -> str:
    """A class name as a piece of a metric key (MLflow allows letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", name).strip() or "_"


TASKS: dict[str, Task] = {task.name: task for task in (DetectionTask(), SegmentationTask())}


def task_of(cfg) -> Task:
    """The experiment's task: ``model.task`` when given, else the one whose models include ``model.detector``."""
    named = cfg.model.task
    if named is not None:
        if named not in TASKS:
            raise ValueError(f"model.task: unknown task {named!r}; choose one of {', '.join(TASKS)}")
        task = TASKS[named]
        if cfg.model.detector not in task.models():
            raise ValueError(f"model.detector: {cfg.model.detector!r} is not a {named} model "
                             f"(those are: {', '.join(task.models())})")
        return task
    for task in TASKS.values():
        if cfg.model.detector in task.models():
            return task
    known = ", ".join(f"{name} ({', '.join(task.models())})" for name, task in TASKS.items())
    raise ValueError(f"model.detector: unknown model {cfg.model.detector!r}; the tasks and their models: {known}")


__all__ = ["Column", "Task", "TASKS", "task_of", "metric_safe"]
