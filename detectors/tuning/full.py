"""FULL: fine-tune every backbone parameter, the output norms included."""
from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.tuning.base import TUNING_METHODS, TuningMethod, unfreeze


@TUNING_METHODS.register("full")
class FullMethod(TuningMethod):
    def apply(self, backbone: SwinBackbone) -> nn.Module:
        unfreeze(backbone)
        return backbone
