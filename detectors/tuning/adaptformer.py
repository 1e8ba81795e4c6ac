"""ADAPTFORMER (Chen et al.): a scaled ReLU bottleneck beside the MSA and the MLP of every block.

As in AdaptFormer's code, the adapter reads the block's residual stream (the branch input, before
the branch's LayerNorm) and its output is scaled by a fixed factor (0.1) before it is added.
"""
import dataclasses

from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.tuning.base import TUNING_METHODS, MethodConfig, TuningMethod, positive
from detectors.tuning.layers import Bottleneck, ParallelTuner, inject_branch_tuners


@dataclasses.dataclass(frozen=True)
class AdaptFormerConfig(MethodConfig):
    dim: int = dataclasses.field(default=64, metadata={"help": "middle (bottleneck) dimension"})
    scale: float = dataclasses.field(default=0.1, metadata={"help": "factor on the adapter output"})

    def check(self) -> None:
        positive("adaptformer", dim=self.dim)


@TUNING_METHODS.register("adaptformer")
class AdaptFormerMethod(TuningMethod):
    Config = AdaptFormerConfig

    def apply(self, backbone: SwinBackbone) -> nn.Module:
        return inject_branch_tuners(
            backbone, lambda c: ParallelTuner(Bottleneck(c, self.cfg.dim, nn.ReLU), self.cfg.scale))
