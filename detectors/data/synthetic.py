"""A small synthetic COCO dataset of coloured shapes, for CI, demos and smoke tests.

Real COCO is 20 GB and cannot be downloaded here, yet the training and evaluation paths must be
exercised end to end with real pycocotools files. Shapes on a textured background are easy enough
that a few hundred iterations move AP, and they cover what the real data has: several classes,
small/medium/large objects in COCO's area sense, and both polygon and RLE segmentations.

Every mask is rasterised by pycocotools itself, so the painted pixels, the stored segmentation,
``bbox`` and ``area`` agree exactly with what ``COCO.annToMask`` returns later.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from detectors.data._atomic import atomic_save_png, atomic_write_json
from detectors.errors import UserInputError

SHAPE_CLASSES = ("square", "circle", "triangle", "diamond", "hexagon")
_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (240, 200, 30), (200, 50, 220))
# Side-length ranges chosen so that mask areas land in COCO's small (< 32^2), medium (< 96^2)
# and large buckets; the probabilities keep all three present in even a dozen images.
_SIZE_RANGES = ((10, 30), (36, 90), (100, 180))
_SIZE_PROBS = (0.35, 0.4, 0.25)
_RLE_PROB = 0.25  # polygonal shapes stored as RLE anyway, so both formats appear for any classes
_GENERATOR_VERSION = 1  # bump when the drawing changes, so stale datasets are regenerated
COLOUR_MODES = ("by_class", "random", "shifted")
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")


def make_synthetic_coco(
    out_dir: str | os.PathLike,
    num_train: int = 48,
    num_val: int = 16,
    image_size: tuple[int, int] = (256, 320),
    num_classes: int = 3,
    seed: int = 0,
    colours: str = "by_class",
) -> dict[str, Any]:
    """Write (or reuse) the dataset under ``out_dir`` and return its paths and class names.

    ``colours``: ``by_class`` paints each class its own colour (colour alone tells the class);
    ``random`` paints every object a random colour, so only its shape does; ``shifted`` paints every
    object a speckled dark or light grey, a look the upstream pre-training (``detectors.upstream``:
    saturated colour families, solid/stripes/checker/dots) never shows, and again only the shape tells.

    A manifest of the parameters is written last; a later call with the same parameters finds it
    and returns at once, while an interrupted call leaves no manifest and is redone.
    """
    _validate(num_train, num_val, image_size, num_classes)
    if colours not in COLOUR_MODES:
        raise UserInputError(f"colours must be one of {', '.join(COLOUR_MODES)}, got {colours!r}")
    out = Path(out_dir)
    height, width = int(image_size[0]), int(image_size[1])
    params = {"version": _GENERATOR_VERSION, "num_train": num_train, "num_val": num_val,
              "image_size": [height, width], "num_classes": num_classes, "seed": seed,
              **({"colours": colours} if colours != "by_class" else {})}
    result = {
        "train_images": str(out / "train"),
        "train_json": str(out / "annotations" / "instances_train.json"),
        "val_images": str(out / "val"),
        "val_json": str(out / "annotations" / "instances_val.json"),
        "num_classes": num_classes,
        "class_names": list(SHAPE_CLASSES[:num_classes]),
    }
    manifest = out / "manifest.json"
    if _is_complete(manifest, params, result, {"train": num_train, "val": num_val}):
        return result
    manifest.unlink(missing_ok=True)
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        coco = _write_split(out / split, split_index, count, height, width, num_classes, seed, colours)
        atomic_write_json(result[f"{split}_json"], coco)
    atomic_write_json(manifest, params)
    return result


def _validate(num_train: int, num_val: int, image_size: tuple[int, int], num_classes: int) -> None:
    if not isinstance(num_train, int) or num_train < 1:
        raise UserInputError(f"num_train must be a positive integer, got {num_train!r}")
    if not isinstance(num_val, int) or num_val < 1:
        raise UserInputError(f"num_val must be a positive integer, got {num_val!r}")
    if len(image_size) != 2 or min(image_size) < 32:
        raise UserInputError(f"image_size must be (height, width), each >= 32, got {image_size!r}")
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise UserInputError(
            f"num_classes must be between 1 and {len(SHAPE_CLASSES)}, got {num_classes!r}")


def _is_complete(manifest: Path, params: dict, result: dict, counts: dict[str, int]) -> bool:
    try:
        if json.loads(manifest.read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    if not (Path(result["train_json"]).is_file() and Path(result["val_json"]).is_file()):
        return False
    for split, count in counts.items():
        image_dir = Path(result[f"{split}_images"])
        present = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
        if any(f"{i:06d}.png" not in present for i in range(1, count + 1)):
            return False
    return True


def _write_split(image_dir: Path, split_index: int, count: int, height: int, width: int,
                 num_classes: int, seed: int, colours: str = "by_class") -> dict[str, Any]:
    image_dir.mkdir(parents=True, exist_ok=True)
    wanted = {f"{i:06d}.png" for i in range(1, count + 1)}
    for stale in os.listdir(image_dir):  # left by an earlier run with more images
        if _IMAGE_NAME.match(stale) and stale not in wanted:
            (image_dir / stale).unlink()
    images, annotations = [], []
    for image_id in range(1, count + 1):
        # One generator per image: an image depends only on (seed, split, index), so changing
        # num_train does not change the validation images.
        rng = np.random.default_rng([seed, split_index, image_id])
        pixels, objects = _draw_image(rng, height, width, num_classes, colours)
        file_name = f"{image_id:06d}.png"
        atomic_save_png(image_dir / file_name, pixels)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for category_id, segmentation, rle in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": float(mask_utils.area(rle)), "iscrowd": 0, "segmentation": segmentation,
            })
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(SHAPE_CLASSES[:num_classes])]
    return {"info": {"description": "detectors synthetic shapes", "seed": seed},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}


def _draw_image(rng: np.random.Generator, height: int, width: int, num_classes: int,
                colours: str = "by_class") -> tuple[np.ndarray, list[tuple[int, Any, dict]]]:
    pixels = _background(rng, height, width)
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        class_index = int(rng.integers(num_classes))
        box = _place(rng, height, width, placed)
        if box is None:
            continue
        polygon, rle = _rasterise(rng, SHAPE_CLASSES[class_index], box, height, width)
        mask = mask_utils.decode(rle).astype(bool)
        if not mask.any():
            continue
        placed.append(box)
        pixels[mask] = _paint(rng, colours, class_index, int(mask.sum()))
        if polygon is not None and rng.random() >= _RLE_PROB:
            segmentation: Any = [polygon]
        else:
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        objects.append((class_index + 1, segmentation, rle))
    return pixels, objects


def _paint(rng: np.random.Generator, colours: str, class_index: int, count: int) -> np.ndarray:
    """The pixels of one object: its class's colour, a random colour, or a speckled grey (``shifted``)."""
    if colours == "by_class":
        return np.array(_COLOURS[class_index], dtype=np.uint8)
    if colours == "random":
        return rng.integers(0, 256, size=3)
    # Dark or light, so it stands out from the mid-grey background; barely tinted; per-pixel speckle.
    level = rng.uniform(15, 60) if rng.random() < 0.5 else rng.uniform(190, 240)
    speckle = rng.choice(np.array([-35.0, 0.0, 35.0]), size=(count, 1))
    return np.clip(level + rng.uniform(-8, 8, size=3) + speckle, 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Mid-grey gradient, blotches and pixel noise: the detector cannot just threshold colour."""
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    cols = np.linspace(0.0, 1.0, width)[None, :, None]
    tilt = rng.uniform(-30, 30, size=(2, 3))
    image = rng.uniform(80, 160, size=3) + rows * tilt[0] + cols * tilt[1]
    blotches = rng.normal(0, 15, size=(height // 16 + 1, width // 16 + 1, 3))
    image = image + np.repeat(np.repeat(blotches, 16, axis=0), 16, axis=1)[:height, :width]
    image = image + rng.normal(0, 10, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, height: int, width: int,
           placed: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """A random box that keeps a 2-pixel gap to the others, so no mask is occluded."""
    low, high = _SIZE_RANGES[int(rng.choice(len(_SIZE_RANGES), p=_SIZE_PROBS))]
    high = min(high, min(height, width) - 4)
    low = min(low, high)
    w = int(rng.integers(low, high + 1))
    h = int(np.clip(round(w * rng.uniform(0.7, 1.4)), low, high))
    for _ in range(30):
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if all(x + w + 2 <= px or px + pw + 2 <= x or y + h + 2 <= py or py + ph + 2 <= y
               for px, py, pw, ph in placed):
            return x, y, w, h
    return None


def _rasterise(rng: np.random.Generator, shape: str, box: tuple[int, int, int, int],
               height: int, width: int) -> tuple[list[float] | None, dict]:
    """Return (polygon or None, compressed RLE) for one shape inside ``box``."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    if shape == "circle":
        rows, cols = np.mgrid[0:height, 0:width] + 0.5
        inside = ((cols - cx) / (w / 2)) ** 2 + ((rows - cy) / (h / 2)) ** 2 <= 1.0
        return None, mask_utils.encode(np.asfortranarray(inside.astype(np.uint8)))
    if shape == "square":
        points = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    elif shape == "triangle":
        points = [(x + w * rng.uniform(0.2, 0.8), y), (x + w, y + h), (x, y + h)]
    elif shape == "diamond":
        points = [(cx, y), (x + w, cy), (cx, y + h), (x, cy)]
    else:  # hexagon
        angles = np.arange(6) * np.pi / 3
        points = list(zip(cx + w / 2 * np.cos(angles), cy + h / 2 * np.sin(angles)))
    polygon = [round(float(v), 2) for point in points for v in point]
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return polygon, rle
