"""LoRA (Hu et al.) as the E3VA paper runs it: a low-rank pair B(A(x)) parallel to the MSA and to
the MLP of every block ("two low-rank linear layers"), reading the branch input; B starts at zero."""
import dataclasses

from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.tuning.base import TUNING_METHODS, MethodConfig, TuningMethod, positive
from detectors.tuning.layers import Bottleneck, ParallelTuner, inject_branch_tuners


@dataclasses.dataclass(frozen=True)
class LoraConfig(MethodConfig):
    dim: int = dataclasses.field(default=64, metadata={"help": "rank of the pair (middle dimension)"})
    alpha: float = dataclasses.field(default=64.0, metadata={"help": "output scale is alpha / dim"})

    def check(self) -> None:
        positive("lora", dim=self.dim, alpha=self.alpha)


@TUNING_METHODS.register("lora")
class LoraMethod(TuningMethod):
    Config = LoraConfig

    def apply(self, backbone: SwinBackbone) -> nn.Module:
        scale = self.cfg.alpha / self.cfg.dim
        return inject_branch_tuners(
            backbone, lambda c: ParallelTuner(Bottleneck(c, self.cfg.dim, nn.Identity, bias=False), scale))
