"""The synthetic upstream task: per-pixel shape, colour family and texture of objects on a textured background.

ImageNet-22K cannot be downloaded here, yet parameter-efficient tuning only makes sense on a backbone
that already knows something. This task teaches what dense prediction builds on: objectness, outlines,
colour and texture. Every image holds one to four objects (later ones may cover earlier ones) on the
downstream data's textured background; three label maps say, per pixel, which shape, colour family and
texture is there (0: background).

The shapes are deliberately *not* the downstream detection classes (square, circle, triangle,
diamond, hexagon): transfer means new classes. Images are drawn on the fly from
``numpy.random.default_rng([seed, split, step])``, so a batch depends only on the seed and its index.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from detectors.data.synthetic import _background
from detectors.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SHAPES = ("star", "cross", "ring", "pentagon", "arrow", "crescent", "l_shape", "t_shape", "trapezoid", "semicircle")
COLOUR_FAMILIES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta")
TEXTURES = ("solid", "stripes", "checker", "dots")
_HUES = (0.0, 0.08, 0.16, 0.33, 0.5, 0.64, 0.76, 0.87)  # centres of the colour families
_MEAN = (255 * np.array(IMAGENET_MEAN)).astype(np.float32)  # normalised as the detectors normalise
_STD = (255 * np.array(IMAGENET_STD)).astype(np.float32)


TRAIN, VAL = 0, 1  # two disjoint streams of images per seed


def upstream_batch(seed: int, split: int, index: int, batch_size: int,
                   image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of the ``split`` stream for ``seed``: normalised images (B, 3, S, S) and label maps
    (B, 3, S, S) of shape, colour family and texture (0: background, else the index in its tuple + 1)."""
    rng = np.random.default_rng([seed, split, index])
    images = np.empty((batch_size, image_size, image_size, 3), dtype=np.uint8)
    maps = np.zeros((batch_size, 3, image_size, image_size), dtype=np.int64)
    for i in range(batch_size):
        images[i], maps[i] = draw_upstream_image(rng, image_size)
    pixels = (images.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(maps)


def draw_upstream_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 image and its (3, size, size) label maps."""
    pixels = _background(rng, size, size)
    maps = np.zeros((3, size, size), dtype=np.int64)
    for _ in range(int(rng.integers(1, 5))):
        shape, family, texture = (int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOUR_FAMILIES))),
                                  int(rng.integers(len(TEXTURES))))
        mask = _shape_mask(rng, SHAPES[shape], size)
        if mask.sum() < 16:
            continue
        colour = _colour(rng, family)
        pattern = _texture(rng, TEXTURES[texture], size)
        shaded = np.where(pattern[..., None], colour, colour * 0.45)
        pixels[mask] = shaded[mask].astype(np.uint8)
        maps[:, mask] = np.array([shape + 1, family + 1, texture + 1])[:, None]
    return pixels, maps


def _colour(rng: np.random.Generator, family: int) -> np.ndarray:
    hue = (_HUES[family] + rng.uniform(-0.03, 0.03)) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    return np.array([red, green, blue], dtype=np.float32) * 255


def _texture(rng: np.random.Generator, texture: str, size: int) -> np.ndarray:
    """Where the object shows its full colour (True) or a darker shade (False)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    period = float(rng.uniform(5, 10))
    if texture == "stripes":
        angle = rng.uniform(0, math.pi)
        return np.sin((rows * math.cos(angle) + cols * math.sin(angle)) * 2 * math.pi / period) > 0
    if texture == "checker":
        return ((rows // (period / 2)) + (cols // (period / 2))) % 2 == 0
    if texture == "dots":
        return ((rows % period - period / 2) ** 2 + (cols % period - period / 2) ** 2) > (period / 4) ** 2
    return np.ones((size, size), dtype=bool)


def _shape_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """A filled shape of random size, rotation and place, as a boolean (size, size) mask."""
    radius = float(rng.uniform(0.1, 0.3)) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    angle = float(rng.uniform(0, 2 * math.pi))
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "ring":
        draw.ellipse(box, fill=1)
        inner = radius * rng.uniform(0.4, 0.65)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=1)
        offset = radius * rng.uniform(0.35, 0.6)
        ox, oy = cx + offset * math.cos(angle), cy + offset * math.sin(angle)
        draw.ellipse([ox - radius, oy - radius, ox + radius, oy + radius], fill=0)
    elif shape == "semicircle":
        degrees = math.degrees(angle)
        draw.pieslice(box, degrees, degrees + 180, fill=1)
    else:
        points = _OUTLINES[shape]
        cos, sin = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points],
                     fill=1)
    return np.asarray(image, dtype=bool)


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [((1.0 if i % 2 == 0 else inner) * math.cos(math.pi * i / points - math.pi / 2),
             (1.0 if i % 2 == 0 else inner) * math.sin(math.pi * i / points - math.pi / 2)) for i in range(2 * points)]


# Outlines in the unit box [-1, 1]^2, before scaling and rotation.
_OUTLINES = {
    "star": _star(),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "pentagon": [(math.cos(2 * math.pi * i / 5 - math.pi / 2), math.sin(2 * math.pi * i / 5 - math.pi / 2))
                 for i in range(5)],
    "arrow": [(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25), (-1, 0.25)],
    "l_shape": [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)],
    "t_shape": [(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)],
    "trapezoid": [(-0.5, -0.6), (0.5, -0.6), (1, 0.6), (-1, 0.6)],
}
