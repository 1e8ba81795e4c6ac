"""E3VA (Yin et al., "Parameter-efficient is not sufficient"): a gradient highway of dual low-rank
adapters beside the frozen backbone; see ``detectors/highway.py`` for the exact equations.

Trainable: the highway adapters and the four output norms before the FPN. Frozen: the whole
backbone, including the patch-merging layers the highway inherits.
"""
import dataclasses

from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.errors import UserInputError
from detectors.highway import INITS, HighwayBackbone
from detectors.tuning.base import TUNING_METHODS, MethodConfig, TuningMethod, freeze, positive, unfreeze


@dataclasses.dataclass(frozen=True)
class E3vaConfig(MethodConfig):
    rank: int = dataclasses.field(default=8, metadata={"help": "alpha: rank of each low-rank branch"})
    init: str = dataclasses.field(default="linear", metadata={
        "help": "linear: each factor as nn.Linear initialises it (the authors' low-rank code; starts next to "
                "the backbone); kaiming: Kaiming-normal factors (the paper's words, read literally); "
                "zero_up: linear with the up projections at zero (starts exactly on the backbone)"})
    recompute: bool = dataclasses.field(default=False, metadata={
        "help": "keep each stage's input instead of the frozen branch outputs and run the frozen blocks again "
                "in backward: the same gradients, near FIXED's memory, one more frozen forward per step"})

    def check(self) -> None:
        positive("e3va", rank=self.rank)
        if self.init not in INITS:
            raise UserInputError(f"hyperparameter init={self.init!r} for method e3va must be one of {', '.join(INITS)}")


@TUNING_METHODS.register("e3va")
class E3vaMethod(TuningMethod):
    Config = E3vaConfig
    variants = {"e3va+": {"rank": 16}, "e3va++": {"rank": 32}, "e3va-recompute": {"recompute": True}}
    memory_options = {"recompute": True}

    def apply(self, backbone: SwinBackbone) -> nn.Module:
        freeze(backbone)
        for norm in backbone.output_norms:
            unfreeze(norm)
        return HighwayBackbone(backbone, rank=self.cfg.rank, init=self.cfg.init, recompute=self.cfg.recompute)
