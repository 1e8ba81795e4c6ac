"""GPU kinds: the short names experiments use for a batch size per kind and for placement.

A worker learns its kind from its node's Ray resources (``gpu_<kind>`` custom resources that the
cluster configs in ``cluster/`` label nodes with, or Ray's ``accelerator_type:<TYPE>``), else
from the name CUDA reports for its device; a CPU worker is of kind ``cpu``.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from detectors.errors import UserInputError

# kind: memory in GiB of its common variant (what the planner assumes when not told otherwise)
GPU_KINDS: dict[str, float] = {
    "1080ti": 11, "2080ti": 11, "titanx": 12, "p100": 16, "t4": 16, "v100": 32, "3090": 24, "4090": 24,
    "a10g": 24, "l4": 24, "l40s": 48, "a6000": 48, "a100": 80, "h100": 80, "h200": 141, "b200": 180,
}
CPU = "cpu"


def normalise(name: str) -> str:
    """``"NVIDIA GeForce GTX 1080 Ti"`` -> ``"nvidiageforcegtx1080ti"``; ``"V100"`` -> ``"v100"``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def check_kind(kind: str, where: str) -> str:
    key = normalise(kind)
    if key != CPU and key not in GPU_KINDS:
        raise UserInputError(f"{where}: unknown GPU kind {kind!r}; known: {', '.join([CPU, *GPU_KINDS])}")
    return key


def kind_from_name(device_name: str, candidates: Iterable[str] = GPU_KINDS) -> str | None:
    """The candidate kind named in a CUDA device name (the longest match: 'a100' before 'a10')."""
    name = normalise(device_name)
    for kind in sorted(candidates, key=len, reverse=True):
        if normalise(kind) in name:
            return normalise(kind)
    return None


def kind_from_resources(resources: Mapping[str, float], candidates: Iterable[str] = GPU_KINDS) -> str | None:
    """The kind a Ray node is labelled with: ``gpu_<kind>`` or ``accelerator_type:<TYPE>``."""
    wanted = {normalise(k) for k in candidates}
    for resource in resources:
        label = resource.removeprefix("gpu_") if resource.startswith("gpu_") else \
            resource.partition("accelerator_type:")[2]
        if label and normalise(label) in wanted:
            return normalise(label)
    return None
