"""Detection metrics (COCO AP for boxes and masks) on top of pycocotools."""

from detectors.evaluation.coco_eval import METRIC_NAMES, CocoEvaluator, summarize_table

__all__ = ["METRIC_NAMES", "CocoEvaluator", "summarize_table"]
