"""Sharded evaluation: every rank predicts its own share of the split, COCO AP is computed once over all.

The figures must equal one process's on the whole split, whatever the number of shards.
"""
import math

import pytest
import torch

from detectors.data import CocoDetection, build_transforms, make_synthetic_coco
from detectors.training import evaluate, evaluate_shards, evaluation_shard, predict_dataset


@pytest.mark.parametrize("num_images, world", [(16, 2), (16, 3), (5, 4), (3, 4)])
def test_the_shards_are_disjoint_and_cover_the_split(num_images, world):
    shards = [set(evaluation_shard(num_images, rank, world)) for rank in range(world)]
    assert set().union(*shards) == set(range(num_images))
    assert sum(len(s) for s in shards) == num_images
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


class NoisyOracle:
    """A detector whose predictions are the ground truth, disturbed: boxes and masks shifted by a few pixels,
    some objects missed, some false detections and scores that do not rank the true ones first. Its COCO
    figures lie well between 0 and 100 and differ by object size, so a merge that drops, repeats or
    misattributes one shard's predictions shows in them (an untrained detector scores zeros everywhere).
    Each image's predictions are drawn from its own seed, whichever shard or batch asks."""

    def __init__(self, dataset):
        self.truth = {}  # the test-time image tensor's bytes -> (image id, its annotations)
        for index in range(len(dataset)):
            image, target = dataset[index]
            image_id = int(target["image_id"])
            self.truth[image.numpy().tobytes()] = (image_id, dataset.coco.loadAnns(dataset.coco.getAnnIds(image_id)))
        self.label_of = {cat: label for label, cat in dataset.label_to_cat_id.items()}
        self.coco = dataset.coco

    def predict(self, images, output_sizes):
        return [self._predict(image, size) for image, size in zip(images, output_sizes)]

    def _predict(self, image, size):
        image_id, annotations = self.truth[image.numpy().tobytes()]
        rng = torch.Generator().manual_seed(image_id)
        boxes, labels, scores, masks = [], [], [], []
        for annotation in annotations:
            if torch.rand((), generator=rng) < 0.2:
                continue  # missed
            dx, dy = (int(v) for v in torch.randint(-4, 5, (2,), generator=rng))
            mask = torch.from_numpy(self.coco.annToMask(annotation)).roll((dy, dx), (0, 1))
            x, y, w, h = annotation["bbox"]
            boxes.append([x + dx, y + dy, x + dx + w, y + dy + h])
            labels.append(self.label_of[annotation["category_id"]])
            scores.append(float(torch.rand((), generator=rng)) * 0.7 + 0.3)
            masks.append(mask)
        for _ in range(int(torch.randint(0, 3, (), generator=rng))):  # false detections
            x, y = (float(v) for v in torch.randint(0, min(size) - 24, (2,), generator=rng))
            mask = torch.zeros(size, dtype=torch.uint8)
            mask[int(y):int(y) + 20, int(x):int(x) + 20] = 1
            boxes.append([x, y, x + 20, y + 20])
            labels.append(1 + int(torch.randint(0, len(self.label_of), (), generator=rng)))
            scores.append(float(torch.rand((), generator=rng)) * 0.8)
            masks.append(mask)
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
                "scores": torch.tensor(scores), "masks": torch.stack(masks).bool()[:, None] if masks else
                torch.zeros((0, 1, *size), dtype=torch.bool)}


@pytest.fixture(scope="module")
def detector_and_split(tmp_path_factory):
    paths = make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=1, num_val=10,
                                image_size=(128, 160), num_classes=3, seed=1)
    val = CocoDetection(paths["val_images"], paths["val_json"],
                        build_transforms(False, test_short_edge=128, max_size=256))
    return NoisyOracle(val), val


def test_the_oracle_scores_between_zero_and_a_hundred(detector_and_split):
    figures = evaluate(*detector_and_split)
    for key in ("bbox/AP", "bbox/AP50", "segm/AP", "bbox/APm", "bbox/APl"):
        assert 10 < figures[key] < 95, (key, figures[key])


@pytest.mark.parametrize("world", [2, 3])
def test_merged_shards_give_the_figures_of_one_process(detector_and_split, world):
    model, val = detector_and_split
    whole = evaluate(model, val)
    states = [predict_dataset(model, val, indices=evaluation_shard(len(val), rank, world)).get_state()
              for rank in range(world)]
    assert sorted(i for s in states for i in s["image_ids"]) == sorted(val.ids)
    merged = evaluate_shards(val, states)
    assert merged.keys() == whole.keys() and "segm/AP" in merged
    for key, value in whole.items():
        assert (math.isnan(value) and math.isnan(merged[key])) or abs(merged[key] - value) <= 1e-6, key
    # A lost shard would score a smaller split (here 59.4 box AP instead of 51.9 at two shards): refused.
    with pytest.raises(ValueError, match="predicted by no shard"):
        evaluate_shards(val, states[1:])


def test_an_image_predicted_by_two_shards_is_refused(detector_and_split):
    model, val = detector_and_split
    state = predict_dataset(model, val, indices=[0, 1]).get_state()
    with pytest.raises(ValueError, match="predicted by two shards"):
        evaluate_shards(val, [state, state])
