"""The synthetic dataset must be reproducible, valid COCO, and cover what real data has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from detectors.data import make_synthetic_coco
from detectors.errors import UserInputError


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    make_synthetic_coco(tmp_path / "a", num_train=4, num_val=2, seed=3)
    make_synthetic_coco(tmp_path / "b", num_train=4, num_val=2, seed=3)
    make_synthetic_coco(tmp_path / "c", num_train=4, num_val=2, seed=4)
    a, b, c = (_snapshot(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    assert a["train/000001.png"] != c["train/000001.png"]


def test_writes_valid_coco_with_polygons_rle_and_all_sizes(tmp_path):
    paths = make_synthetic_coco(tmp_path, num_train=12, num_val=3)
    assert paths["class_names"] == ["square", "circle", "triangle"]
    coco = COCO(paths["train_json"])
    assert len(coco.imgs) == 12 and len(COCO(paths["val_json"]).imgs) == 3
    assert sorted(coco.cats) == [1, 2, 3]
    anns = list(coco.anns.values())
    assert {type(a["segmentation"]) for a in anns} == {list, dict}
    assert {a["category_id"] for a in anns} == {1, 2, 3}
    buckets = {"small" if a["area"] < 32**2 else "medium" if a["area"] < 96**2 else "large"
               for a in anns}
    assert buckets == {"small", "medium", "large"}
    for image_id, image_anns in coco.imgToAnns.items():
        assert 1 <= len(image_anns) <= 4
    for ann in anns:
        mask = coco.annToMask(ann)
        assert mask.sum() == ann["area"] and ann["iscrowd"] == 0
        x, y, w, h = ann["bbox"]
        ys, xs = mask.nonzero()
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
    for image in coco.imgs.values():
        assert (Path(paths["train_images"]) / image["file_name"]).is_file()


def test_reuses_existing_dataset_and_regenerates_on_new_parameters(tmp_path):
    paths = make_synthetic_coco(tmp_path, num_train=3, num_val=2)
    train_json = Path(paths["train_json"])
    mtime = train_json.stat().st_mtime_ns
    assert make_synthetic_coco(tmp_path, num_train=3, num_val=2) == paths
    assert train_json.stat().st_mtime_ns == mtime
    make_synthetic_coco(tmp_path, num_train=2, num_val=2)
    assert len(json.loads(train_json.read_text())["images"]) == 2
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000001.png", "000002.png"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_interrupted_run_without_manifest_is_redone(tmp_path):
    paths = make_synthetic_coco(tmp_path, num_train=2, num_val=1)
    (tmp_path / "manifest.json").unlink()
    Path(paths["val_json"]).write_text("{half")
    make_synthetic_coco(tmp_path, num_train=2, num_val=1)
    assert len(json.loads(Path(paths["val_json"]).read_text())["images"]) == 1
    (tmp_path / "val" / "000001.png").unlink()  # a deleted image is noticed despite the manifest
    make_synthetic_coco(tmp_path, num_train=2, num_val=1)
    assert (tmp_path / "val" / "000001.png").is_file()


@pytest.mark.parametrize("kwargs, field", [
    ({"num_classes": 9}, "num_classes"),
    ({"num_train": 0}, "num_train"),
    ({"image_size": (16, 320)}, "image_size"),
])
def test_bad_parameters_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(UserInputError, match=field):
        make_synthetic_coco(tmp_path, **kwargs)


def test_shifted_objects_are_speckled_greys_whose_look_does_not_tell_the_class(tmp_path):
    """The transfer benchmark's shifted downstream: no saturated colour (the upstream's colour families),
    dark and light greys in every class, so only the shape tells the class."""
    import numpy as np
    from PIL import Image
    paths = make_synthetic_coco(tmp_path, num_train=24, num_val=1, image_size=(128, 160), num_classes=3,
                                colours="shifted")
    coco = COCO(paths["train_json"])
    levels: dict[int, list[float]] = {}
    for annotation in coco.loadAnns(coco.getAnnIds()):
        image = coco.loadImgs(annotation["image_id"])[0]
        pixels = np.asarray(Image.open(Path(paths["train_images"]) / image["file_name"]), dtype=np.float32)
        inside = pixels[coco.annToMask(annotation).astype(bool)]
        assert np.ptp(inside.mean(0)) < 20, "tinted, not grey"
        assert inside.std(0).mean() > 15, "no speckle"
        levels.setdefault(annotation["category_id"], []).append(float(inside.mean()))
    assert set(levels) == {1, 2, 3}
    for category, means in levels.items():
        assert min(means) < 90 and max(means) > 170, (category, means)
