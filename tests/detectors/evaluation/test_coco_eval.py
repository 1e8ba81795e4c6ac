"""CocoEvaluator against real pycocotools: perfect predictions score 100, bad ones less."""

from __future__ import annotations

import math

import pytest
import torch

from detectors.data import CocoDetection, make_synthetic_coco
from detectors.evaluation import CocoEvaluator, summarize_table
from detectors.errors import UserInputError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    paths = make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=1, num_val=12)
    return CocoDetection(paths["val_images"], paths["val_json"])


def _ground_truth_predictions(dataset: CocoDetection, shift: float = 0.0) -> list[dict]:
    predictions = []
    for index, image_id in enumerate(dataset.ids):
        _, target = dataset[index]
        boxes = target["boxes"].clone()
        widths = boxes[:, 2] - boxes[:, 0]
        boxes[:, [0, 2]] += shift * widths[:, None]
        predictions.append({"image_id": image_id, "boxes": boxes,
                            "scores": torch.ones(len(boxes)), "labels": target["labels"],
                            "masks": target["masks"][:, None].float()})
    return predictions


def test_ground_truth_as_predictions_scores_100(dataset):
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    evaluator.update(_ground_truth_predictions(dataset))
    metrics = evaluator.evaluate()
    for task in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            value = metrics[f"{task}/{name}"]
            assert value == pytest.approx(100.0) or (name[-1] in "sml" and math.isnan(value))
    assert metrics["bbox/VOC_AP50"] == metrics["bbox/AP50"]
    table = summarize_table(metrics)
    assert table.splitlines()[1].startswith("bbox") and "100.00" in table
    assert "bbox/VOC_AP50: 100.00" in table


def test_shifted_boxes_score_lower(dataset):
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    predictions = _ground_truth_predictions(dataset, shift=0.2)
    for pred in predictions:
        del pred["masks"]
    evaluator.update(predictions)
    metrics = evaluator.evaluate()
    assert 0.0 < metrics["bbox/AP"] < 60.0
    assert metrics["bbox/AP75"] < metrics["bbox/AP50"]
    assert "segm/AP" not in metrics


def test_no_predictions_give_zero(dataset):
    evaluator = CocoEvaluator(str(dataset.ann_file), dataset.label_to_cat_id)
    assert set(evaluator.evaluate().values()) == {0.0}
    evaluator.update([{"image_id": dataset.ids[0], "boxes": torch.zeros(0, 4),
                       "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                       "masks": torch.zeros(0, 1, 256, 320)}])
    metrics = evaluator.evaluate()
    assert "segm/AP" in metrics and set(metrics.values()) == {0.0}


def test_subset_and_merged_state_match_single_evaluator(dataset):
    predictions = _ground_truth_predictions(dataset, shift=0.1)
    whole = CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    whole.update(predictions)
    first = CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    second = CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    first.update(predictions[:5])
    second.update(predictions[5:])
    first.merge_state(second.get_state())
    assert first.evaluate() == pytest.approx(whole.evaluate(), nan_ok=True)


def test_bad_inputs_are_named(dataset, tmp_path):
    with pytest.raises(UserInputError, match="annotation file not found: .*missing.json"):
        CocoEvaluator(tmp_path / "missing.json", {1: 1})
    with pytest.raises(UserInputError, match=r"category ids \[77\]"):
        CocoEvaluator(dataset.coco, {1: 77})
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    with pytest.raises(UserInputError, match="image_id 999"):
        evaluator.update([{"image_id": 999, "boxes": torch.zeros(0, 4), "scores": [],
                           "labels": []}])
    with pytest.raises(UserInputError, match="predicted label 8"):
        evaluator.update([{"image_id": dataset.ids[0], "boxes": torch.ones(1, 4),
                           "scores": [0.5], "labels": [8]}])
