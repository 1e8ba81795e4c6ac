"""NORM-TUNING: train only the LayerNorms (weight and bias).

The output norms before the FPN count as norms too: the published counts (0.06M on Swin-B,
0.09M on Swin-L) come out only with them (0.059M / 0.089M; without them 0.056M / 0.083M).
"""
from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.tuning.base import TUNING_METHODS, TuningMethod, freeze, unfreeze


@TUNING_METHODS.register("norm")
class NormMethod(TuningMethod):
    def apply(self, backbone: SwinBackbone) -> nn.Module:
        freeze(backbone)
        for module in backbone.modules():
            if isinstance(module, nn.LayerNorm):
                unfreeze(module)
        return backbone
