"""LoRand (Yin et al., "1% VS 100%"): adapters x + U(GELU(D(x))) behind the MSA and the MLP of every
block, whose projections are low-rank syntheses W = sum_i P_i^T K_i Q_i over ``branches`` branches
with a ``kernel`` x ``kernel`` matrix K_i shared by the down and the up projection of one adapter.

The middle dimension is twice the input (C -> 2C -> C): with it all seven published counts
(Swin-T/S/B/L) come out within 2%. Products are applied factor by factor; the C x 2C matrices are
never formed. P of the up projection starts at zero, so the adapter starts as the identity while
K, shared with the random down projection, still receives gradient.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.tuning.base import TUNING_METHODS, MethodConfig, TuningMethod, positive
from detectors.tuning.layers import SerialTuner, inject_branch_tuners


@dataclasses.dataclass(frozen=True)
class LoRandConfig(MethodConfig):
    branches: int = dataclasses.field(default=2, metadata={"help": "alpha: number of low-rank branches"})
    kernel: int = dataclasses.field(default=8, metadata={"help": "beta: size of each branch's kernel K"})
    hidden_ratio: float = dataclasses.field(default=2.0, metadata={"help": "middle dimension / input dimension"})

    def check(self) -> None:
        positive("lorand", branches=self.branches, kernel=self.kernel, hidden_ratio=self.hidden_ratio)


class LoRandBottleneck(nn.Module):
    """U(GELU(D(x))) with D: m -> n and U: n -> m synthesised from shared-kernel low-rank branches."""

    def __init__(self, dim: int, hidden: int, branches: int, kernel: int):
        super().__init__()
        self.branches, self.kernel = branches, kernel
        rows = branches * kernel
        self.kernels = nn.Parameter(torch.empty(branches, kernel, kernel))  # K_i, shared by D and U
        self.down_p = nn.Parameter(torch.empty(rows, dim))        # P_i^D stacked: beta x m each
        self.down_q = nn.Parameter(torch.empty(rows, hidden))     # Q_i^D stacked: beta x n each
        self.down_bias = nn.Parameter(torch.zeros(hidden))
        self.up_p = nn.Parameter(torch.zeros(rows, dim))          # P_i^U: zero, so U starts at zero
        self.up_q = nn.Parameter(torch.empty(rows, hidden))       # Q_i^U
        self.up_bias = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.kernels, std=1 / math.sqrt(kernel))
        for factor in (self.down_p, self.down_q, self.up_q):
            nn.init.normal_(factor, std=1 / math.sqrt(factor.shape[1]))

    def _through_kernels(self, z: torch.Tensor, transpose: bool) -> torch.Tensor:
        z = z.unflatten(-1, (self.branches, self.kernel))
        pattern = "...ab,acb->...ac" if transpose else "...ab,abc->...ac"
        return torch.einsum(pattern, z, self.kernels).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # D: x W^D with W^D = sum_i P_i^T K_i Q_i  (m x n)
        h = self._through_kernels(x @ self.down_p.T, transpose=False) @ self.down_q + self.down_bias
        h = nn.functional.gelu(h)
        # U: h (W^U)^T with W^U = sum_i P_i^T K_i Q_i  (m x n), i.e. h Q_i^T K_i^T P_i
        return self._through_kernels(h @ self.up_q.T, transpose=True) @ self.up_p + self.up_bias


@TUNING_METHODS.register("lorand")
class LoRandMethod(TuningMethod):
    Config = LoRandConfig
    variants = {"lorand+": {"branches": 4, "kernel": 8}, "lorand++": {"branches": 4, "kernel": 16}}

    def apply(self, backbone: SwinBackbone) -> nn.Module:
        cfg = self.cfg
        return inject_branch_tuners(backbone, lambda c: SerialTuner(
            LoRandBottleneck(c, int(c * cfg.hidden_ratio), cfg.branches, cfg.kernel)))
