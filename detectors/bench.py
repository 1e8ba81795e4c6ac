"""Side-by-side training cost of tuning methods: parameters, saved activations, memory and time.

Every method runs in this one process on the same inputs, and the timed steps are interleaved,
the order rotating by one method each round (A B C, B C A, C A B, ...), so drifts of a shared
machine hit all methods alike, no method always runs after the same one (whose freed memory and
evicted caches it would inherit), and the ratios between methods are what to read. A backbone
step is: the tuned backbone with its pre-FPN output norms, a simple loss on the four outputs
(their mean, weighted by fixed random probes: a linear stand-in for the neck whose own backward
costs one multiply), backward, AdamW step. Where nothing in the backbone trains (FIXED) the step
is the forward pass alone: that is all FIXED costs here, the neck and heads that train in a
detector being outside the backbone (the detector-level bench measures those). A detector step
(``detector="mask_rcnn"``, ...) is that detector's whole training step, its losses on a fixed
synthetic batch, with the neck and heads training for every method: the papers' memory column.

Figures per method:
- ``trainable``: trainable parameters in the backbone (adapters, highway and norms included);
  gradients and optimizer state below count every trainable parameter, heads included;
- ``saved_bytes``: bytes autograd keeps for backward (saved-tensor hooks, unique storages,
  parameters excluded since they are resident anyway);
- ``train_bytes``: saved_bytes + gradients + AdamW state of the trainable parameters;
- ``peak_bytes``: what the model needs on a device of its own: its resident weights and optimizer
  state plus the transient peak of one step (CUDA: max allocated; CPU: rise of the process RSS, sampled every millisecond, after freed heap pages went back to the OS);
- ``step_s``: median seconds per training step.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import math
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from detectors.tuning import build_tuned_swin

@dataclasses.dataclass
class BenchResult:
    method: str
    trainable: int
    saved_bytes: int
    train_bytes: int
    peak_bytes: int
    step_s: float


class _Subject:
    """One method's model, its optimizer and a training step on fixed inputs."""

    def __init__(self, method: str, model: nn.Module, backbone: nn.Module, loss_fn):
        self.method = method
        self.model = model
        self.loss_fn = loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, fused=True) if self.params else None

    def step(self) -> None:
        loss = self.loss_fn()
        if self.optimizer is not None:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def persistent_bytes(self) -> int:
        """Weights (frozen ones too) and optimizer state: what stays on the device between steps."""
        weights = sum(_nbytes(t) for t in [*self.model.parameters(), *self.model.buffers()])
        state = self.optimizer.state.values() if self.optimizer else ()
        return weights + sum(_nbytes(v) for s in state for v in s.values() if torch.is_tensor(v))

    def grad_and_state_bytes(self) -> int:
        """Gradient + AdamW's exp_avg and exp_avg_sq for every trainable parameter."""
        return sum(3 * _nbytes(p) for p in self.params)


def _backbone_subject(method: str, backbone: str, images: torch.Tensor, backbone_kwargs: dict,
                      hyperparameters: dict | None = None) -> _Subject:
    torch.manual_seed(0)
    model = build_tuned_swin(backbone, method, hyperparameters, **backbone_kwargs)
    model = model.to(images.device)
    with torch.no_grad():
        shapes = [f.shape for f in model(images).values()]
    generator = torch.Generator(device=images.device).manual_seed(0)
    probes = [torch.randn(shape, generator=generator, device=images.device) for shape in shapes]

    def loss() -> torch.Tensor:
        return sum((f * probe).mean() for f, probe in zip(model(images).values(), probes))
    return _Subject(method, model, model, loss)


def _detector_subject(method: str, engine: str, detector: str, backbone: str, images: torch.Tensor,
                      backbone_kwargs: dict, hyperparameters: dict | None = None,
                      detector_options: dict | None = None, num_classes: int | None = None,
                      boxes: int = 3) -> _Subject:
    from detectors.engines import build_detector
    torch.manual_seed(0)
    model = build_detector(engine, detector, num_classes or NUM_CLASSES, backbone, method,
                           hyperparameters=hyperparameters, detector_options=detector_options,
                           **backbone_kwargs).to(images.device)
    model.train()
    batch = [image for image in images]
    targets = synthetic_targets(len(batch), tuple(images.shape[-2:]), images.device, boxes)

    def loss() -> torch.Tensor:
        torch.manual_seed(0)  # the same anchor and proposal sampling in every step
        return sum(model(batch, targets).values())
    return _Subject(method, model, model.backbone, loss)


NUM_CLASSES = 3


def _model_subject(method: str, detector: str, backbone: str, images: torch.Tensor, backbone_kwargs: dict,
                   hyperparameters: dict | None = None, num_classes: int | None = None,
                   detector_options: dict | None = None, **_) -> _Subject:
    """A ``detectors.models`` model's training step (e.g. UPerNet's two losses) on its fixed random targets."""
    from detectors.models import MODELS
    spec = MODELS.get(detector)
    torch.manual_seed(0)
    classes = num_classes or spec.bench_classes
    tuned = build_tuned_swin(backbone, method, hyperparameters, **backbone_kwargs)
    model = spec.build(tuned, classes, **(detector_options or {})).to(images.device).train()
    return _Subject(method, model, model.backbone, spec.synthetic_loss(model, images, classes))


def _grid_boxes(boxes: int, shift: float) -> torch.Tensor:
    """``boxes`` relative xyxy boxes on a square grid, each 80% of its cell."""
    side = math.ceil(math.sqrt(boxes))
    cells = torch.tensor([[c / side, r / side] for r in range(side) for c in range(side)][:boxes])
    start = cells + (0.1 + shift) / side
    return torch.cat([start, start + 0.8 / side], dim=1).clamp(0, 1)


def synthetic_targets(count: int, size: tuple[int, int], device: torch.device, boxes: int = 3) -> list[dict]:
    """Three boxes with masks per image (or ``boxes`` of them on a grid), fixed, so every method sees
    the same detection problem. Enough boxes saturate the RoI heads' positive samples (every
    ground-truth box joins the proposals), so that their memory is a constant per image."""
    height, width = size
    targets = []
    for i in range(count):
        if boxes == 3:
            relative = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6], [0.2 + 0.05 * i, 0.6, 0.6, 0.95]])
        else:
            relative = _grid_boxes(boxes, 0.05 * (i % 2))
        xyxy = relative * torch.tensor([width, height, width, height])
        masks = torch.zeros(len(xyxy), height, width, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, xyxy.round().long().tolist()):
            mask[y0:y1, x0:x1] = 1
        labels = torch.tensor([1, 2, 3]) if boxes == 3 else torch.ones(len(xyxy), dtype=torch.int64)
        targets.append({"boxes": xyxy.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return targets


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def saved_tensor_bytes(fn, exclude: Iterator[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn`` runs its forward."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and t.device.type != "meta":
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


class _RssPeak:
    """Peak resident set size above the level at entry, sampled every millisecond."""

    def __init__(self):
        self.page = 4096
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS, so RSS starts from the live tensors (glibc only)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


@contextmanager
def _transient_peak(device: torch.device) -> Iterator[dict]:
    out = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - base
    else:
        _release_free_heap()
        with _RssPeak() as sampler:
            yield out
        out["peak"] = sampler.peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(batch: int, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, *size, generator=generator).to(device)


def _subject(method: str, backbone: str, images: torch.Tensor, detector: str | None, engine: str,
             backbone_kwargs: dict, **options) -> _Subject:
    if detector is None:
        return _backbone_subject(method, backbone, images, backbone_kwargs, options.get("hyperparameters"))
    from detectors.models import model_spec
    if model_spec(detector) is not None:
        return _model_subject(method, detector, backbone, images, backbone_kwargs, **options)
    return _detector_subject(method, engine, detector, backbone, images, backbone_kwargs, **options)


@dataclasses.dataclass
class MemoryFigures:
    """One method's memory at one batch and size (see the module docstring for each figure).

    ``weight_bytes``: every parameter and buffer; ``grad_state_bytes``: gradient + AdamW state of
    every trainable parameter (3x their bytes); ``peak_bytes`` is 0 where it was not measured.
    """
    method: str
    weight_bytes: int
    grad_state_bytes: int
    saved_bytes: int
    train_bytes: int
    peak_bytes: int


def _measure(s: _Subject, dev: torch.device, peak: bool = True) -> MemoryFigures:
    """One step for the saved bytes; with ``peak``, a warm-up step first (optimizer state) and one after."""
    if peak:
        s.step()
    saved = saved_tensor_bytes(s.step, exclude=s.model.parameters())
    transient = {"peak": 0}
    if peak:
        _sync(dev)
        with _transient_peak(dev) as transient:
            s.step()
    weights = sum(_nbytes(t) for t in [*s.model.parameters(), *s.model.buffers()])
    return MemoryFigures(method=s.method, weight_bytes=weights, grad_state_bytes=s.grad_and_state_bytes(),
                         saved_bytes=saved, train_bytes=saved + s.grad_and_state_bytes(),
                         peak_bytes=s.persistent_bytes() + transient["peak"] if peak else 0)


def measure_memory(method: str, size: tuple[int, int], batch: int, device: str = "cpu", backbone: str = "swin_t",
                   detector: str | None = None, engine: str = "torchvision", backbone_kwargs: dict | None = None,
                   hyperparameters: dict | None = None, detector_options: dict | None = None,
                   num_classes: int | None = None, boxes: int = 3, peak: bool = True) -> MemoryFigures:
    """One method's memory figures at one size and batch, the step ``benchmark`` measures (no timing).

    ``peak=False`` runs a single step, for ``saved_bytes`` and ``train_bytes`` alone; ``boxes`` is
    the number of ground-truth boxes per image of a detector step.
    """
    dev = torch.device(device)
    options = {"hyperparameters": hyperparameters}
    if detector is not None:
        options.update(detector_options=detector_options, num_classes=num_classes, boxes=boxes)
    subject = _subject(method, backbone, _images(batch, size, dev), detector, engine, backbone_kwargs or {},
                       **options)
    figures = _measure(subject, dev, peak)
    del subject
    _release_free_heap()
    return figures


def benchmark(backbone: str = "swin_t", methods: tuple[str, ...] = ("full", "fixed", "e3va"),
              size: tuple[int, int] = (512, 640), batch: int = 2, device: str = "cpu", repeats: int = 18,
              detector: str | None = None, engine: str = "torchvision", backbone_kwargs: dict | None = None,
              progress=None) -> list[BenchResult]:
    """Measure ``methods`` side by side; see the module docstring for what each figure means.

    Without ``detector`` a step is the backbone and a probe loss; with one (``mask_rcnn``, ...)
    it is that detector's full training step on a fixed synthetic batch.

    18 repeats are whole rotations of both the CLI's six methods and the three here, so each method
    runs in every position equally often. Fewer are too noisy on a shared machine: in one 45-round
    run on a 2-core VM, E3VA/FIXED medians over 9 consecutive rounds ranged 1.18-1.29, over 15
    rounds 1.20-1.25 (1.22 over all 45).
    """
    dev = torch.device(device)
    images = _images(batch, size, dev)
    subjects = [_subject(m, backbone, images, detector, engine, backbone_kwargs or {}) for m in methods]
    results = {}
    for s in subjects:
        figures = _measure(s, dev)
        results[s.method] = dict(trainable=s.trainable, saved_bytes=figures.saved_bytes,
                                 train_bytes=figures.train_bytes, peak_bytes=figures.peak_bytes, times=[])
        if progress:
            progress(f"{s.method}: measured memory")
    for r in range(repeats):
        for s in subjects[r % len(subjects):] + subjects[:r % len(subjects)]:
            _sync(dev)
            start = time.perf_counter()
            s.step()
            _sync(dev)
            results[s.method]["times"].append(time.perf_counter() - start)
        if progress:
            progress(f"repeat {r + 1}/{repeats} done")
    return [BenchResult(method=m, step_s=statistics.median(r.pop("times")), **r) for m, r in results.items()]


def ratios(results: list[BenchResult], reference: str) -> dict[str, dict[str, float]]:
    """Each method's figures divided by ``reference``'s (empty if it was not measured)."""
    ref = next((r for r in results if r.method == reference), None)
    if ref is None:
        return {}
    keys = ("saved_bytes", "train_bytes", "peak_bytes", "step_s")
    return {r.method: {k: getattr(r, k) / getattr(ref, k) if getattr(ref, k) else float("nan") for k in keys}
            for r in results}
