"""Dataset-level mIoU, mAcc and aAcc from one confusion matrix, as ADE20K is scored."""
import pytest
import torch

from detectors.segmentation import IGNORE_INDEX, ConfusionMatrix


def test_the_ground_truth_as_prediction_scores_100():
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[0, :4] = IGNORE_INDEX
    matrix = ConfusionMatrix(5)
    matrix.update(labels.clone(), labels)
    scores = matrix.scores()
    assert scores["mIoU"] == scores["mAcc"] == scores["aAcc"] == 100.0


def test_a_hand_made_three_class_example_gives_the_exact_figures():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, IGNORE_INDEX])
    predicted = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1])  # the ignored pixel's guess counts nowhere
    matrix = ConfusionMatrix(3)
    matrix.update(predicted, target)
    assert matrix.matrix.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    scores = matrix.scores(["a", "b", "c"])
    # IoU = TP / (labelled + predicted - TP): 2/4, 1/3, 2/4; accuracy = TP / labelled: 2/3, 1/2, 2/3
    assert scores["mIoU"] == pytest.approx(100 * (0.5 + 1 / 3 + 0.5) / 3)
    assert scores["mAcc"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert scores["aAcc"] == pytest.approx(100 * 5 / 8)
    assert scores["IoU/b"] == pytest.approx(100 / 3)


def test_matrices_of_shards_add_up_to_the_whole_splits():
    """Two ranks' matrices, merged, score exactly what one process scores on the union: the figures are
    the dataset's, not a mean of per-batch (or per-rank) scores."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (6, 8, 8), generator=generator)
    predicted = torch.where(torch.rand(6, 8, 8, generator=generator) < 0.7, target,
                            torch.randint(0, 4, (6, 8, 8), generator=generator))
    whole, first, second = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    whole.update(predicted, target)
    first.update(predicted[:1], target[:1])
    second.update(predicted[1:], target[1:])
    assert first.merge([second]).scores() == whole.scores()
    per_batch = (first.scores()["mIoU"] + second.scores()["mIoU"]) / 2
    assert per_batch != pytest.approx(whole.scores()["mIoU"])


def test_classes_never_seen_nor_predicted_are_left_out_of_the_means():
    matrix = ConfusionMatrix(4)
    matrix.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert matrix.scores()["mIoU"] == 100.0 and "IoU/3" not in matrix.scores()
