"""BITFIT (Zaken et al.): train only the biases.

"Bias" means every additive bias in the backbone: linear and LayerNorm biases and the relative
position bias tables, the output norms' biases included (their names match, as they do in the
papers' name-based selection).
"""
from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.tuning.base import TUNING_METHODS, TuningMethod


@TUNING_METHODS.register("bitfit")
class BitFitMethod(TuningMethod):
    def apply(self, backbone: SwinBackbone) -> nn.Module:
        for name, p in backbone.named_parameters():
            p.requires_grad_(name.endswith(("bias", "relative_position_bias_table")))
        return backbone
