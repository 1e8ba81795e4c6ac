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


def _engine_for(detector: str, engine: str | None) -> str:
    from detectors.engines import ENGINES
    if engine is not None:
        ENGINES.get(engine).check(engine, detector)
        return engine
    for name in ENGINES.names():
        if detector in ENGINES.get(name).detectors:
            ENGINES.get(name).check(name, detector)
            return name
    known = sorted({d for name in ENGINES.names() for d in ENGINES.get(name).detectors})
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
    what = f"{engine} {detector} on {backbone}" if detector else backbone
    print(f"{what}, batch {batch} x {size[0]}x{size[1]}, {device}, "
          f"median of {repeats} interleaved steps (rotating order)")
    print(tabulate(rows, headers=["method", "trainable M", "saved MiB", "train MiB", "peak MiB", "s/step",
                                  "saved/full", "train/full", "peak/full", "time/full",
                                  "train/fixed", "peak/fixed", "time/fixed"],
                   disable_numparse=True, colalign=("left",) + ("right",) * 12))
