"""PARTIAL-k: train the last k Swin blocks, freeze the rest (the papers use k = 1)."""
import dataclasses

from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.tuning.base import TUNING_METHODS, MethodConfig, TuningMethod, freeze, iter_blocks, positive, unfreeze


@dataclasses.dataclass(frozen=True)
class PartialConfig(MethodConfig):
    blocks: int = dataclasses.field(default=1, metadata={"help": "how many of the last blocks train"})

    def check(self) -> None:
        positive("partial-1", blocks=self.blocks)


@TUNING_METHODS.register("partial-1")
class PartialMethod(TuningMethod):
    Config = PartialConfig

    def apply(self, backbone: SwinBackbone) -> nn.Module:
        freeze(backbone)
        for block in list(iter_blocks(backbone))[-self.cfg.blocks:]:
            unfreeze(block)
        return backbone
