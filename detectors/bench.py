"""Side-by-side training cost of tuning methods: parameters, saved activations, memory and time.

Every method runs in this one process on the same inputs, and the timed steps are interleaved
(method A, B, C, A, B, C, ...), so drifts of a shared machine hit all methods alike and the
ratios between methods are what to read. A step is: the tuned backbone with its pre-FPN output
norms, a simple loss on the four outputs (their mean, weighted by fixed random probes: a linear
stand-in for the neck whose own backward costs one multiply), backward, AdamW step. Where nothing in
the backbone trains (FIXED) the step is the forward pass alone: that is all FIXED costs here, the
neck and heads that train in a detector being outside the backbone (the detector-level bench
measures those).

Figures per method:
- ``trainable``: trainable parameters in the backbone (adapters, highway and norms included);
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
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from detectors.backbones import build_swin
from detectors.tuning import build_tuning

@dataclasses.dataclass
class BenchResult:
    method: str
    trainable: int
    saved_bytes: int
    train_bytes: int
    peak_bytes: int
    step_s: float


class _Subject:
    """One method's model, its optimizer and a step function."""

    def __init__(self, method: str, backbone: str, device: torch.device, backbone_kwargs: dict):
        torch.manual_seed(0)
        self.method = method
        self.backbone = build_tuning(method).apply(build_swin(backbone, **backbone_kwargs)).to(device)
        self.params = [p for p in self.backbone.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        self.probes: list[torch.Tensor] | None = None

    def step(self, images: torch.Tensor) -> None:
        features = self.backbone(images).values()
        if self.probes is None:
            generator = torch.Generator(device=images.device).manual_seed(0)
            self.probes = [torch.randn(f.shape, generator=generator, device=f.device) for f in features]
        loss = sum((f * probe).mean() for f, probe in zip(features, self.probes))
        if self.optimizer is not None:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def persistent_bytes(self) -> int:
        """Weights (frozen ones too) and optimizer state: what stays on the device between steps."""
        weights = sum(_nbytes(t) for t in [*self.backbone.parameters(), *self.backbone.buffers()])
        state = self.optimizer.state.values() if self.optimizer else ()
        return weights + sum(_nbytes(v) for s in state for v in s.values() if torch.is_tensor(v))

    def grad_and_state_bytes(self) -> int:
        """Gradient + AdamW's exp_avg and exp_avg_sq for every trainable parameter."""
        return sum(3 * _nbytes(p) for p in self.params)


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


def benchmark(backbone: str = "swin_t", methods: tuple[str, ...] = ("full", "fixed", "e3va"),
              size: tuple[int, int] = (512, 640), batch: int = 2, device: str = "cpu", repeats: int = 5,
              backbone_kwargs: dict | None = None, progress=None) -> list[BenchResult]:
    """Measure ``methods`` side by side; see the module docstring for what each figure means."""
    dev = torch.device(device)
    subjects = [_Subject(m, backbone, dev, backbone_kwargs or {}) for m in methods]
    images = torch.randn(batch, 3, *size, device=dev, generator=None)
    results = {}
    for s in subjects:  # warm-up creates optimizer state; then one step each for bytes and peak
        s.step(images)
        saved = saved_tensor_bytes(lambda: s.step(images), exclude=s.backbone.parameters())
        _sync(dev)
        with _transient_peak(dev) as transient:
            s.step(images)
        results[s.method] = dict(trainable=s.trainable, saved_bytes=saved,
                                 train_bytes=saved + s.grad_and_state_bytes(),
                                 peak_bytes=s.persistent_bytes() + transient["peak"], times=[])
        if progress:
            progress(f"{s.method}: measured memory")
    for r in range(repeats):
        for s in subjects:
            _sync(dev)
            start = time.perf_counter()
            s.step(images)
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
