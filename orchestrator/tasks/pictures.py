"""Drawing what a model found: one colour per class, and a legend beside the picture."""
from __future__ import annotations

import colorsys
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

# Distinct colours for the first classes (Sasha Trubetskoy's list); further ones by golden-ratio hues
_FIRST = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
          (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def colour(index: int) -> tuple[int, int, int]:
    """The colour of class ``index`` (the same in every picture and label file)."""
    if index < len(_FIRST):
        return _FIRST[index]
    hue = (index * 0.618033988749895) % 1.0
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.65 + 0.35 * (index % 2), 0.95))


def palette(count: int) -> list[int]:
    """A PNG palette (mode ``P``) with ``colour(i)`` at entry i, as Pillow's ``putpalette`` takes it."""
    return [channel for index in range(count) for channel in colour(index)]


def with_legend(picture: Image.Image, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """``picture`` with a white panel on its right listing each (name, colour) as a swatch and its name."""
    size = max(12, min(24, picture.height // 12))
    font = _font(size)
    line = size + 6
    names_width = max((int(font.getlength(name)) for name, _ in entries), default=0)
    panel = size + 14 + names_width
    canvas = Image.new("RGB", (picture.width + panel, max(picture.height, 8 + line * len(entries))), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (name, rgb) in enumerate(entries):
        x, y = picture.width + 6, 4 + row * line
        draw.rectangle((x, y + 1, x + size, y + size + 1), fill=rgb, outline="black")
        draw.text((x + size + 6, y), name, fill="black", font=font)
    return canvas


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()
