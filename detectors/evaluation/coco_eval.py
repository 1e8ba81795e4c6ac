"""COCO box and mask AP with pycocotools, as the papers report it.

Predictions are converted to COCO result dicts as they arrive, so the evaluator holds small
JSON-able lists rather than full-resolution masks, and a worker's state can be gathered to rank 0
(``get_state`` / ``merge_state``) when evaluation is sharded over Ray Train workers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.data.coco import load_coco, usable_segmentation
from detectors.errors import UserInputError

logger = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


class CocoEvaluator:
    """Accumulate predictions for a set of images, then compute COCO metrics in percent.

    Images passed to ``update`` with no detections still count: their ground truth are misses.
    Images never passed are left out, so evaluating a subset of the validation set is honest.
    """

    def __init__(self, coco_gt: COCO | str | os.PathLike,
                 label_to_cat_id: Mapping[int, int]) -> None:
        self.coco_gt = coco_gt if isinstance(coco_gt, COCO) else load_coco(coco_gt)
        unknown = sorted(set(label_to_cat_id.values()) - set(self.coco_gt.getCatIds()))
        if unknown:
            raise UserInputError(f"label_to_cat_id maps to category ids {unknown} that are not "
                                 f"in the ground truth's 'categories'")
        self.label_to_cat_id = {int(k): int(v) for k, v in label_to_cat_id.items()}
        self.reset()

    def reset(self) -> None:
        self.image_ids: set[int] = set()
        self.bbox_results: list[dict[str, Any]] = []
        self.segm_results: list[dict[str, Any]] = []
        self.has_masks = False

    def update(self, predictions: Iterable[Mapping[str, Any]]) -> None:
        """Add per-image predictions: boxes (xyxy, original image coordinates), scores, labels,
        and optionally masks (N x 1 x H x W probabilities or N x H x W bool)."""
        for pred in predictions:
            image_id = int(pred["image_id"])
            if image_id not in self.coco_gt.imgs:
                raise UserInputError(f"prediction for image_id {image_id}, which is not in the "
                                     f"ground truth")
            self.image_ids.add(image_id)
            boxes = _numpy(pred["boxes"]).reshape(-1, 4).astype(np.float64)
            scores = _numpy(pred["scores"]).reshape(-1).tolist()
            cat_ids = [self._cat_id(int(label)) for label in _numpy(pred["labels"]).reshape(-1)]
            if not len(boxes) == len(scores) == len(cat_ids):
                raise ValueError(f"image_id {image_id}: {len(boxes)} boxes, {len(scores)} scores "
                                 f"and {len(cat_ids)} labels; they must match")
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
            for box, score, cat_id in zip(xywh, scores, cat_ids):
                self.bbox_results.append({"image_id": image_id, "category_id": cat_id,
                                          "bbox": box, "score": float(score)})
            if "masks" in pred:
                self.has_masks = True
                for rle, score, cat_id in zip(self._encode(image_id, pred["masks"]), scores,
                                              cat_ids):
                    self.segm_results.append({"image_id": image_id, "category_id": cat_id,
                                              "segmentation": rle, "score": float(score)})

    def _cat_id(self, label: int) -> int:
        if label not in self.label_to_cat_id:
            raise UserInputError(f"predicted label {label} has no entry in label_to_cat_id "
                                 f"(known labels: {sorted(self.label_to_cat_id)})")
        return self.label_to_cat_id[label]

    def _encode(self, image_id: int, masks: Any) -> list[dict[str, Any]]:
        array = _numpy(masks)
        if array.ndim == 4:
            array = array[:, 0]
        info = self.coco_gt.imgs[image_id]
        if array.shape[1:] != (info["height"], info["width"]):
            raise ValueError(f"masks for image_id {image_id} are {array.shape[1:]}, expected the "
                             f"original size {(info['height'], info['width'])}; rescale first")
        binary = array > 0.5 if array.dtype.kind == "f" else array.astype(bool)
        if binary.shape[0] == 0:
            return []
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        return rles

    def get_state(self) -> dict[str, Any]:
        """Plain-Python state for gathering across workers."""
        return {"image_ids": sorted(self.image_ids), "bbox": self.bbox_results,
                "segm": self.segm_results, "has_masks": self.has_masks}

    def merge_state(self, state: Mapping[str, Any]) -> None:
        twice = self.image_ids.intersection(state["image_ids"])
        if twice:  # their predictions would count twice, and their ground truth once
            raise ValueError(f"images {sorted(twice)[:5]} were predicted by two shards; shards must be disjoint")
        self.image_ids.update(state["image_ids"])
        self.bbox_results.extend(state["bbox"])
        self.segm_results.extend(state["segm"])
        self.has_masks = self.has_masks or bool(state["has_masks"])

    def evaluate(self) -> dict[str, float]:
        """Flat metrics ``bbox/AP`` ... ``segm/APl`` in percent, plus ``bbox/VOC_AP50``.

        A size bucket with no ground truth gives NaN (as detectron2 reports it); no detections at
        all gives 0.0 everywhere rather than pycocotools' crash on an empty result list.
        """
        metrics = self._evaluate_type("bbox", self.bbox_results)
        metrics["bbox/VOC_AP50"] = metrics["bbox/AP50"]
        if self.has_masks:
            masks_truth = self._segmentation_ground_truth()
            if masks_truth is not None:
                metrics.update(self._evaluate_type("segm", self.segm_results, masks_truth))
            else:
                logger.warning("predictions have masks but the ground truth has no "
                               "segmentations; skipping segm evaluation")
        return metrics

    def _segmentation_ground_truth(self) -> COCO | None:
        """The ground truth that masks are scored against: every annotation with a usable segmentation
        (polygons of three points or more, or RLE), the others left out (pycocotools cannot rasterise
        ``segmentation: []``); None where no annotation has one (box-only data such as VOC)."""
        usable = {i: usable_segmentation(ann.get("segmentation")) for i, ann in self.coco_gt.anns.items()}
        if not any(usable.values()):
            return None
        if all(usable[i] == ann.get("segmentation") for i, ann in self.coco_gt.anns.items()):
            return self.coco_gt
        left_out = sorted(i for i, segmentation in usable.items() if not segmentation)
        if left_out:
            logger.warning("%d annotation(s) without a usable segmentation (first: id %s) are not scored for "
                           "masks", len(left_out), left_out[0])
        truth = COCO()
        truth.dataset = {**self.coco_gt.dataset, "annotations": [
            {**ann, "segmentation": usable[ann["id"]]} for ann in self.coco_gt.dataset["annotations"]
            if usable[ann["id"]]]}
        with contextlib.redirect_stdout(io.StringIO()):
            truth.createIndex()
        return truth

    def _evaluate_type(self, iou_type: str, results: list[dict[str, Any]],
                       truth: COCO | None = None) -> dict[str, float]:
        if not results:
            return {f"{iou_type}/{name}": 0.0 for name in METRIC_NAMES}
        truth = truth or self.coco_gt
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            # loadRes writes ids and areas into the dicts it gets: hand it copies.
            coco_dt = truth.loadRes(copy.deepcopy(results))
            coco_eval = COCOeval(truth, coco_dt, iou_type)
            coco_eval.params.imgIds = sorted(self.image_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        logger.info("COCO %s evaluation on %d images:\n%s", iou_type, len(self.image_ids),
                    out.getvalue().rstrip())
        return {f"{iou_type}/{name}": float(value * 100) if value >= 0 else math.nan
                for name, value in zip(METRIC_NAMES, coco_eval.stats[: len(METRIC_NAMES)])}


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def summarize_table(metrics: Mapping[str, float]) -> str:
    """A fixed-width table of the standard metrics, one row per task, for logs and reports."""
    tasks = [task for task in ("bbox", "segm") if f"{task}/AP" in metrics]
    lines = [f"{'task':<6}" + "".join(f"{name:>8}" for name in METRIC_NAMES)]
    for task in tasks:
        cells = (metrics.get(f"{task}/{name}", math.nan) for name in METRIC_NAMES)
        lines.append(f"{task:<6}" + "".join(f"{value:>8.2f}" for value in cells))
    standard = {f"{task}/{name}" for task in tasks for name in METRIC_NAMES}
    for key in sorted(set(metrics) - standard):
        lines.append(f"{key}: {metrics[key]:.2f}")
    return "\n".join(lines)
