"""Training-memory planner: profile a few small steps, fit, extrapolate to the training size.

A method's training memory at batch B and image size H x W is

    static  = weights + gradients + AdamW state      (exact, from the parameters)
    dynamic = a * B * P_win + b * B * P + c * B      (fitted by least squares)

``P`` is the image's pixel count after padding to the backbone's size divisibility (what the stem,
the FPN and dense heads see). ``P_win`` is the same image seen by the Swin blocks: each stage pads
its feature map to a multiple of the attention window, so at stage s the block activations grow
with ``depth_s * channels_s * padded tokens_s``; ``P_win`` is that sum, scaled to pixel units so it
equals ``P`` where no stage pads. Small profiling sizes are padded far more, in proportion, than
the training size, which is why the window padding gets a term of its own. ``c`` is a per-image
constant: the RoI heads sample a fixed number of proposals per image, whatever its size.

What is fitted is what ``detectors.bench`` measures for the device at hand: on CUDA the peak of a
training step (``max_memory_allocated``, weights and optimizer state included), so ``dynamic`` is
that minus ``static``; on CPU the bytes autograd saves for backward (``saved_bytes``), so the
prediction of the bench's ``train_bytes`` is ``dynamic + gradients + AdamW state`` and the
predicted peak adds the weights. The prediction is fp32 (no AMP) and one process (no DDP buckets).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from detectors.backbones import SWIN_SPECS
from detectors.bench import measure_memory
from detectors.errors import UserInputError

PATCH = 4
SIZE_DIVISIBILITY = 32
PROFILE_FRACTIONS = (0.25, 0.375, 0.5)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One profiled step: the batch, the image size and the dynamic bytes measured."""
    batch: int
    size: tuple[int, int]
    dynamic_bytes: int


@dataclasses.dataclass
class MethodPlan:
    """A method's fitted memory model, for one backbone spec and detector, on one device kind."""
    method: str
    size: tuple[int, int]                # the training size predictions default to
    device: str
    weight_bytes: int
    grad_state_bytes: int
    coefficients: tuple[float, float, float]  # per B*P_win, per B*P, per image
    samples: list[Sample]
    window: int
    stage_weights: tuple[float, ...]

    @property
    def static_bytes(self) -> int:
        return self.weight_bytes + self.grad_state_bytes

    def features(self, batch: int, size: tuple[int, int]) -> tuple[float, float, float]:
        return _features(batch, size, self.window, self.stage_weights)

    def dynamic_bytes(self, batch: int, size: tuple[int, int] | None = None) -> float:
        x = self.features(batch, size or self.size)
        return max(sum(c * v for c, v in zip(self.coefficients, x)), 0.0)

    def train_bytes(self, batch: int, size: tuple[int, int] | None = None) -> int:
        """The bench's CPU training-memory figure: saved for backward + gradients + AdamW state."""
        return round(self.dynamic_bytes(batch, size) + self.grad_state_bytes)

    def peak_bytes(self, batch: int, size: tuple[int, int] | None = None) -> int:
        """Predicted peak memory of a training step: weights, gradients, optimizer state, activations."""
        return round(self.static_bytes + self.dynamic_bytes(batch, size))

    def fit_error(self) -> float:
        """Largest relative error of the fit on its own samples (of dynamic + static)."""
        return max(abs(self.dynamic_bytes(s.batch, s.size) - s.dynamic_bytes) / (self.static_bytes + s.dynamic_bytes)
                   for s in self.samples)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "static_bytes": self.static_bytes}


def padded(size: tuple[int, int], divisor: int = SIZE_DIVISIBILITY) -> tuple[int, int]:
    return tuple(math.ceil(v / divisor) * divisor for v in size)  # type: ignore[return-value]


def swin_stage_weights(backbone: str, overrides: dict | None = None) -> tuple[int, tuple[float, ...]]:
    """The attention window and, per stage, depth x channels: how its activations scale per token."""
    if backbone not in SWIN_SPECS:
        raise UserInputError(f"unknown backbone {backbone!r}; choose one of {', '.join(SWIN_SPECS)}")
    spec = {**SWIN_SPECS[backbone].__dict__, **(overrides or {})}
    depths, dim = list(spec["depths"]), int(spec["embed_dim"])
    return int(spec["window_size"]), tuple(float(d * dim * 2**i) for i, d in enumerate(depths))


def _features(batch: int, size: tuple[int, int], window: int, stage_weights: Sequence[float]) -> tuple[float, float, float]:
    height, width = padded(size)
    windowed, plain = 0.0, 0.0
    for i, weight in enumerate(stage_weights):
        stride = PATCH * 2**i
        h, w = math.ceil(height / stride), math.ceil(width / stride)
        windowed += weight * math.ceil(h / window) * window * math.ceil(w / window) * window * stride**2
        plain += weight * h * w * stride**2
    pixels = height * width
    return batch * pixels * windowed / plain, batch * pixels, float(batch)


def profile_sizes(size: tuple[int, int], fractions: Sequence[float] = PROFILE_FRACTIONS) -> list[tuple[int, int]]:
    """Small sizes of the training size's shape, multiples of 32 and at least 64, strictly growing."""
    out: list[tuple[int, int]] = []
    for f in fractions:
        h, w = (max(64, round(v * f / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY) for v in size)
        while out and (h <= out[-1][0] or w <= out[-1][1]):
            h, w = h + SIZE_DIVISIBILITY, w + SIZE_DIVISIBILITY
        out.append((h, w))
    return out


def profile_points(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, tuple[int, int]]]:
    """(batch, size) steps to profile: batch 1 at every size and batch 2 at the smallest."""
    if len(sizes) < 2:
        raise UserInputError("the planner needs at least 2 profiling sizes")
    return [(1, sizes[0]), (2, sizes[0]), *((1, s) for s in sizes[1:])]


def fit(samples: Sequence[Sample], window: int, stage_weights: Sequence[float]) -> tuple[float, float, float]:
    """Least squares of dynamic bytes on the three features (columns scaled, minimum-norm if rank-deficient)."""
    if len(samples) < 3:
        raise UserInputError(f"the planner needs at least 3 profiled steps, got {len(samples)}")
    x = torch.tensor([_features(s.batch, s.size, window, stage_weights) for s in samples], dtype=torch.float64)
    y = torch.tensor([[float(s.dynamic_bytes)] for s in samples], dtype=torch.float64)
    scale = x.abs().amax(dim=0).clamp_min(1e-12)
    solution = torch.linalg.lstsq(x / scale, y, driver="gelsd").solution[:, 0] / scale
    return tuple(float(v) for v in solution)  # type: ignore[return-value]


def plan_method(method: str, size: tuple[int, int], device: str = "cpu", backbone: str = "swin_t",
                detector: str | None = None, engine: str = "torchvision", backbone_kwargs: dict | None = None,
                hyperparameters: dict | None = None, detector_options: dict | None = None,
                num_classes: int | None = None, sizes: Sequence[tuple[int, int]] | None = None,
                boxes: int | None = None, progress: Callable[[str], None] | None = None) -> MethodPlan:
    """Profile ``method`` at small sizes on ``device`` and fit its memory model for ``size``.

    ``backbone_kwargs`` go to ``build_swin`` (spec overrides such as ``depths``); ``sizes`` are the
    profiling sizes (default: ``profile_sizes(size)``); ``boxes`` the ground-truth boxes per image
    (default: ``saturating_boxes(detector_options)``).
    """
    overrides = {k: v for k, v in (backbone_kwargs or {}).items() if k in ("depths", "embed_dim", "window_size")}
    window, stage_weights = swin_stage_weights(backbone, overrides)
    on_cuda = torch.device(device).type == "cuda"
    samples, figures = [], None
    for batch, point in profile_points(list(sizes or profile_sizes(size))):
        figures = measure_memory(method, point, batch, device, backbone=backbone, detector=detector, engine=engine,
                                 backbone_kwargs=backbone_kwargs, hyperparameters=hyperparameters,
                                 detector_options=detector_options, num_classes=num_classes, peak=on_cuda,
                                 boxes=boxes or saturating_boxes(detector_options))
        dynamic = figures.peak_bytes - figures.weight_bytes - figures.grad_state_bytes if on_cuda else figures.saved_bytes
        samples.append(Sample(batch, point, dynamic))
        if progress:
            progress(f"{method}: batch {batch} at {point[0]}x{point[1]}: {dynamic / 2**20:.0f} MiB dynamic")
    return MethodPlan(method=method, size=tuple(size), device=torch.device(device).type,
                      weight_bytes=figures.weight_bytes, grad_state_bytes=figures.grad_state_bytes,
                      coefficients=fit(samples, window, stage_weights), samples=samples, window=window,
                      stage_weights=stage_weights)


def saturating_boxes(detector_options: dict | None = None) -> int:
    """Ground-truth boxes per image that fill the RoI heads' positive quota (every box is a proposal):
    the worst case of the heads' memory, which a trained RPN reaches on crowded images anyway."""
    options = detector_options or {}
    return max(3, math.ceil(options.get("box_batch_size_per_image", 512) * options.get("box_positive_fraction", 0.25)))


def largest_batch(plan: MethodPlan, memory_bytes: float, size: tuple[int, int] | None = None,
                  reserve_bytes: float = 0, limit: int = 1024) -> int:
    """The largest batch whose predicted peak fits in ``memory_bytes - reserve_bytes`` (0: none fits)."""
    budget = memory_bytes - reserve_bytes
    batch = 0
    while batch < limit and plan.peak_bytes(batch + 1, size) <= budget:
        batch += 1
    return batch
