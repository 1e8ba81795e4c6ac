"""Pascal VOC to COCO conversion, so VOC trains and evaluates through the one COCO code path.

The E3VA paper reports VOC results as AP50; converting once and evaluating with COCOeval keeps a
single dataset class and a single evaluator. Boxes only: VOC detection has no instance masks.

Run as ``python -m detectors.data.voc VOCdevkit out.json --years 2007 2012``.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from detectors.data._atomic import atomic_write_json
from detectors.errors import UserInputError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
_CAT_IDS = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}


def convert_voc_to_coco(voc_root: str | os.PathLike, out_json: str | os.PathLike,
                        image_set: str = "trainval", years: Sequence[str] | None = None,
                        include_difficult: bool = False) -> dict[str, Any]:
    """Convert one image set of one or more VOC years into a COCO instances file.

    ``voc_root`` is a year directory (holding ``Annotations/``) when ``years`` is None, else a
    VOCdevkit holding ``VOC<year>/`` for each year. ``file_name`` is relative to ``voc_root``, so
    use ``voc_root`` as the dataset's image directory. Difficult objects become ``iscrowd=1``
    unless ``include_difficult``: training skips them and COCOeval ignores detections on them,
    as VOC's own protocol does.
    """
    root = Path(voc_root)
    if not root.is_dir():
        raise UserInputError(f"VOC root directory not found: {root}")
    year_dirs = [root] if not years else [root / f"VOC{year}" for year in years]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for year_dir in year_dirs:
        for name in _read_image_set(year_dir, image_set):
            image_id = len(images) + 1
            image, objects = _parse_xml(year_dir, name, include_difficult)
            image.update(id=image_id, file_name=(year_dir / "JPEGImages" / f"{name}.jpg")
                         .relative_to(root).as_posix())
            images.append(image)
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
    coco = {
        "info": {"description": f"Pascal VOC {image_set} converted to COCO"},
        "licenses": [], "images": images, "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "voc"}
                       for name, cid in _CAT_IDS.items()],
    }
    atomic_write_json(out_json, coco)
    return {"json": str(out_json), "image_dir": str(root), "num_images": len(images),
            "num_annotations": len(annotations), "class_names": list(VOC_CLASSES)}


def _read_image_set(year_dir: Path, image_set: str) -> list[str]:
    if not year_dir.is_dir():
        raise UserInputError(f"VOC year directory not found: {year_dir}")
    set_file = year_dir / "ImageSets" / "Main" / f"{image_set}.txt"
    if not set_file.is_file():
        raise UserInputError(f"VOC image set file not found: {set_file}")
    # Class-specific set files carry a second column (1/-1/0); the first is always the image id.
    return [line.split()[0] for line in set_file.read_text().splitlines() if line.strip()]


def _parse_xml(year_dir: Path, name: str, include_difficult: bool) -> tuple[dict, list[dict]]:
    xml_path = year_dir / "Annotations" / f"{name}.xml"
    if not xml_path.is_file():
        raise UserInputError(f"VOC annotation file not found: {xml_path}")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise UserInputError(f"{xml_path}: malformed XML ({exc})") from None
    width, height = _image_size(root, xml_path, year_dir / "JPEGImages" / f"{name}.jpg")
    objects = []
    for obj in root.iter("object"):
        cls = (obj.findtext("name") or "").strip()
        if cls not in _CAT_IDS:
            raise UserInputError(f"{xml_path}: unknown class name {cls!r} (not one of the 20 "
                                 f"VOC classes)")
        xmin, ymin, xmax, ymax = (_number(obj, f"bndbox/{k}", xml_path)
                                  for k in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise UserInputError(f"{xml_path}: object {cls!r} has an inverted bndbox "
                                 f"({xmin}, {ymin}, {xmax}, {ymax})")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        # VOC pixel coordinates are 1-based and inclusive: the box spans xmin..xmax.
        w, h = xmax - xmin + 1, ymax - ymin + 1
        objects.append({"category_id": _CAT_IDS[cls], "bbox": [xmin - 1, ymin - 1, w, h],
                        "area": w * h, "iscrowd": int(difficult and not include_difficult)})
    return {"width": width, "height": height}, objects


def _number(node: ET.Element, path: str, xml_path: Path) -> float:
    text = node.findtext(path)
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserInputError(f"{xml_path}: field <{path}> is missing or not a number "
                             f"({text!r})") from None


def _image_size(root: ET.Element, xml_path: Path, image_path: Path) -> tuple[int, int]:
    """Size from the XML; a few VOC files say 0x0, then read it from the JPEG header."""
    try:
        width = int(float(root.findtext("size/width") or 0))
        height = int(float(root.findtext("size/height") or 0))
    except ValueError:
        raise UserInputError(f"{xml_path}: <size> is not a number") from None
    if width > 0 and height > 0:
        return width, height
    if not image_path.is_file():
        raise UserInputError(f"{xml_path}: no <size>, and image not found: {image_path}")
    try:
        with Image.open(image_path) as image:
            return image.size
    except OSError as exc:
        raise UserInputError(f"{image_path}: cannot read image ({exc})") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("voc_root", help="VOC year directory, or VOCdevkit with --years")
    parser.add_argument("out_json", help="COCO instances JSON to write")
    parser.add_argument("--image-set", default="trainval", help="ImageSets/Main/<set>.txt")
    parser.add_argument("--years", nargs="*", default=None, help="e.g. 2007 2012")
    parser.add_argument("--include-difficult", action="store_true",
                        help="train and evaluate on difficult objects instead of ignoring them")
    args = parser.parse_args(argv)
    try:
        summary = convert_voc_to_coco(args.voc_root, args.out_json, args.image_set, args.years,
                                      args.include_difficult)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['json']}: {summary['num_images']} images, "
          f"{summary['num_annotations']} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
