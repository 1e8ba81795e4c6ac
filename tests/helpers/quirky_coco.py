"""A COCO file with every quirk real exports carry, and pictures in every mode, for tests at every level."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

H, W = 48, 64
CATEGORIES = [{"id": 5, "name": "kite"}, {"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}]  # gaps


def _square(x, y, side):
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def _annotation(ann_id, image_id, category, bbox, segmentation, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": bbox,
            "area": float(bbox[2] * bbox[3]), "iscrowd": 0, "segmentation": segmentation, **extra}


def write_quirky_coco(tmp_path: Path) -> tuple[Path, Path]:
    """One picture per mode, in sub-folders, and every annotation quirk, with their ids."""
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[8:24, 8:24] = (200, 40, 40)
    rgb[20:40, 36:56] = (40, 200, 40)
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "sub" / "palette.png")
    Image.fromarray(rgb).convert("L").save(root / "sub" / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((H, W), 128, np.uint8)])).save(root / "sub" / "deeper" / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(root / "gray16.png")  # mode I;16
    # a camera's portrait photo: stored landscape (W x H), EXIF orientation 6 says "rotate to portrait"
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1)))  # H x W -> W x H pixels
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(root / "portrait.jpg", exif=exif, quality=95)
    Image.fromarray(np.zeros_like(rgb)).save(root / "empty.png")

    images = [{"id": i, "file_name": name, "height": H, "width": W} for i, name in enumerate(
        ["rgb.png", "sub/palette.png", "sub/gray.png", "sub/deeper/rgba.png", "gray16.png", "portrait.jpg",
         "empty.png"], start=1)]
    crowd = mask_utils.encode(np.asfortranarray(np.pad(np.ones((10, 10), np.uint8), ((30, 8), (2, 52)))))
    crowd["counts"] = crowd["counts"].decode()
    annotations = [
        _annotation(1, 1, 5, [8, 8, 16, 16], _square(8, 8, 16)),
        _annotation(2, 1, 90, [36, 20, 20, 20], _square(36, 20, 20)),
        _annotation(3, 1, 1, [2, 30, 10, 10], crowd, iscrowd=1),             # crowd RLE: COCOeval's, not training's
        _annotation(4, 2, 5, [8, 8, 16, 16], [[8, 8, 24, 8], *_square(8, 8, 16)]),  # a 2-point polygon beside a good one
        _annotation(5, 2, 90, [36, 20, 20, 20], []),                         # no segmentation: left out of training
        _annotation(6, 3, 5, [8, 8, 0, 16], _square(8, 8, 16)),              # zero width: no box to train
        _annotation(7, 3, 90, [60, 20, 30, 20], _square(60, 20, 4)),          # runs off the image: clipped
        _annotation(8, 4, 1, [8, 8, 16, 16], [[8, 8, 16, 8, 24, 8]]),        # collinear: an empty mask, a box
        _annotation(9, 5, 5, [8, 8, 16, 16], _square(8, 8, 16), area=9999.0),  # area contradicts the box
        _annotation(10, 6, 90, [36, 20, 20, 20], _square(36, 20, 20)),
    ]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root, ann_file
