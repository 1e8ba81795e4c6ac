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


def run_bench(backbone: str, methods: list[str], size: tuple[int, int], batch: int, device: str,
              repeats: int, as_json: bool = False) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is available to torch here")
    if not methods:
        raise UserInputError("--methods is empty")
    if batch < 1 or repeats < 1:
        raise UserInputError("--batch and --repeats must be at least 1")
    for method in methods:
        resolve_method(method)  # unknown names fail before minutes of measuring
    results = benchmark(backbone, tuple(methods), size, batch, device, repeats,
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
             ratio(to_full, r.method, "saved_bytes"), ratio(to_full, r.method, "peak_bytes"),
             ratio(to_full, r.method, "step_s"), ratio(to_fixed, r.method, "peak_bytes"),
             ratio(to_fixed, r.method, "step_s")] for r in results]
    print(f"{backbone}, batch {batch} x {size[0]}x{size[1]}, {device}, median of {repeats} interleaved steps")
    print(tabulate(rows, headers=["method", "trainable M", "saved MiB", "train MiB", "peak MiB", "s/step",
                                  "saved/full", "peak/full", "time/full", "peak/fixed", "time/fixed"],
                   disable_numparse=True, colalign=("left",) + ("right",) * 10))
