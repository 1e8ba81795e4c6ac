"""``python -m orchestrator plan``: E3VA's Table 4 for an experiment - which GPU can train which method.

Each method is profiled for a few small steps on this machine's device, its memory model fitted
(``detectors.planner``) and extrapolated to the experiment's largest training size.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Sequence

import torch
from tabulate import tabulate

from detectors.errors import UserInputError
from detectors.planner import MethodPlan, largest_batch, padded, plan_method, profile_points, profile_sizes
from detectors.tuning import memory_savers, resolve_method, variant_table
from orchestrator.config import ExperimentConfig
from orchestrator.gpu_kinds import normalise

GIB = 2**30
# E3VA's Table 4: the GPUs and methods the paper compares
TABLE4_GPUS = "1080ti=11,p100=16,3090=24,v100=32"
TABLE4_METHODS = ("full", "bitfit", "adapter", "lora", "e3va")
# and E3VA with its frozen branches recomputed in backward: the same gradients, less memory
PLAN_METHODS = (*TABLE4_METHODS, "e3va-recompute")


def parse_gpus(text: str) -> dict[str, float]:
    """``"1080ti=11,v100=32"`` -> ``{"1080ti": 11.0, "v100": 32.0}`` (GiB per GPU kind)."""
    gpus: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        kind, sep, gib = item.partition("=")
        kind = normalise(kind)
        if not item or not sep or not kind:
            raise UserInputError(f"--gpus {item!r}: expected KIND=GiB, e.g. v100=32")
        try:
            memory = float(gib)
        except ValueError:
            raise UserInputError(f"--gpus {item!r}: {gib!r} is not a number of GiB") from None
        if not memory > 0 or memory == float("inf"):
            raise UserInputError(f"--gpus {item!r}: the memory must be a positive number of GiB")
        gpus[kind] = memory
    return gpus


def parse_list(text: str, what: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise UserInputError(f"{what} is empty")
    return items


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(v) for v in parse_list(text, "--batches")]
    except ValueError:
        raise UserInputError(f"--batches {text!r}: expected whole numbers, e.g. 1,2") from None
    if min(batches) < 1:
        raise UserInputError(f"--batches {text!r}: batch sizes must be at least 1")
    return sorted(set(batches))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in parse_list(text, "--profile-sizes"):
        match = re.fullmatch(r"(\d+)x(\d+)", item.lower())
        if not match or min(int(match[1]), int(match[2])) < 32:
            raise UserInputError(f"--profile-sizes {item!r}: expected HEIGHTxWIDTH of at least 32, e.g. 224x352")
        sizes.append((int(match[1]), int(match[2])))
    if len(sizes) < 2:
        raise UserInputError("--profile-sizes: give at least 2 sizes (batch 1 and 2 at the first, 1 at the others)")
    return sizes


def training_size(cfg: ExperimentConfig) -> tuple[int, int]:
    """The padded worst case of the task's training images (detection: the largest short edge by
    ``max_size``; segmentation: the crop)."""
    return padded(cfg.task.training_size(cfg))


def fitting_gpus(plan: MethodPlan, batch: int, gpus: dict[str, float], reserve_gib: float) -> dict[str, bool]:
    return {kind: plan.peak_bytes(batch) <= (gib - reserve_gib) * GIB for kind, gib in gpus.items()}


def suggest(plans: dict[str, MethodPlan], gpus: dict[str, float], method: str, batch: int,
            reserve_gib: float = 0.0) -> str:
    """One line for a (method, batch) that fits no listed GPU: what would fit instead."""
    need = plans[method].peak_bytes(batch) / GIB
    head = f"{method} at batch {batch} fits no listed GPU (needs {need:.1f} GiB)"
    by_size = sorted(gpus.items(), key=lambda item: item[1])
    options = []
    biggest, gib = by_size[-1]
    fewer = largest_batch(plans[method], (gib - reserve_gib) * GIB)
    if fewer:
        options.append(f"{method} at batch {fewer} on {biggest} ({gib:g} GiB)")
    for other, plan in plans.items():
        if other == method:
            continue
        smallest = next((kind for kind, gib in by_size if fitting_gpus(plan, batch, {kind: gib}, reserve_gib)[kind]),
                        None)
        if smallest:
            options.append(f"{other} at batch {batch} on {smallest} ({gpus[smallest]:g} GiB)")
    return f"{head}; instead: {', or '.join(options)}" if options else f"{head}, and no other method or batch does"


def plan_for(cfg: ExperimentConfig, method: str, hyperparameters: dict, device: str | torch.device,
             sizes: Sequence[tuple[int, int]] | None = None, progress=None) -> MethodPlan:
    """The fitted memory model of the experiment's detector tuned by ``method``, profiled on ``device``."""
    return plan_method(
        method, training_size(cfg), str(device), backbone=cfg.backbone.name, detector=cfg.model.detector,
        engine=cfg.model.engine, backbone_kwargs={"drop_path_rate": cfg.backbone.drop_path_rate, **cfg.backbone.overrides},
        hyperparameters=hyperparameters, detector_options=cfg.model.options,
        num_classes=cfg.task.num_classes(cfg), sizes=sizes, progress=progress)


def auto_batch_size(cfg: ExperimentConfig, device: torch.device, memory_bytes: float,
                    reserve_gib: float = 0.5) -> tuple[int, dict]:
    """``batch_size: auto``: the largest batch the planner predicts fits this worker's memory, and the
    hyperparameters switched on to fit it: the method's memory options (E3VA's ``recompute``), only
    where not one image fits without them and the experiment file does not set them itself."""
    method, hyperparameters = cfg.tuning.method, cfg.tuning.hyperparameters
    plan = plan_for(cfg, method, hyperparameters, device)
    batch = largest_batch(plan, memory_bytes, reserve_bytes=reserve_gib * GIB)
    if batch:
        return batch, {}
    savers = memory_savers(method, hyperparameters)
    if savers:
        saving = plan_for(cfg, method, {**hyperparameters, **savers}, device)
        batch = largest_batch(saving, memory_bytes, reserve_bytes=reserve_gib * GIB)
        if batch:
            return batch, savers
    raise UserInputError(f"schedule.batch_size: auto: one {training_size(cfg)} image needs "
                         f"{plan.peak_bytes(1) / GIB:.1f} GiB with {method}"
                         f"{f' ({saving.peak_bytes(1) / GIB:.1f} GiB with {savers})' if savers else ''}, more than "
                         f"this worker's {memory_bytes / GIB:.1f} GiB; try e3va, a smaller data.max_size, or a "
                         f"bigger GPU")


def _experiment_hyperparameters(cfg: ExperimentConfig, name: str) -> dict:
    """The file's hyperparameters for its own method and that method's variants (``e3va-recompute`` at
    the file's rank), less what the variant sets itself; none for other methods."""
    if name == cfg.tuning.method:
        return cfg.tuning.hyperparameters
    resolve_method(name)  # an unknown name fails here, naming itself
    family, preset = variant_table()[name]
    if family != resolve_method(cfg.tuning.method, cfg.tuning.hyperparameters)[0]:
        return {}
    return {k: v for k, v in {**variant_table()[cfg.tuning.method][1], **cfg.tuning.hyperparameters}.items()
            if k not in preset}


def plan_experiment(cfg: ExperimentConfig, gpus: dict[str, float], methods: Sequence[str] | None = None,
                    batches: Sequence[int] = (1, 2), device: str = "cpu", as_json: bool = False,
                    sizes: Sequence[tuple[int, int]] | None = None, reserve_gib: float = 0.5) -> dict[str, MethodPlan]:
    """Profile, fit and print the table; returns the fitted plans by method."""
    if not gpus:
        raise UserInputError("--gpus is empty")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is available to torch here")
    if reserve_gib < 0:
        raise UserInputError("--reserve must not be negative")
    if methods is None:
        methods = [*PLAN_METHODS, *([cfg.tuning.method] if cfg.tuning.method not in PLAN_METHODS else [])]
    hyperparameters = {}
    for method in methods:  # unknown names and bad hyperparameters fail before anything is profiled
        hyperparameters[method] = _experiment_hyperparameters(cfg, method)
        resolve_method(method, hyperparameters[method])
    cfg.task.check_model(cfg)
    size = training_size(cfg)
    sizes = list(sizes or profile_sizes(size))
    plans = {method: plan_for(cfg, method, hyperparameters[method], device, sizes,
                              progress=lambda line: print(line, file=sys.stderr, flush=True))
             for method in methods}
    rows = [(method, batch, fitting_gpus(plans[method], batch, gpus, reserve_gib))
            for method in methods for batch in batches]
    notes = [suggest(plans, gpus, method, batch, reserve_gib) for method, batch, fits in rows if not any(fits.values())]
    if as_json:
        print(json.dumps({
            "experiment": cfg.name, "size": list(size), "device": device, "gpus_gib": gpus, "reserve_gib": reserve_gib,
            "rows": [{"method": m, "batch": b, "static_bytes": plans[m].static_bytes,
                      "dynamic_bytes": round(plans[m].dynamic_bytes(b)), "peak_bytes": plans[m].peak_bytes(b),
                      "fits": fits} for m, b, fits in rows],
            "plans": {m: p.as_dict() for m, p in plans.items()}, "notes": notes}, indent=2))
        return plans
    points = ", ".join(f"b{b}@{h}x{w}" for b, (h, w) in profile_points(sizes))
    worst = max(p.fit_error() for p in plans.values())
    print(f"{cfg.name}: {cfg.model.detector} on {cfg.backbone.name}, training size {size[0]}x{size[1]} (padded "
          f"worst case), fp32; fitted on {device} from {points} (worst fit error {100 * worst:.1f}%)")
    if device == "cpu":
        print("cpu: activations are the tensors saved for backward; a CUDA step also holds temporaries "
              "(profile with --device cuda for its peak)")
    table = [[m, b, f"{plans[m].static_bytes / GIB:.2f}", f"{plans[m].dynamic_bytes(b) / GIB:.2f}",
              f"{plans[m].peak_bytes(b) / GIB:.2f}", *("✓" if fits[k] else "✗" for k in gpus)] for m, b, fits in rows]
    print(tabulate(table, headers=["method", "batch/GPU", "static GiB", "activations GiB", "peak GiB",
                                   *(f"{k} {g:g}GB" for k, g in gpus.items())],
                   disable_numparse=True, colalign=("left", "right", "right", "right", "right", *("center",) * len(gpus))))
    print(f"✓: predicted peak + {reserve_gib:g} GiB reserve (CUDA context, fragmentation) fits the GPU")
    for note in notes:
        print(f"* {note}")
    return plans
