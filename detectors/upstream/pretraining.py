"""Pre-train a small Swin on the synthetic upstream task and cache it as a Microsoft Swin release file.

``ensure_pretrained(spec)`` returns the checkpoint for ``spec``: from the cache when a complete,
intact one is there (a second call returns at once), else it trains one and writes it atomically.
The file has the layout of Microsoft's Swin releases (``{"model": ...}``, patch merging at the end of
a stage, a classification ``norm`` and ``head``), so ``build_backbone(..., weights=path)`` reads it
through the same path as a downloaded ImageNet-22K checkpoint. Beside it, a manifest records the
spec, the file's SHA-256 and size, and the upstream validation figures: a truncated or altered file
no longer matches and is trained again, never used.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from detectors.backbones.swin import SWIN_SPECS, SwinBackbone, build_swin
from detectors.data._atomic import atomic_write_bytes, atomic_write_json
from detectors.errors import UserInputError
from detectors.upstream.data import COLOUR_FAMILIES, SHAPES, TEXTURES, TRAIN, VAL, upstream_batch

log = logging.getLogger(__name__)

# Bump when the task, the model or the training changes: older caches are then trained again.
UPSTREAM_VERSION = 1
_OUTPUT_NORM = re.compile(r"^norm\d\.")  # the detection Swin's output norms: not part of a classifier


@dataclass(frozen=True)
class UpstreamSpec:
    """What is pre-trained, and how. All fields but ``cache_dir`` and ``device`` name the checkpoint."""
    __pydantic_config__ = {"extra": "forbid"}  # unknown keys in an experiment's backbone.upstream are errors

    backbone: str = "swin_mini"
    steps: int = 300
    batch_size: int = 32
    image_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 15
    seed: int = 0
    cache_dir: str = "outputs/pretrained"
    device: str = "auto"

    def __post_init__(self):
        if self.backbone not in SWIN_SPECS:
            raise UserInputError(f"upstream backbone {self.backbone!r} is unknown; choose one of "
                                 f"{', '.join(SWIN_SPECS)}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserInputError(f"upstream {name} must be at least 1, got {getattr(self, name)}")
        if self.image_size < 32 or self.image_size % 32:
            raise UserInputError(f"upstream image_size must be a multiple of 32, got {self.image_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserInputError(f"upstream device must be auto, cpu or cuda, got {self.device!r}")

    def identity(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["cache_dir"], fields["device"]
        return {"version": UPSTREAM_VERSION, **fields}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def path(self) -> Path:
        return Path(self.cache_dir) / f"{self.backbone}-upstream-s{self.seed}-{self.key()}.pth"

    @property
    def manifest(self) -> Path:
        return self.path.with_suffix(".json")


def check_fits(spec: UpstreamSpec, backbone: str, overrides: dict[str, Any], where: str = "backbone.upstream") -> None:
    """The pre-trained model must be the experiment's backbone: same widths, depths, heads and window."""
    mine = SWIN_SPECS[spec.backbone]
    if backbone not in SWIN_SPECS:
        raise UserInputError(f"backbone.name: unknown backbone {backbone!r}; choose one of {', '.join(SWIN_SPECS)}")
    theirs = dataclasses.replace(SWIN_SPECS[backbone], **{k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in overrides.items()})
    if dataclasses.astuple(mine) != dataclasses.astuple(theirs):
        raise UserInputError(f"{where}: pre-trains {spec.backbone} ({_describe(mine)}), which does not fit the "
                             f"experiment's backbone {backbone} ({_describe(theirs)}); set backbone.name: "
                             f"{spec.backbone} without overrides, or pre-train that backbone")


def _describe(spec) -> str:
    return (f"embed_dim {spec.embed_dim}, depths {list(spec.depths)}, heads {list(spec.num_heads)}, "
            f"window {spec.window_size}")


def cached(spec: UpstreamSpec) -> Path | None:
    """The cached checkpoint of ``spec`` if it is complete and intact, else None."""
    try:
        manifest = json.loads(spec.manifest.read_text())
        data = spec.path.read_bytes()
    except (OSError, ValueError):
        return None
    if (manifest.get("identity") != spec.identity() or manifest.get("bytes") != len(data)
            or manifest.get("sha256") != hashlib.sha256(data).hexdigest()):
        return None
    return spec.path


def check_cache_writable(spec: UpstreamSpec, where: str = "upstream cache_dir") -> None:
    directory = Path(spec.cache_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserInputError(f"{where}: {directory} is not a writable directory "
                             f"({exc.strerror or type(exc).__name__})") from None


def ensure_pretrained(spec: UpstreamSpec, progress: Callable[[int, int, float], None] | None = None) -> Path:
    """The checkpoint for ``spec``: the cached one, or a new one trained now and cached."""
    found = cached(spec)
    if found is not None:
        return found
    check_cache_writable(spec)
    if spec.path.exists() or spec.manifest.exists():
        log.warning("the cached upstream checkpoint %s is incomplete or altered: training it again", spec.path)
    state, metrics = pretrain(spec, progress)
    install(spec, checkpoint_bytes(state), metrics)
    return spec.path


def install(spec: UpstreamSpec, data: bytes, metrics: dict[str, float] | None = None) -> Path:
    """Put a checkpoint's bytes into ``spec``'s cache: the file first, then the manifest that vouches for it."""
    spec.manifest.unlink(missing_ok=True)
    atomic_write_bytes(spec.path, data, durable=True)
    atomic_write_json(spec.manifest, {"identity": spec.identity(), "bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest(), "metrics": metrics or {}})
    return spec.path


def checkpoint_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": state}, buffer)
    return buffer.getvalue()


def read_metrics(spec: UpstreamSpec) -> dict[str, float]:
    try:
        return json.loads(spec.manifest.read_text()).get("metrics", {})
    except (OSError, ValueError):
        return {}


class UpstreamModel(nn.Module):
    """The Swin with a small dense head on every stage: per location, the shape, colour family and
    texture of what is there (or background). Dense labels teach a few thousand decisions per image
    where a multi-label classifier teaches a few dozen, so a small Swin learns objectness, outlines,
    colour and texture within minutes on a CPU; every stage is supervised, as every stage feeds the FPN."""

    def __init__(self, backbone: SwinBackbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.ModuleList(nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, sum(CLASSES_PER_MAP)))
                                  for channels in backbone.out_channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits (B, sum(CLASSES_PER_MAP), H/s, W/s) at each stage's stride s."""
        return [head(x).permute(0, 3, 1, 2) for head, x in zip(self.head, self.backbone.stage_outputs(images))]

    def targets(self, maps: torch.Tensor) -> list[torch.Tensor]:
        """The label maps (B, 3, S, S) sampled at the centre of every stage's cells."""
        return [maps[:, :, stride // 2::stride, stride // 2::stride] for stride in self.backbone.strides]


CLASSES_PER_MAP = (len(SHAPES) + 1, len(COLOUR_FAMILIES) + 1, len(TEXTURES) + 1)  # background first
_SPLITS = [sum(CLASSES_PER_MAP[:i]) for i in range(len(CLASSES_PER_MAP) + 1)]


def dense_loss(logits: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every map at every stage, averaged."""
    terms = [F.cross_entropy(stage[:, _SPLITS[j]:_SPLITS[j + 1]], target[:, j])
             for stage, target in zip(logits, targets) for j in range(len(CLASSES_PER_MAP))]
    return torch.stack(terms).mean()


def pretrain(spec: UpstreamSpec, progress: Callable[[int, int, float], None] | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train ``spec`` from its seed: the Microsoft-layout state dict and the upstream validation figures."""
    device = torch.device("cuda" if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.manual_seed(spec.seed)
    model = UpstreamModel(build_swin(spec.backbone, drop_path_rate=0.0)).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "relative_position" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "relative_position" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=spec.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, spec))
    started = time.perf_counter()
    model.train()
    for step in range(spec.steps):
        images, maps = upstream_batch(spec.seed, TRAIN, step, spec.batch_size, spec.image_size)
        loss = dense_loss(model(images.to(device)), model.targets(maps.to(device)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress(step + 1, spec.steps, loss.item())
    metrics = {**evaluate_upstream(model, spec, device), "seconds": time.perf_counter() - started}
    return to_microsoft_layout(model), metrics


def _lr_factor(step: int, spec: UpstreamSpec) -> float:
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    done = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


@torch.no_grad()
def evaluate_upstream(model: UpstreamModel, spec: UpstreamSpec, device: torch.device,
                      batches: int = 4) -> dict[str, float]:
    """On the validation stream, at stride 8: how often the foreground/background call is right
    (``objectness``), and the shape, colour and texture accuracy on object pixels, with chance levels."""
    model.eval()
    right = torch.zeros(4)
    total = torch.zeros(2)
    for index in range(batches):
        images, maps = upstream_batch(spec.seed, VAL, index, 32, spec.image_size)
        logits, target = model(images.to(device))[1].float().cpu(), model.targets(maps)[1]
        shape = logits[:, _SPLITS[0]:_SPLITS[1]]
        foreground = target[:, 0] > 0
        right[0] += ((shape.argmax(1) > 0) == foreground).sum()
        for j in range(len(CLASSES_PER_MAP)):
            predicted = logits[:, _SPLITS[j] + 1:_SPLITS[j + 1]].argmax(1) + 1  # among the object classes
            right[j + 1] += (predicted == target[:, j])[foreground].sum()
        total += torch.tensor([foreground.numel(), foreground.sum()])
    model.train()
    return {"objectness": 100 * float(right[0] / total[0]), "shape_accuracy": 100 * float(right[1] / total[1]),
            "colour_accuracy": 100 * float(right[2] / total[1]), "texture_accuracy": 100 * float(right[3] / total[1]),
            "shape_chance": 100 / len(SHAPES), "colour_chance": 100 / len(COLOUR_FAMILIES)}


def to_microsoft_layout(model: UpstreamModel) -> dict[str, torch.Tensor]:
    """Our state dict in the layout of Microsoft's Swin releases: patch merging at the end of a stage,
    the task's ``head`` beside ``layers`` (dropped when a detector loads it), no detection output norms."""
    out = {}
    for key, value in model.backbone.state_dict().items():
        if _OUTPUT_NORM.match(key):
            continue
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key)
        out[key] = value.detach().cpu().clone()
    for key, value in model.head.state_dict().items():
        out[f"head.{key}"] = value.detach().cpu().clone()
    return out


def spec_from(values: dict[str, Any] | None) -> UpstreamSpec:
    """An ``UpstreamSpec`` from plain values (e.g. ``--set`` items), one clear line on an unknown field."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(UpstreamSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(f"unknown upstream field {unknown[0]!r}; the fields are {', '.join(sorted(known))}")
    return UpstreamSpec(**values)


