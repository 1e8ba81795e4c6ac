"""ADE20K-layout segmentation data: the synthetic set, label reduction, one-line errors, the recipe's pipeline."""
import numpy as np
import pytest
import torch
from PIL import Image

from detectors.errors import UserInputError
from detectors.segmentation import IGNORE_INDEX
from detectors.segmentation.data import SegmentationFolder, make_synthetic_segmentation, remember_check
from detectors.segmentation.transforms import EvalTransform, TrainTransform, rescale_size


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_segmentation(tmp_path_factory.mktemp("seg"), num_train=6, num_val=3, num_classes=3)


def test_the_synthetic_set_is_in_the_ade20k_layout_with_background_as_class_zero(synthetic):
    train = SegmentationFolder(synthetic["root"], "training", synthetic["class_names"])
    train.check_files()
    assert len(train) == 6 and synthetic["class_names"][0] == "background" and train.num_classes == 4
    image, labels = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 128, 160) and labels.shape == (128, 160)
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3} and (labels > 0).any() and (labels == 0).any()
    # the shapes are painted in their class colour: red squares (class 1) where the labels say so
    squares = labels == 1
    if squares.any():
        assert image[0][squares].float().mean() > 180 and image[2][squares].float().mean() < 100
    again = make_synthetic_segmentation(synthetic["root"], num_train=6, num_val=3, num_classes=3)
    assert again == synthetic


def write_ade(root, labels_by_name, split="training"):
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for name, labels in labels_by_name.items():
        Image.fromarray(np.zeros((*labels.shape, 3), np.uint8)).save(root / "images" / split / f"{name}.jpg")
        if labels is not None:
            Image.fromarray(labels.astype(np.uint8)).save(root / "annotations" / split / f"{name}.png")


def test_reduce_zero_label_ignores_other_and_shifts_the_classes(tmp_path):
    write_ade(tmp_path, {"ADE_1": np.array([[0, 1, 150, 255]] * 4)})
    labels = SegmentationFolder(tmp_path, "training", [str(i) for i in range(150)], reduce_zero_label=True)[0][1]
    assert labels[0].tolist() == [IGNORE_INDEX, 0, 149, IGNORE_INDEX]


def test_bad_folders_and_files_are_one_line_naming_them(tmp_path):
    write_ade(tmp_path / "a", {"ADE_1": np.zeros((4, 4))})
    (tmp_path / "a" / "annotations" / "training" / "ADE_1.png").unlink()
    with pytest.raises(UserInputError, match=r"ADE_1.jpg has no label file .*annotations/training/ADE_1.png"):
        SegmentationFolder(tmp_path / "a", "training", ["x"]).check_files()
    (tmp_path / "b" / "images" / "training").mkdir(parents=True)
    with pytest.raises(UserInputError, match=r"b/annotations/training is missing"):
        SegmentationFolder(tmp_path / "b", "training", ["x"]).check_files()
    write_ade(tmp_path / "c", {"ADE_2": np.array([[0, 3]] * 2)})
    with pytest.raises(UserInputError) as caught:
        SegmentationFolder(tmp_path / "c", "training", ["x", "y", "z"])[0]
    assert "ADE_2.png: label value 3 is not a class of this dataset (3 classes" in str(caught.value)
    assert "\n" not in str(caught.value)
    # found before training, by scanning every label file
    with pytest.raises(UserInputError, match=r"ADE_2.png: label value 3 is not a class of this dataset"):
        SegmentationFolder(tmp_path / "c", "training", ["x", "y", "z"]).check_files()
    SegmentationFolder(tmp_path / "c", "training", ["x", "y", "z", "w"]).check_files()
    write_ade(tmp_path / "d", {"ADE_3": np.array([[0, 150, 255]] * 2)})  # ADE20K: 0 ignored, 1-150 classes
    SegmentationFolder(tmp_path / "d", "training", [str(i) for i in range(150)], reduce_zero_label=True).check_files()
    write_ade(tmp_path / "e", {"ADE_4": np.array([[0, 151]] * 2)})
    with pytest.raises(UserInputError, match=r"ADE_4.png: label value 151 is not a class .*150 classes, 0 ignored"):
        SegmentationFolder(tmp_path / "e", "training", [str(i) for i in range(150)], reduce_zero_label=True).check_files()


def test_training_crops_are_the_crop_size_and_padding_is_ignored():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8)
    labels = torch.randint(0, 3, (60, 90))
    transform = TrainTransform(scale=(256, 64), crop=(64, 64), ratio_range=(0.5, 0.5))  # into 128x32: 32x48
    out_image, out_labels = transform(image, labels)
    assert out_image.shape == (3, 64, 64) and out_labels.shape == (64, 64) and out_image.dtype == torch.uint8
    padded = torch.ones(64, 64, dtype=torch.bool)
    padded[:32, :48] = False
    assert (out_labels[padded] == IGNORE_INDEX).all() and (out_image[:, padded] == 0).all()
    assert (out_labels[~padded] != IGNORE_INDEX).all()


def test_a_crop_avoids_one_class_covering_most_of_it_when_it_can():
    torch.manual_seed(0)
    labels = torch.zeros(100, 100, dtype=torch.long)
    labels[:, 80:] = 1  # a crop of the left part would be all class 0
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    transform = TrainTransform(scale=(100, 100), crop=(40, 40), ratio_range=(1.0, 1.0), flip=0)
    mixed = 0
    for _ in range(20):
        _, crop = transform(image, labels)
        mixed += bool((crop == 1).any())
    assert mixed >= 15  # a uniformly random crop contains class 1 only 2/7 of the time


def test_testing_resizes_into_the_scale_keeping_the_ratio():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(300, 2000, (2048, 512)) == (307, 2048)
    image, labels = EvalTransform((2048, 512))(torch.zeros(3, 256, 341, dtype=torch.uint8),
                                               torch.zeros(256, 341, dtype=torch.long))
    assert image.shape == (3, 512, 682) and labels.shape == (256, 341)


def test_two_shards_of_the_split_score_what_one_pass_over_it_scores(synthetic):
    """What two Ray Train workers do: each predicts every other image; the matrices add up."""
    from detectors.backbones import build_swin
    from detectors.segmentation import UPerNet
    from detectors.segmentation.evaluation import predict_split
    from detectors.training import evaluation_shard
    from detectors.tuning import build_tuning
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    backbone = build_tuning("e3va").apply(build_swin("swin_t", depths=(1, 1, 1, 1), embed_dim=32,
                                                     num_heads=(1, 2, 4, 8)))
    model = UPerNet(backbone, num_classes=4, channels=16, auxiliary_channels=8)
    val = SegmentationFolder(synthetic["root"], "validation", synthetic["class_names"],
                             transforms=EvalTransform((160, 128)))
    whole = predict_split(model, val).scores()
    shards = [predict_split(model, val, indices=evaluation_shard(len(val), rank, 2)) for rank in (0, 1)]
    assert shards[0].merge([shards[1]]).scores() == whole
    assert shards[0].matrix.sum() == 3 * 128 * 160  # every labelled pixel of the split, at its own size


def test_a_label_folder_that_passed_is_not_read_again_until_a_label_file_changes(tmp_path, monkeypatch):
    write_ade(tmp_path, {"ADE_1": np.array([[0, 1]] * 2), "ADE_2": np.array([[1, 2]] * 2)})
    cache, classes = tmp_path / "cache", ["x", "y", "z"]
    marker = SegmentationFolder(tmp_path, "training", classes).check_files(cache_dir=cache)
    assert not cache.exists()  # written by the caller, once everything it checks passed
    remember_check(marker)
    with monkeypatch.context() as patched:
        read = []
        patched.setattr(SegmentationFolder, "check_label_values", lambda self, index: read.append(index))
        assert SegmentationFolder(tmp_path, "training", classes).check_files(cache_dir=cache) is None
        assert read == []
        SegmentationFolder(tmp_path, "training", ["x", "y"]).check_files(cache_dir=cache)  # other classes: read
        assert sorted(read) == [0, 1]
    Image.fromarray(np.array([[3, 0]] * 2, np.uint8)).save(tmp_path / "annotations" / "training" / "ADE_2.png")
    with pytest.raises(UserInputError, match=r"ADE_2.png: label value 3 is not a class"):
        SegmentationFolder(tmp_path, "training", classes).check_files(cache_dir=cache)
