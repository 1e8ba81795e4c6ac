"""ADAPTER (Houlsby et al.): a bottleneck x + U(GELU(D(x))) behind the MSA and the MLP of every block."""
import dataclasses

from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.tuning.base import TUNING_METHODS, MethodConfig, TuningMethod, positive
from detectors.tuning.layers import Bottleneck, SerialTuner, inject_branch_tuners


@dataclasses.dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    dim: int = dataclasses.field(default=64, metadata={"help": "middle (bottleneck) dimension"})

    def check(self) -> None:
        positive("adapter", dim=self.dim)


@TUNING_METHODS.register("adapter")
class AdapterMethod(TuningMethod):
    Config = AdapterConfig

    def apply(self, backbone: SwinBackbone) -> nn.Module:
        return inject_branch_tuners(backbone, lambda c: SerialTuner(Bottleneck(c, self.cfg.dim, nn.GELU)))
