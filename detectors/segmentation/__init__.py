"""Semantic segmentation on the tuned Swin: UPerNet and the dataset-level mIoU, mAcc and aAcc."""
from detectors.segmentation.metrics import ConfusionMatrix
from detectors.segmentation.upernet import IGNORE_INDEX, UPerNet

__all__ = ["ConfusionMatrix", "IGNORE_INDEX", "UPerNet"]
