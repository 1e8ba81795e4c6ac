"""Image classification on a tuned Swin: a linear head on the last stage's pooled features, ImageFolder-layout
data (``<root>/{train,val}/<class>/<image>``), and the synthetic shapes as such a folder.

The head reads what the tuned backbone hands a detector's neck at its coarsest stage: for E3VA that
is the highway's output, so a classifier tunes the same modules a detector does.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn

from detectors.data._atomic import atomic_save_png, atomic_write_json, written_with
from detectors.data.images import read_rgb
from detectors.data.synthetic import COLOUR_MODES, SHAPE_CLASSES, _background, _paint, _rasterise
from detectors.data.transforms import normalise
from detectors.errors import UserInputError
from detectors.models import MODELS, ModelSpec

SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SYNTHETIC_VERSION = 1  # bump when the drawing changes, so stale folders are written again


class LinearClassifier(nn.Module):
    """Images (B, 3, H, W), normalised -> class logits (B, K); with ``targets`` (B,), the loss."""

    def __init__(self, backbone: nn.Module, num_classes: int, stage: str = "res5"):
        super().__init__()
        self.backbone, self.stage = backbone, stage
        self.head = nn.Linear(list(backbone.out_channels)[-1], num_classes)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.head(self.backbone(images)[self.stage].mean(dim=(-2, -1)))
        return logits if targets is None else {"loss_cls": F.cross_entropy(logits, targets)}


def _synthetic_loss(model: LinearClassifier, images: torch.Tensor, num_classes: int):
    labels = torch.randint(0, num_classes, (images.shape[0],), generator=torch.Generator().manual_seed(0))
    return lambda: sum(model(images, labels.to(images.device)).values())


MODELS.register("linear")(ModelSpec("classification", LinearClassifier, _synthetic_loss, bench_classes=1000))


def resize(picture: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A uint8 (3, H, W) picture at ``size`` (height, width), as evaluation sees every image."""
    if tuple(picture.shape[-2:]) == tuple(size):
        return picture
    resized = F.interpolate(picture[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    return resized.round().clamp(0, 255).to(torch.uint8)


class ImageFolderSplit(torch.utils.data.Dataset):
    """``<root>/<split>/<class>/<image>``: (uint8 (3, H, W) at ``size``, class index); classes in sorted order,
    the same for both splits of a root."""

    def __init__(self, root: str | Path, split: str, size: Sequence[int], flip: float = 0.0):
        self.root, self.split, self.size, self.flip = Path(root), split, tuple(size), flip
        folder = self.root / split
        if not folder.is_dir():
            raise UserInputError(f"{folder}: no such folder (an ImageFolder root holds train/ and val/, each with "
                                 f"a folder per class)")
        self.class_names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not self.class_names:
            raise UserInputError(f"{folder}: holds no class folders")
        self.samples = [(path, label) for label, name in enumerate(self.class_names)
                        for path in sorted((folder / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise UserInputError(f"{folder}: its class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = torch.from_numpy(np.asarray(read_rgb(path)).copy()).permute(2, 0, 1)
        except OSError as exc:
            raise UserInputError(f"{path}: cannot decode it as an image ({str(exc).splitlines()[0][:120]})") from None
        image = resize(image, self.size)
        if self.flip and torch.rand(()) < self.flip:
            image = image.flip(-1)
        return image, label


def check_same_classes(train: ImageFolderSplit, val: ImageFolderSplit) -> None:
    if train.class_names != val.class_names:
        only = sorted(set(train.class_names) ^ set(val.class_names))
        raise UserInputError(f"{val.root}: train/ and val/ name different classes (e.g. {only[0]!r}); a class "
                             f"index must mean the same in both")


@torch.no_grad()
def predict_split(model: LinearClassifier, dataset, device: torch.device | str = "cpu",
                  indices: Sequence[int] | None = None, batch_size: int = 8,
                  on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """(top-1 correct, top-5 correct, images) of ``model`` on ``dataset`` (or its ``indices``): a state
    that ranks add up."""
    model.eval()
    indices = list(range(len(dataset)) if indices is None else indices)
    counts = torch.zeros(3, dtype=torch.long)
    for start in range(0, len(indices), batch_size):
        images, labels = zip(*(dataset[i] for i in indices[start:start + batch_size]))
        logits = model(normalise(torch.stack(images).to(device))).cpu()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        labels = torch.tensor(labels)
        counts += torch.tensor([int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(1).sum()),
                                len(labels)])
        if on_batch is not None:
            on_batch(min(start + batch_size, len(indices)))
    return counts


def accuracies(states: Sequence[torch.Tensor]) -> dict[str, float]:
    top1, top5, images = (int(v) for v in sum(states))
    return {"top1": 100.0 * top1 / max(images, 1), "top5": 100.0 * top5 / max(images, 1)}


def make_synthetic_classification(out_dir: str | Path, num_train: int = 64, num_val: int = 16,
                                  image_size: Sequence[int] = (128, 160), num_classes: int = 3, seed: int = 0,
                                  colours: str = "by_class") -> Path:
    """The synthetic shapes as an ImageFolder root: each image one large shape (its class) on the textured
    background, among up to two small ones of any class. Written once; a manifest written last says so."""
    if not 1 <= num_classes <= len(SHAPE_CLASSES) or colours not in COLOUR_MODES:
        raise UserInputError(f"num_classes must be 1..{len(SHAPE_CLASSES)} and colours one of {COLOUR_MODES}")
    out = Path(out_dir)
    params = {"version": _SYNTHETIC_VERSION, "num_train": num_train, "num_val": num_val,
              "image_size": [int(v) for v in image_size], "num_classes": num_classes, "seed": seed,
              "colours": colours}
    manifest = out / "manifest.json"
    if written_with(manifest, params):
        return out
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        for index in range(1, count + 1):
            rng = np.random.default_rng([seed, split_index, index])
            label = (index - 1) % num_classes  # balanced classes
            pixels = _draw_one_class(rng, label, int(image_size[0]), int(image_size[1]), num_classes, colours)
            atomic_save_png(out / split / SHAPE_CLASSES[label] / f"{index:06d}.png", pixels)
    atomic_write_json(manifest, params)
    return out


def _draw_one_class(rng: np.random.Generator, label: int, height: int, width: int, num_classes: int,
                    colours: str) -> np.ndarray:
    pixels = _background(rng, height, width)
    side = min(height, width)
    shapes = [(label, int(rng.integers(side // 2, side - 8)))]
    shapes += [(int(rng.integers(num_classes)), int(rng.integers(8, side // 6))) for _ in range(rng.integers(3))]
    for class_index, size in shapes:
        x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        _, rle = _rasterise(rng, SHAPE_CLASSES[class_index], (x, y, size, size), height, width)
        mask = mask_utils.decode(rle).astype(bool)
        pixels[mask] = _paint(rng, colours, class_index, int(mask.sum()))
    return pixels
