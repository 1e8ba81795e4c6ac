"""Image classification: a linear head on the tuned backbone's last stage, on an ImageFolder-layout folder
(``data.root`` with train/ and val/, a folder per class) or the synthetic shapes drawn as one; top-1 and
top-5 accuracy; predictions as the five likeliest classes, and the picture with them beside it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from detectors.errors import UserInputError
from orchestrator.tasks.base import Column, Task, check_data_count, quoted, register_task
from orchestrator.tasks.pictures import colour, with_legend

@register_task
class ClassificationTask(Task):
    name = "classification"
    headline = "val/classification/top1"
    columns = (Column("top-1", "val_classification_top1", plotted=True),
               Column("delta", "val_classification_top1", delta=True), Column("top-5", "val_classification_top5"))
    own_data = ("root", "crop_size")
    demo_experiment = "demo_classification.yaml"
    input_fields = ("root",)
    evaluation_data = ("FOLDER",)

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        if (cfg.data.synthetic is None) == (cfg.data.root is None):
            raise ValueError("data: give either 'synthetic' or 'root' (an ImageFolder-layout folder), one of them")

    def image_size(self, cfg) -> tuple[int, int]:
        """What every image is resized to: the synthetic images' own size, or a folder's ``data.crop_size``."""
        return tuple(cfg.data.synthetic.image_size if cfg.data.synthetic is not None else cfg.data.crop_size)

    def dataset_paths(self, cfg) -> dict[str, Any]:
        from detectors.classification import make_synthetic_classification
        s = cfg.data.synthetic
        if s is None:
            return {"root": str(cfg.data.root)}
        return {"root": str(make_synthetic_classification(s.folder(), s.num_train, s.num_val, s.image_size,
                                                          s.num_classes, s.seed, s.colours))}

    def build_datasets(self, cfg):
        from detectors.classification import ImageFolderSplit, check_same_classes
        paths = self.dataset_paths(cfg)
        train = ImageFolderSplit(paths["root"], "train", self.image_size(cfg), flip=cfg.data.flip)
        val = self.build_val_dataset(cfg, paths)
        check_same_classes(train, val)
        return train, val

    def build_val_dataset(self, cfg, paths=None):
        from detectors.classification import ImageFolderSplit
        return ImageFolderSplit((paths or self.dataset_paths(cfg))["root"], "val", self.image_size(cfg))

    def check_files(self, cfg) -> None:
        self.build_datasets(cfg)  # lists the folders; images are decoded as they load

    def classes(self, dataset):
        return [{"id": index, "name": name} for index, name in enumerate(dataset.class_names)]

    def num_classes(self, cfg):
        if cfg.data.synthetic is not None:
            return cfg.data.synthetic.num_classes
        folder = Path(cfg.data.root) / "train"
        return sum(p.is_dir() for p in folder.iterdir()) if folder.is_dir() else None

    def collate(self, batch):
        images, labels = zip(*batch)
        return torch.stack(images), torch.tensor(labels)

    def move_batch(self, images, targets, device):
        from detectors.classification import normalise
        return normalise(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)

    def predict_shard(self, cfg, model, dataset, device, indices, on_batch=None, batch_size=8):
        from detectors.classification import predict_split
        return predict_split(model, dataset, device, indices=indices, batch_size=batch_size, on_batch=on_batch)

    def score(self, dataset, states):
        from detectors.classification import accuracies
        return {f"classification/{key}": value for key, value in accuracies(states).items()}

    def training_size(self, cfg):
        return self.image_size(cfg)

    def run_tag(self, cfg) -> str:
        return "image-classification"

    def results_table(self, metrics):
        from tabulate import tabulate
        if "val/classification/top1" not in metrics:
            return ""
        return tabulate([[f"{metrics[f'val/classification/{k}']:.1f}" for k in ("top1", "top5")]],
                        headers=("top-1", "top-5"), disable_numparse=True)

    def dataset_record(self, cfg, paths):
        root = Path(paths["root"])
        s = cfg.data.synthetic
        name = f"synthetic-classification-{s.num_train}+{s.num_val}" if s is not None else root.name
        files = sorted(p for split in ("train", "val") for p in (root / split).rglob("*") if p.is_file())[:2000]
        return name, files, root

    def data_overrides(self, cfg, data, classes):
        check_data_count(self, data)
        return ["data.synthetic=null", f"data.root={quoted(data[0])}", f"data.crop_size={list(self.image_size(cfg))}"]

    def check_classes(self, trained, dataset) -> None:
        """The folder's class folders must be the model's classes: a class index means one class."""
        theirs, ours = dataset.class_names, [c["name"] for c in trained.classes]
        if theirs != ours:
            differ = next((f"{a!r} where the model has {b!r}" for a, b in zip(theirs, ours) if a != b),
                          f"{len(theirs)} classes, the model {len(ours)}")
            raise UserInputError(f"{self.data_source(trained.cfg)}: its class folders are not the classes "
                                 f"{trained.source} was trained for ({differ})")

    def data_source(self, cfg) -> str:
        return str(cfg.data.root or "the synthetic validation split")

    def predict(self, trained, picture, *, image_id=1, score_threshold=0.5):
        """The five likeliest classes (fewer if there are fewer), with their probabilities."""
        from detectors.classification import normalise, resize
        device = next(trained.detector.parameters()).device
        image = resize(picture, self.image_size(trained.cfg))[None].to(device)
        with torch.no_grad():
            probabilities = trained.detector(normalise(image))[0].softmax(0).cpu()
        top = probabilities.topk(min(5, len(probabilities)))
        return {"image_id": image_id, "classes": [{**trained.classes[i], "score": float(p)}
                                                  for p, i in zip(top.values.tolist(), top.indices.tolist())]}

    def write_prediction(self, folder, stem, picture, found, trained):
        from torchvision.transforms.functional import to_pil_image
        (folder / f"{stem}.json").write_text(json.dumps(found))
        entries = [(f"{c['name']} {c['score']:.2f}", colour(c["id"])) for c in found["classes"]]
        with_legend(to_pil_image(picture), entries).save(folder / f"{stem}.png")
