"""Semantic segmentation on the tuned Swin: UPerNet, ADE20K-layout data and the recipe's pipeline, and
the dataset-level mIoU, mAcc and aAcc."""
from detectors.segmentation.data import SegmentationFolder, make_synthetic_segmentation
from detectors.segmentation.metrics import ConfusionMatrix
from detectors.segmentation.transforms import EvalTransform, TrainTransform
from detectors.segmentation.upernet import IGNORE_INDEX, UPerNet

__all__ = ["ConfusionMatrix", "EvalTransform", "IGNORE_INDEX", "SegmentationFolder", "TrainTransform", "UPerNet",
           "make_synthetic_segmentation"]
