"""Small modules shared by the in-backbone tuning methods.

A *branch tuner* fills one of a SwinBlock's two slots: it sees the branch input ``x`` and the
branch output ``out`` (attention or MLP) and returns the new branch output.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from detectors.backbones.swin import SwinBackbone
from detectors.tuning.base import freeze, iter_blocks


class Bottleneck(nn.Module):
    """U(act(D(x))): D maps dim -> hidden, U maps back; U starts at zero, so the tuned block
    starts as the pre-trained one."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(dim, hidden, bias=bias)
        self.act = act()
        self.up = nn.Linear(hidden, dim, bias=bias)
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class SerialTuner(nn.Module):
    """An adapter behind the branch: out + f(out) (Houlsby adapters, LoRand)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self.inner(out)


class ParallelTuner(nn.Module):
    """A module beside the branch, fed its input: out + scale * f(x) (LoRA, AdaptFormer)."""

    def __init__(self, inner: nn.Module, scale: float = 1.0):
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self.scale * self.inner(x)


def inject_branch_tuners(backbone: SwinBackbone, make_tuner: Callable[[int], nn.Module]) -> SwinBackbone:
    """Freeze the backbone, then put a fresh (trainable) tuner beside both branches of every block."""
    freeze(backbone)
    for block in iter_blocks(backbone):
        dim = block.norm1.normalized_shape[0]
        block.attn_tuner = make_tuner(dim)
        block.mlp_tuner = make_tuner(dim)
    return backbone
