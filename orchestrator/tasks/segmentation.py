"""Semantic segmentation (per-pixel classes) with UPerNet on an ADE20K-layout folder; mIoU, mAcc and aAcc
over the split; predictions as per-class RLEs, label PNGs and pictures with the classes blended in."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from detectors.errors import UserInputError
from orchestrator.tasks.base import Column, Task, check_data_count, metric_safe, quoted, register_task
from orchestrator.tasks.pictures import colour, palette


@register_task
class SegmentationTask(Task):
    """Per-pixel classes on an ADE20K-layout folder with UPerNet; mIoU, mAcc and aAcc over the split."""
    name = "segmentation"
    headline = "val/segmentation/mIoU"
    columns = (Column("mIoU", "val_segmentation_mIoU", plotted=True), Column("delta", "val_segmentation_mIoU",
                                                                              delta=True),
               Column("mAcc", "val_segmentation_mAcc"), Column("aAcc", "val_segmentation_aAcc"))
    own_data = ("root", "classes", "reduce_zero_label", "scale", "ratio_range", "crop_size", "cat_max_ratio",
                "slide_stride")
    demo_experiment = "demo_segmentation.yaml"
    input_fields = ("root",)
    evaluation_data = ("FOLDER",)
    def check_config(self, cfg) -> None:
        super().check_config(cfg)
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
        return predict_split(model, dataset, device, indices=indices, slide=_slide(cfg), on_image=on_batch).matrix

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

    def data_overrides(self, cfg, data, classes):
        check_data_count(self, data)
        names = quoted([c["name"] for c in classes])  # a label PNG holds indices; the model names them
        return ["data.synthetic=null", f"data.root={quoted(data[0])}", f"data.classes={names}"]

    def data_source(self, cfg) -> str:
        return str(cfg.data.root or "the synthetic validation split")

    def predict(self, trained, picture, *, image_id=1, score_threshold=0.5):
        """The classes found, each with its pixel count and its pixels as a COCO RLE (pycocotools decodes it)."""
        from detectors.segmentation.evaluation import predict_labels
        device = next(trained.detector.parameters()).device
        labels = predict_labels(trained.detector, picture.to(device), tuple(trained.cfg.data.scale),
                                _slide(trained.cfg)).cpu()
        height, width = labels.shape
        return {"image_id": image_id, "height": height, "width": width,
                "classes": [_class_region(labels, index, trained.classes[index]) for index in labels.unique().tolist()]}

    def write_prediction(self, folder, stem, picture, found, trained):
        """``<stem>.json``; ``<stem>_labels.png``, each pixel's class as the dataset's label files number it
        (with ``reduce_zero_label``, 0 is "other" and 1..K the classes), a palette PNG in the legend's colours
        (16-bit grey beyond 255 labels); ``<stem>.png``, the classes blended over the picture with a legend."""
        from torchvision.transforms.functional import to_pil_image
        from orchestrator.tasks.pictures import with_legend
        (folder / f"{stem}.json").write_text(json.dumps(found))
        labels = label_map(found)
        shift = int(trained.cfg.data.reduce_zero_label)
        _label_file(labels + shift, len(trained.classes) + shift, shift).save(folder / f"{stem}_labels.png")
        coloured = torch.tensor([colour(i) for i in range(len(trained.classes))], dtype=torch.uint8)[labels]
        overlay = Image.blend(to_pil_image(picture), to_pil_image(coloured.permute(2, 0, 1)), alpha=0.5)
        entries = [(f"{c['name']} {100 * c['pixels'] / labels.numel():.0f}%", colour(c["id"]))
                   for c in sorted(found["classes"], key=lambda c: -c["pixels"])]
        with_legend(overlay, entries).save(folder / f"{stem}.png")


def _label_file(values: torch.Tensor, count: int, shift: int) -> Image.Image:
    """Label values as a palette PNG (class i in ``colour(i)``, "other" black), or 16-bit grey past 256 values."""
    if count > 256:
        return Image.fromarray(values.numpy().astype(np.uint16))
    picture = Image.fromarray(values.numpy().astype(np.uint8))  # L; a palette makes it P
    picture.putpalette([0, 0, 0] * shift + palette(count - shift))
    return picture


def _slide(cfg) -> tuple[tuple[int, int], tuple[int, int]] | None:
    return (tuple(cfg.data.crop_size), tuple(cfg.data.slide_stride)) if cfg.data.slide_stride else None


def _class_region(labels: torch.Tensor, index: int, named: dict[str, Any]) -> dict[str, Any]:
    from pycocotools import mask as mask_utils
    pixels = (labels == index).numpy().astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(pixels))
    return {"id": named["id"], "name": named["name"], "pixels": int(pixels.sum()),
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}


def label_map(found: dict[str, Any]) -> torch.Tensor:
    """The (H, W) class indices of a ``predict`` answer, from its per-class RLEs."""
    from pycocotools import mask as mask_utils
    labels = torch.zeros(found["height"], found["width"], dtype=torch.long)
    for region in found["classes"]:
        rle = {**region["segmentation"], "counts": region["segmentation"]["counts"].encode()}
        labels[torch.from_numpy(mask_utils.decode(rle).astype(bool))] = region["id"]
    return labels
