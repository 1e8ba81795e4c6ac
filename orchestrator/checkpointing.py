"""Checkpoints that hold only what trains, in safetensors, plus what they belong to.

A checkpoint directory holds ``trainable.safetensors`` (trainable parameters by name, the buffers
that train beside them under ``buffers/`` - BatchNorm's running statistics in a segmentation head - and
the optimizer's tensors under ``optimizer/<index>/<key>``) and ``state.json`` (step, scheduler and
optimizer hyperparameters, the identity of the frozen backbone: name, method,
hyperparameters and a SHA-256 fingerprint of its frozen weights, and the size of the weights file).
Directories are written atomically: to a temporary sibling, then renamed. Ray Train then copies
them to the run's storage, file by file: a checkpoint whose weights do not have the size its
``state.json`` records was not copied whole and is never resumed from.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from detectors.errors import UserInputError

WEIGHTS = "trainable.safetensors"
STATE = "state.json"


def backbone_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 over the frozen backbone weights: which pre-trained model the adapters fit."""
    digest = hashlib.sha256()
    for name, param in sorted(backbone.named_parameters()):
        if not param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def trained_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of modules with trainable parameters of their own (BatchNorm's running
    mean and variance): they change in training as the parameters do. A frozen module's are its own."""
    found = {}
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and name not in module._non_persistent_buffers_set:
                    found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, identity: dict[str, Any],
                    history: list[dict[str, Any]] | None = None) -> Path:
    """``history``: the reports since the previous checkpoint, this step's included. A driver stopped
    before it logged them finds them here when the run resumes from this checkpoint."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tensors = {f"model/{name}": p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"buffers/{name}": b.detach().cpu().contiguous() for name, b in trained_buffers(model).items()})
    optimizer_state = optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(staging / WEIGHTS))
    (staging / STATE).write_text(json.dumps({
        "step": step, "identity": identity, "weights_bytes": (staging / WEIGHTS).stat().st_size,
        "history": history or [],
        "scheduler": scheduler.state_dict(),
        "optimizer_param_groups": optimizer_state["param_groups"]}, indent=2, default=str))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory


def newest_checkpoint(storage, folder: str) -> tuple[str, dict[str, Any]] | None:
    """``(path, state)`` of the complete checkpoint with the highest step below ``folder`` of ``storage``
    (an :class:`orchestrator.storage.Storage`), whatever filesystem it is on; None if there is none."""
    files = storage.files(folder)
    best: tuple[str, dict[str, Any]] | None = None
    for path in files:
        if not path.endswith(f"/{STATE}"):
            continue
        directory = path.rsplit("/", 1)[0]
        weights = files.get(f"{directory}/{WEIGHTS}")
        state = storage.read_json(path) if weights is not None else None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            continue
        if state.get("weights_bytes", weights) != weights:  # the copy of the weights was cut short
            continue
        if best is None or state["step"] > best[1]["step"]:
            best = (directory, state)
    return best


def check_identity(directory: Path | str, identity: dict[str, Any], state: dict[str, Any] | None = None) -> None:
    """Refuse a checkpoint made for another backbone, method, detector or pre-trained weights.

    Only the keys ``identity`` has are compared: the driver checks what the experiment names
    before any worker starts; the workers also check the frozen weights' fingerprint.
    """
    directory = Path(directory)
    if state is None:
        try:
            state = json.loads((directory / STATE).read_text())
        except (OSError, ValueError) as exc:
            raise UserInputError(f"cannot read checkpoint {directory}: {exc}") from None
    theirs = state.get("identity", {})
    for key in ("backbone", "method", "hyperparameters", "detector", "fingerprint"):
        if key in identity and theirs.get(key) != identity[key]:
            raise UserInputError(f"checkpoint {directory} belongs to another model: its {key} is "
                                 f"{theirs.get(key)!r}, this run has {identity[key]!r}; give the experiment "
                                 f"another name or output_dir to start afresh")


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, identity: dict[str, Any]) -> int:
    """Restore and return the step; refuse a checkpoint made for another backbone or method."""
    directory = Path(directory)
    try:
        state = json.loads((directory / STATE).read_text())
        tensors = load_file(str(directory / WEIGHTS))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read checkpoint {directory}: {exc}") from None
    check_identity(directory, identity, state)
    weights = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise UserInputError(f"checkpoint {directory} lacks {len(missing)} trainable parameters, e.g. {missing[0]}")
    buffers = {k.removeprefix("buffers/"): v for k, v in tensors.items() if k.startswith("buffers/")}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name])
        for name, buffer in trained_buffers(model).items():
            if name in buffers:  # checkpoints from before buffers were kept have none
                buffer.copy_(buffers[name])
    if optimizer is not None:
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                per_param.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
