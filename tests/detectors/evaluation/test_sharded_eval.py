"""Sharded evaluation: every rank predicts its own share of the split, COCO AP is computed once over all.

The figures must equal one process's on the whole split, whatever the number of shards.
"""
import math

import pytest
import torch

from detectors.data import CocoDetection, build_transforms, make_synthetic_coco
from detectors.engines import build_detector
from detectors.training import evaluate, evaluate_shards, evaluation_shard, predict_dataset

SMALL_IMAGES = dict(rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=300, box_detections_per_img=50,
                    box_score_thresh=0.0)


@pytest.mark.parametrize("num_images, world", [(16, 2), (16, 3), (5, 4), (3, 4)])
def test_the_shards_are_disjoint_and_cover_the_split(num_images, world):
    shards = [set(evaluation_shard(num_images, rank, world)) for rank in range(world)]
    assert set().union(*shards) == set(range(num_images))
    assert sum(len(s) for s in shards) == num_images
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.fixture(scope="module")
def detector_and_split(tmp_path_factory):
    paths = make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=1, num_val=10,
                                image_size=(128, 160), num_classes=3, seed=1)
    val = CocoDetection(paths["val_images"], paths["val_json"],
                        build_transforms(False, test_short_edge=128, max_size=256))
    torch.manual_seed(0)
    model = build_detector("torchvision", "mask_rcnn", 3, "swin_t", "e3va", detector_options=SMALL_IMAGES,
                           depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))
    return model.eval(), val


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


def test_an_image_predicted_by_two_shards_is_refused(detector_and_split):
    model, val = detector_and_split
    state = predict_dataset(model, val, indices=[0, 1]).get_state()
    with pytest.raises(ValueError, match="predicted by two shards"):
        evaluate_shards(val, [state, state])
