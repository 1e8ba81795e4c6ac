"""CocoDetection: tensors in the shapes the models take, and clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectors.data import CocoDetection, collate_fn, make_synthetic_coco
from detectors.errors import UserInputError


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=4, num_val=2)


def test_items_have_expected_shapes_dtypes_and_consistent_masks(synthetic):
    dataset = CocoDetection(synthetic["train_images"], synthetic["train_json"])
    dataset.check_files()
    assert len(dataset) == 4 and dataset.has_masks and dataset.num_classes == 3
    assert dataset.label_to_cat_id == {1: 1, 2: 2, 3: 3}
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 256, 320)
    assert 0.0 <= image.min() and image.max() <= 1.0
    n = len(target["labels"])
    assert n >= 1 and target["labels"].dtype == torch.int64
    assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
    assert target["masks"].shape == (n, 256, 320) and target["masks"].dtype == torch.uint8
    assert target["image_id"] == dataset.ids[0] and target["orig_size"] == (256, 320)
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        found = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert torch.equal(torch.stack(found).float(), box)
        # The object is painted in its class colour, so the image agrees with the mask.
        assert image[:, ys, xs].std(dim=1).max() < 1e-6
    images, targets = collate_fn([dataset[0], dataset[1]])
    assert len(images) == 2 and targets[1]["image_id"] == dataset.ids[1]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _tiny(tmp_path: Path) -> tuple[Path, dict]:
    """One 20x30 image; categories 5 and 9 (non-contiguous), a crowd and a degenerate box."""
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    data = {
        "images": [{"id": 7, "file_name": "a.png", "height": 20, "width": 30}],
        "categories": [{"id": 9, "name": "dog"}, {"id": 5, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [2, 3, 4, 5], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [1, 1, 8, 8], "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [5, 5, 0, 3], "iscrowd": 0},
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [25, 15, 10, 10], "iscrowd": 0},
        ],
    }
    return tmp_path, data


def test_contiguous_labels_skip_crowd_and_degenerate_boxes(tmp_path):
    root, data = _tiny(tmp_path)
    dataset = CocoDetection(root, _write(root, data))
    assert dataset.cat_ids == [5, 9] and dataset.label_to_cat_id == {1: 5, 2: 9}
    assert dataset.class_names == ["cat", "dog"] and not dataset.has_masks
    _, target = dataset[0]
    assert target["labels"].tolist() == [2, 1]
    assert target["boxes"].tolist() == [[2, 3, 6, 8], [25, 15, 30, 20]]  # second clipped
    assert "masks" not in target and target["image_id"] == 7


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(UserInputError, match="annotation file not found: .*nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_invalid_json_is_named(tmp_path):
    (tmp_path / "ann.json").write_text("{not json")
    with pytest.raises(UserInputError, match=r"ann\.json: not valid JSON"):
        CocoDetection(tmp_path, tmp_path / "ann.json")


def test_missing_coco_key_is_named(tmp_path):
    root, data = _tiny(tmp_path)
    del data["categories"]
    with pytest.raises(UserInputError, match=r"ann\.json: .*missing key 'categories'"):
        CocoDetection(root, _write(root, data))


def test_missing_image_dir_is_named(tmp_path):
    root, data = _tiny(tmp_path)
    with pytest.raises(UserInputError, match="image directory not found: .*nodir"):
        CocoDetection(root / "nodir", _write(root, data))


def test_unknown_category_names_annotation_and_category(tmp_path):
    root, data = _tiny(tmp_path)
    data["annotations"][2]["category_id"] = 42
    with pytest.raises(UserInputError, match=r"ann\.json: annotation id 3 has category_id 42"):
        CocoDetection(root, _write(root, data))


def test_missing_image_file_is_named_lazily_and_by_check_files(tmp_path):
    root, data = _tiny(tmp_path)
    data["images"][0]["file_name"] = "gone.png"
    dataset = CocoDetection(root, _write(root, data))
    with pytest.raises(UserInputError, match=r"image file not found: .*gone\.png"):
        dataset.check_files()
    with pytest.raises(UserInputError, match=r"image file not found: .*gone\.png"):
        dataset[0]


def test_image_size_disagreeing_with_json_is_named(tmp_path):
    root, data = _tiny(tmp_path)
    data["images"][0]["width"] = 31
    with pytest.raises(UserInputError, match=r"a\.png: image is 30x20 but .*says 31x20"):
        CocoDetection(root, _write(root, data))[0]
