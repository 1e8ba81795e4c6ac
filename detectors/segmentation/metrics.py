"""mIoU, mAcc and aAcc over a whole split, from one confusion matrix.

The dataset-level figures are not an average of per-batch scores: every prediction adds its pixels to
a (K, K) confusion matrix (torchmetrics counts them), matrices from several ranks add up, and the
scores come from the sum once. Pixels labelled ``ignore_index`` count nowhere.
"""
from __future__ import annotations

import torch

from detectors.segmentation.upernet import IGNORE_INDEX


class ConfusionMatrix:
    """Rows: the true class; columns: the predicted class."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """Class ids (..., H, W) against labels of the same shape."""
        from torchmetrics.functional.classification import multiclass_confusion_matrix
        if predicted.shape != target.shape:
            raise ValueError(f"prediction {tuple(predicted.shape)} and labels {tuple(target.shape)} differ in shape")
        self.matrix += multiclass_confusion_matrix(predicted.reshape(-1).cpu(), target.reshape(-1).cpu(),
                                                   self.num_classes, ignore_index=self.ignore_index,
                                                   validate_args=False).to(torch.int64)

    def merge(self, others) -> "ConfusionMatrix":
        """This matrix plus the others' (e.g. every rank's, gathered)."""
        for other in others:
            self.matrix += other.matrix if isinstance(other, ConfusionMatrix) else torch.as_tensor(other)
        return self

    def scores(self, class_names=None) -> dict[str, float]:
        """``mIoU``, ``mAcc``, ``aAcc`` (percent) and ``IoU/<class>``; classes absent from both the labels
        and the predictions have no IoU and are left out of the means (as mmsegmentation does)."""
        m = self.matrix.to(torch.float64)
        true_positive, labelled, predicted = m.diag(), m.sum(1), m.sum(0)
        union = labelled + predicted - true_positive
        present = union > 0
        iou = true_positive / union.clamp(min=1)
        accuracy = true_positive / labelled.clamp(min=1)
        names = class_names or [str(i) for i in range(self.num_classes)]
        out = {"mIoU": 100 * float(iou[present].mean()) if present.any() else 0.0,
               "mAcc": 100 * float(accuracy[labelled > 0].mean()) if (labelled > 0).any() else 0.0,
               "aAcc": 100 * float(true_positive.sum() / labelled.sum().clamp(min=1))}
        out.update({f"IoU/{name}": 100 * float(iou[i]) for i, name in enumerate(names) if present[i]})
        return out
