"""Object detection (boxes, and instance masks for Mask R-CNN models) on COCO-format data; COCO AP
through pycocotools; predictions as COCO results and pictures with boxes, masks and names drawn."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from orchestrator.tasks.base import Column, Task, check_data_count, quoted, register_task
from orchestrator.tasks.pictures import colour


@register_task
class DetectionTask(Task):
    """Boxes (and instance masks) on COCO-format data; COCO AP through pycocotools."""
    name = "detection"
    headline = "val/bbox/AP"
    columns = (Column("AP box", "val_bbox_AP", plotted=True), Column("AP50", "val_bbox_AP50"),
               Column("delta", "val_bbox_AP", delta=True), Column("AP mask", "val_segm_AP", plotted=True),
               Column("delta", "val_segm_AP", delta=True))
    own_data = ("train_images", "train_json", "val_images", "val_json", "train_short_edges", "test_short_edge",
                "max_size")
    demo_experiment = "demo.yaml"
    input_fields = ("train_images", "train_json", "val_images", "val_json")
    own_model = ("engine",)
    evaluation_data = ("IMAGES", "ANNOTATIONS")

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

    def data_overrides(self, cfg, data, classes):
        check_data_count(self, data)
        images, annotations = quoted(data[0]), quoted(data[1])
        return ["data.synthetic=null", f"data.train_images={images}", f"data.train_json={annotations}",
                f"data.val_images={images}", f"data.val_json={annotations}"]

    def data_source(self, cfg) -> str:
        return str(cfg.data.val_json or "the synthetic validation split")

    def predict(self, trained, picture, *, image_id=1, score_threshold=0.5):
        """COCO results (``loadRes`` reads them), each with its category's name too."""
        from detectors.data.transforms import build_transforms
        d = trained.cfg.data
        resize = build_transforms(False, test_short_edge=d.test_short_edge, max_size=d.max_size)
        height, width = picture.shape[-2:]
        image, _ = resize(picture.float() / 255.0, {"boxes": torch.zeros(0, 4)})
        device = next(trained.detector.parameters()).device
        prediction = trained.detector.predict([image.to(device)], output_sizes=[(height, width)])[0]
        prediction = {key: value.cpu() for key, value in prediction.items()}
        kept = torch.nonzero(prediction["scores"] >= score_threshold).flatten().tolist()
        return [_coco_result(prediction, i, trained.classes, image_id) for i in kept]

    def write_prediction(self, folder, stem, picture, found, trained):
        (folder / f"{stem}.json").write_text(json.dumps(found))
        _render(picture, found).save(folder / f"{stem}.png")


def _coco_result(prediction: dict[str, torch.Tensor], i: int, classes: list[dict[str, Any]],
                 image_id: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils
    x1, y1, x2, y2 = prediction["boxes"][i].tolist()
    category = classes[int(prediction["labels"][i]) - 1]
    result = {"image_id": image_id, "category_id": category["id"], "category_name": category["name"],
              "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(prediction["scores"][i])}
    if prediction.get("masks") is not None:
        rle = mask_utils.encode(np.asfortranarray(prediction["masks"][i, 0].numpy().astype(np.uint8)))
        result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return result


def _render(picture: torch.Tensor, results: list[dict[str, Any]]):
    """The picture with each result's mask overlaid and its box, name and score drawn (torchvision's utilities)."""
    from pycocotools import mask as mask_utils
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    drawn = picture
    colours = [colour(r["category_id"]) for r in results]
    if results and "segmentation" in results[0]:
        masks = torch.from_numpy(np.stack([mask_utils.decode({**r["segmentation"],
                                                              "counts": r["segmentation"]["counts"].encode()})
                                           for r in results]).astype(bool))
        drawn = draw_segmentation_masks(drawn, masks, alpha=0.45, colors=colours)
    if results:
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in results)])
        labels = [f"{r['category_name']} {r['score']:.2f}" for r in results]
        drawn = draw_bounding_boxes(drawn, boxes, labels=labels, colors=colours, width=2)
    return to_pil_image(drawn)
