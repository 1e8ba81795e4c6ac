"""Mona (Yin, Hu et al., CVPR 2025, "5%>100%"): a multi-cognitive visual adapter behind the MSA and
the MLP of every block, as in the authors' Swin code (Leiyi-Hu/mona, ``swin_transformer_mona.py``).

For an input y (B, H, W, C) of the residual stream, with a ``dim``-wide bottleneck:

    y' = LN(y) * gamma + y * gammax                 (gamma starts at 1e-6, gammax at 1, per channel)
    p  = project1(y')                               (C -> dim), to NCHW
    q  = (dw3x3(p) + dw5x5(p) + dw7x7(p)) / 3 + p   (depthwise, with biases)
    q  = q + conv1x1(q)                             (back to tokens)
    Mona(y) = y + project2(Dropout(GELU(q)))        (dim -> C)

Where it sits. The reference applies Mona to the residual stream *after* each residual add:
``x = Mona1(x + MSA(LN1(x)))``, then ``x = Mona2(x + MLP(LN2(x)))``. That is not a serial adapter
on the branch output (``out + f(out)``, Houlsby): Mona sees x + out. A branch-tuner slot gets
(branch input x, branch output out) and the block adds x to what it returns, so the slot returns
``out + g(x + out)`` with g(y) = Mona(y) - y; the block's x + that is Mona(x + out), the
reference's value (up to the order of one float addition). The slot's x is the (B, H, W, C) map
itself, so the depthwise convolutions need no extra (H, W) argument and the Swin block no change.
Drop path acts on the branch output before Mona, as in the reference.

Parameters keep the reference's names below each slot (``attn_tuner`` = ``my_module_1``,
``mlp_tuner`` = ``my_module_2``): ``norm``, ``gamma``, ``gammax``, ``project1``,
``adapter_conv.{conv1,conv2,conv3,projector}``, ``project2``.

Initialisation. ``zero_up`` (the default) starts project2 at zero, so the tuned backbone computes
exactly the frozen one at step 0 (the project's rule). ``reference`` is what the authors' runs
start from: their backbone's ``init_weights`` (called by mmdet for every detector) applies
truncated-normal(std 0.02) weights and zero biases to every Linear of the backbone, Mona's
project1 and project2 included; the convolutions keep PyTorch's default init. Both leave project1
at that truncated normal. With ``reference`` the step-0 features differ from the frozen backbone's.

Trainable: every Mona parameter; nothing else (the output norms stay frozen, as in the reference,
which trains only ``my_module`` parameters). Per Mona, on C channels with bottleneck d:
4C (LN weight and bias, gamma, gammax) + (Cd + d) + (83d + 3d) + (d^2 + d) + (dC + C)
= (2d + 5) C + d^2 + 88 d; at d = 64, 133 C + 9728, two per block. Swin-T 1,408,128;
Swin-S 2,867,328; Swin-B 3,667,456 (3.67M); Swin-L 5,267,712, exactly the count the authors'
own VOC Swin-L training log prints (``trained_backbone_num:5267712``). The paper's figure for
COCO Swin-B is 4.16M: 13% above the code's count, and neither reading of the four output norms
(3,840 numbers on Swin-B) closes that gap; this project follows the code.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.errors import UserInputError
from detectors.tuning.base import TUNING_METHODS, MethodConfig, TuningMethod, positive
from detectors.tuning.layers import inject_branch_tuners

INITS = ("zero_up", "reference")


@dataclasses.dataclass(frozen=True)
class MonaConfig(MethodConfig):
    dim: int = dataclasses.field(default=64, metadata={"help": "middle (bottleneck) dimension"})
    dropout: float = dataclasses.field(default=0.1, metadata={"help": "dropout before the up projection"})
    init: str = dataclasses.field(default="zero_up", metadata={
        "help": "zero_up: the up projection (project2) starts at zero, so training starts exactly on the "
                "backbone; reference: project2 truncated-normal(0.02) as the authors' runs start"})

    def check(self) -> None:
        positive("mona", dim=self.dim)
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"hyperparameter dropout={self.dropout} for method mona must be in [0, 1)")
        if self.init not in INITS:
            raise UserInputError(f"hyperparameter init={self.init!r} for method mona must be one of {', '.join(INITS)}")


class MonaOp(nn.Module):
    """The multi-cognitive filters on an NCHW map: (dw3x3 + dw5x5 + dw7x7) / 3 + identity, then + 1x1."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.projector = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (self.conv1(x) + self.conv2(x) + self.conv3(x)) / 3.0 + x
        return x + self.projector(x)


class MonaTuner(nn.Module):
    """Mona on the residual stream behind a branch: returns out + g(x + out), g(y) = Mona(y) - y."""

    def __init__(self, dim: int, hidden: int = 64, dropout: float = 0.1, init: str = "zero_up"):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(dim))
        self.project1 = nn.Linear(dim, hidden)
        self.adapter_conv = MonaOp(hidden)
        self.dropout = nn.Dropout(dropout)
        self.project2 = nn.Linear(hidden, dim)
        for linear in (self.project1, self.project2):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        if init == "zero_up":
            nn.init.zeros_(self.project2.weight)

    def delta(self, y: torch.Tensor) -> torch.Tensor:
        """g(y) = Mona(y) - y for a (B, H, W, C) map."""
        y = self.norm(y) * self.gamma + y * self.gammax
        p = self.project1(y).permute(0, 3, 1, 2)
        q = self.adapter_conv(p).permute(0, 2, 3, 1)
        return self.project2(self.dropout(F.gelu(q)))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self.delta(x + out)


@TUNING_METHODS.register("mona")
class MonaMethod(TuningMethod):
    Config = MonaConfig

    def apply(self, backbone: SwinBackbone) -> nn.Module:
        cfg = self.cfg
        return inject_branch_tuners(backbone, lambda c: MonaTuner(c, cfg.dim, cfg.dropout, cfg.init))
