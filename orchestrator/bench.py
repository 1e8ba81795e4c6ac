"""``python -m orchestrator bench``: the papers' memory and time columns, measured side by side."""
from __future__ import annotations

import dataclasses
import json
import sys

import torch
from tabulate import tabulate

from detectors.bench import benchmark, ratios
from detectors.errors import UserInputError
from detectors.tuning import resolve_method

_MB = 2**20


def _engine_for(detector: str, engine: str | None) -> str | None:
    """The engine that builds ``detector``; None for a ``detectors.models`` model (UPerNet, ...)."""
    from detectors.engines import ENGINES
    from detectors.models import MODELS, model_spec
    if model_spec(detector) is not None:
        return None
    if engine is not None:
        ENGINES.get(engine).check(engine, detector)
        return engine
    for name in ENGINES.names():
        if detector in ENGINES.get(name).detectors:
            ENGINES.get(name).check(name, detector)
            return name
    known = sorted({d for name in ENGINES.names() for d in ENGINES.get(name).detectors} | set(MODELS.names()))
    raise UserInputError(f"unknown detector {detector!r}; choose one of {', '.join(known)}")


def run_bench(backbone: str, methods: list[str], size: tuple[int, int], batch: int, device: str,
              repeats: int, as_json: bool = False, detector: str | None = None, engine: str | None = None) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is available to torch here")
    if not methods:
        raise UserInputError("--methods is empty")
    if batch < 1 or repeats < 1:
        raise UserInputError("--batch and --repeats must be at least 1")
    for method in methods:
        resolve_method(method)  # unknown names fail before minutes of measuring
    if detector is not None:
        engine = _engine_for(detector, engine)
    results = benchmark(backbone, tuple(methods), size, batch, device, repeats, detector=detector,
                        engine=engine or "torchvision",
                        progress=lambda line: print(line, file=sys.stderr, flush=True))
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
        return
    to_full, to_fixed = ratios(results, "full"), ratios(results, "fixed")

    def ratio(table: dict, method: str, key: str) -> str:
        value = table.get(method, {}).get(key)
        return "-" if value is None or value != value or value == float("inf") else f"{value:.3f}"

    rows = [[r.method, f"{r.trainable / 1e6:.2f}", f"{r.saved_bytes / _MB:.0f}", f"{r.train_bytes / _MB:.0f}",
             f"{r.peak_bytes / _MB:.0f}", f"{r.step_s:.3f}",
             ratio(to_full, r.method, "saved_bytes"), ratio(to_full, r.method, "train_bytes"),
             ratio(to_full, r.method, "peak_bytes"), ratio(to_full, r.method, "step_s"),
             ratio(to_fixed, r.method, "train_bytes"), ratio(to_fixed, r.method, "peak_bytes"),
             ratio(to_fixed, r.method, "step_s")] for r in results]
    what = f"{engine or ''} {detector} on {backbone}".lstrip() if detector else backbone
    print(f"{what}, batch {batch} x {size[0]}x{size[1]}, {device}, "
          f"median of {repeats} interleaved steps (rotating order)")
    print(tabulate(rows, headers=["method", "trainable M", "saved MiB", "train MiB", "peak MiB", "s/step",
                                  "saved/full", "train/full", "peak/full", "time/full",
                                  "train/fixed", "peak/fixed", "time/fixed"],
                   disable_numparse=True, colalign=("left",) + ("right",) * 12))


def run_bench_tasks(tasks: int, method: str, backbone: str, detector: str, size: tuple[int, int], images: int,
                    rounds: int, device: str = "cpu") -> None:
    """N tasks through one frozen backbone against N separate models: seconds per image and weights held."""
    from detectors.bench_tasks import bench_tasks
    if device != "cpu":
        raise UserInputError("bench-tasks measures on the CPU only")
    if tasks < 2 or images < 1 or rounds < 1:
        raise UserInputError("--tasks must be at least 2, --images and --rounds at least 1")
    resolve_method(method)
    engine = _engine_for(detector, None)
    if engine is None:
        raise UserInputError(f"--detector: bench-tasks measures detectors (mask_rcnn, retinanet, ...), not {detector}")
    # an untrained head finds nothing; random trained weights find 100 boxes each: keep the heads' share modest
    options = {"detector_options": dict(rpn_post_nms_top_n_test=300, box_detections_per_img=20)} \
        if engine == "torchvision" and detector != "retinanet" else {}
    r = bench_tasks(tasks, method, backbone, detector, engine, size, images, rounds, backbone_kwargs=options)
    print(f"{tasks} {method} tasks, {engine} {detector} on {backbone}, {size[0]}x{size[1]}, median of {rounds} "
          f"alternating rounds of {images} image(s)")
    rows = [["separate models", f"{r.separate_s_per_image:.3f}", f"{r.separate_weight_bytes / _MB:.1f}", "", ""],
            ["one shared backbone", f"{r.shared_s_per_image:.3f}", f"{r.shared_weight_bytes / _MB:.1f}",
             f"{r.time_ratio:.3f}", f"{r.memory_ratio:.3f}"]]
    print(tabulate(rows, headers=["", "s/image", "weights MiB", "time ratio", "memory ratio"], disable_numparse=True))
    print(f"frozen passes per image (shared): {r.frozen_passes_per_image:g}")
