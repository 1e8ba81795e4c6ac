"""Reading pictures as people have them: any PIL mode, EXIF orientation applied, as 8-bit RGB."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# 16- and 32-bit integer modes: PIL's own conversion to RGB clips them at 255 instead of scaling
_WIDE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def read_rgb(source) -> Image.Image:
    """The picture at ``source`` (a path or a binary file) upright and in 8-bit RGB.

    The EXIF orientation is applied, as detectron2's ``read_image`` does, so a phone's portrait photo is
    portrait; palette, grayscale, CMYK and alpha modes become RGB (alpha dropped); 16-bit grayscale is
    scaled to 8 bits (a 32-bit ``I`` picture is read as 16-bit, the usual content of such files). Raises
    ``OSError`` for a file that is not a picture.
    """
    with Image.open(source) as opened:
        picture = ImageOps.exif_transpose(opened)
        if picture.mode in _WIDE:
            values = np.asarray(picture, dtype=np.float64) * (255.0 / _WIDE[picture.mode])
            picture = Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8))
        elif picture.mode == "P" and "transparency" in picture.info:
            picture = picture.convert("RGBA")  # PIL warns converting such a palette straight to RGB
        return picture.convert("RGB")
