"""Many trained tasks on one frozen backbone.

Every tuning method leaves the pre-trained weights as they were, so tasks trained from the same
weights can hold them once: ``share_backbone`` ties each task's frozen parameters to the first
task's. Where a method does not change the backbone's computation either - E3VA's highway only
reads the frozen blocks' branch outputs; FIXED trains nothing in the backbone - the frozen
computation on a batch is the same for every task, and it runs once: the first task computes it,
the others find it in a ``SharedFrozenPass`` (when their input batch is the same tensor values).
In-backbone methods (LoRA, adapters, LoRand, BitFit, ...) share the weights and run their own pass.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from detectors.backbones.swin import SwinBackbone


class SharedFrozenPass:
    """The frozen computation on the latest batch, for the next task that asks with the same batch."""

    def __init__(self) -> None:
        self.computed = 0  # how often the frozen computation actually ran
        self._images: torch.Tensor | None = None
        self._result: Any = None

    def __call__(self, images: torch.Tensor, compute: Callable[[torch.Tensor], Any]) -> Any:
        if not self._same_batch(images):
            self._result, self._images = None, None  # the previous batch's features go first
            self._result = compute(images)
            self._images = images.detach()
            self.computed += 1
        return self._result

    def _same_batch(self, images: torch.Tensor) -> bool:
        cached = self._images
        return (cached is not None and cached.shape == images.shape and cached.dtype == images.dtype
                and cached.device == images.device and bool(torch.equal(cached, images)))

    def clear(self) -> None:
        self._images = self._result = None


class SharedBackbone:
    """What ``share_backbone`` set up: one frozen pass per kind of shareable computation."""

    def __init__(self) -> None:
        self.passes: dict[str, SharedFrozenPass] = {}

    def pass_for(self, kind: str) -> SharedFrozenPass:
        return self.passes.setdefault(kind, SharedFrozenPass())

    @property
    def computed(self) -> int:
        return sum(shared.computed for shared in self.passes.values())

    def clear(self) -> None:
        for shared in self.passes.values():
            shared.clear()


def swin_inside(backbone: nn.Module) -> SwinBackbone:
    """The Swin with the pre-trained weights in a tuned backbone (itself, or a side network's frozen one)."""
    return backbone.pretrained_swin


def share_backbone(backbones: Sequence[nn.Module]) -> SharedBackbone:
    """Tie the frozen weights of every tuned backbone to the first one's, and let those whose frozen
    computation does not depend on the task run it once per batch for all of them.

    Each tuned backbone says what it may share (``shareable_pass``: a name for the kind of computation, or
    None); a method that adds a side network beside the frozen Swin says so on its own module.
    The caller checks that the tasks were trained from the same weights (their checkpoints'
    fingerprints). Parameters that train in a task stay that task's own.
    """
    shared = SharedBackbone()
    reference = dict(swin_inside(backbones[0]).named_parameters())
    for backbone in backbones:
        swin = swin_inside(backbone)
        if swin is not swin_inside(backbones[0]):
            _tie_frozen(swin, reference)
        kind = backbone.shareable_pass()
        if kind is not None:
            backbone.shared_pass = shared.pass_for(kind)
    return shared


def _tie_frozen(swin: SwinBackbone, reference: dict[str, nn.Parameter]) -> None:
    for name, param in list(swin.named_parameters()):
        theirs = reference.get(name)
        if param.requires_grad or theirs is None or theirs.requires_grad or theirs.shape != param.shape:
            continue
        if not torch.equal(param, theirs):
            raise ValueError(f"frozen weight {name} differs between the tasks: they were not trained on one backbone")
        owner, _, leaf = name.rpartition(".")
        swin.get_submodule(owner)._parameters[leaf] = theirs
