"""N trained tasks on one frozen backbone against N separate models, side by side in one process.

Both arms predict the same images with the same N detectors (same frozen weights, each its own
trained ones), so they compute the same predictions; the shared arm ties the frozen weights and
runs the frozen pass once per image (``detectors.sharing``). Rounds alternate the arms. Memory
is the bytes of the distinct parameter tensors each arm holds.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from detectors.engines import build_detector
from detectors.sharing import share_backbone


@dataclasses.dataclass
class TasksBench:
    tasks: int
    method: str
    separate_s_per_image: float
    shared_s_per_image: float
    separate_weight_bytes: int
    shared_weight_bytes: int
    frozen_passes_per_image: float  # the shared arm's

    @property
    def time_ratio(self) -> float:
        return self.shared_s_per_image / self.separate_s_per_image

    @property
    def memory_ratio(self) -> float:
        return self.shared_weight_bytes / self.separate_weight_bytes


def _tasks(count: int, method: str, backbone: str, detector: str, engine: str, backbone_kwargs: dict) -> list:
    models = []
    for index in range(count):
        torch.manual_seed(0)  # one pre-trained backbone for all
        model = build_detector(engine, detector, 3, backbone, method, **backbone_kwargs).eval()
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:  # each task its own trained weights
                    param.add_(torch.randn(param.shape, generator=generator) * 0.01)
        models.append(model)
    return models


def weight_bytes(models) -> int:
    """Bytes of the distinct parameter tensors the models hold together."""
    seen: dict[int, int] = {}
    for model in models:
        for param in model.parameters():
            seen[param.data_ptr()] = param.numel() * param.element_size()
    return sum(seen.values())


def bench_tasks(tasks: int = 3, method: str = "e3va", backbone: str = "swin_t", detector: str = "mask_rcnn",
                engine: str = "torchvision", size: tuple[int, int] = (512, 640), images: int = 2, rounds: int = 3,
                backbone_kwargs: dict | None = None) -> TasksBench:
    kwargs = backbone_kwargs or {}
    separate = _tasks(tasks, method, backbone, detector, engine, kwargs)
    shared_models = _tasks(tasks, method, backbone, detector, engine, kwargs)
    shared = share_backbone([model.backbone for model in shared_models])
    generator = torch.Generator().manual_seed(0)
    pictures = [torch.rand(3, *size, generator=generator) for _ in range(images)]

    def one_round(models) -> float:
        started = time.perf_counter()
        for picture in pictures:
            for model in models:
                model.predict([picture])
            shared.clear()
        return (time.perf_counter() - started) / len(pictures)

    one_round(separate), one_round(shared_models)  # warm-up
    before = shared.computed
    times: dict[str, list[float]] = {"separate": [], "shared": []}
    for index in range(rounds):
        order = [("separate", separate), ("shared", shared_models)]
        for name, models in order if index % 2 == 0 else order[::-1]:
            times[name].append(one_round(models))
    return TasksBench(tasks=tasks, method=method,
                      separate_s_per_image=statistics.median(times["separate"]),
                      shared_s_per_image=statistics.median(times["shared"]),
                      separate_weight_bytes=weight_bytes(separate), shared_weight_bytes=weight_bytes(shared_models),
                      frozen_passes_per_image=(shared.computed - before) / (rounds * len(pictures)))
