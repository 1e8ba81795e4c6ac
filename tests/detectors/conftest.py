"""Fixtures shared by the pure-PyTorch tests."""
from __future__ import annotations

import pytest
from torch import nn


class _InsideBackbone:
    """Counts tensors autograd saves while the frozen backbone's own code is running."""

    def __init__(self, backbone: nn.Module, monkeypatch):
        self.depth = 0
        self.inside = 0
        self.outside = 0
        output_norms = set(backbone.output_norms)
        for module in backbone.modules():
            if module is backbone or module in output_norms:
                continue
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leave)
        # The highway calls the blocks' branches and the embedding directly, not block.forward.
        for stage in backbone.layers:
            for block in stage.blocks:
                for method in ("attention_branch", "mlp_branch"):
                    monkeypatch.setattr(block, method, self._wrap(getattr(block, method)))
        monkeypatch.setattr(backbone, "embed", self._wrap(backbone.embed))

    def _enter(self, *args):
        self.depth += 1

    def _leave(self, *args):
        self.depth -= 1

    def _wrap(self, fn):
        def wrapped(*args, **kwargs):
            self._enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._leave()
        return wrapped

    def pack(self, tensor):
        if self.depth:
            self.inside += 1
        else:
            self.outside += 1
        return tensor


@pytest.fixture
def inside_backbone(monkeypatch):
    """``probe = inside_backbone(swin)``; run under ``torch.autograd.graph.saved_tensors_hooks(probe.pack, ...)``,
    then ``probe.inside`` counts the tensors saved for backward while the backbone's own code ran."""
    return lambda backbone: _InsideBackbone(backbone, monkeypatch)
