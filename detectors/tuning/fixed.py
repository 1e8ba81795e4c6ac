"""FIXED: the backbone is frozen; only the neck and the heads (outside it) train."""
from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.tuning.base import TUNING_METHODS, TuningMethod, freeze


@TUNING_METHODS.register("fixed")
class FixedMethod(TuningMethod):
    def apply(self, backbone: SwinBackbone) -> nn.Module:
        freeze(backbone)
        return backbone
