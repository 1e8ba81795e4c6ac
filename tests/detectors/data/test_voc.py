"""VOC XML to COCO: 1-based inclusive pixel boxes, difficult objects, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from detectors.data import VOC_CLASSES, CocoDetection, convert_voc_to_coco
from detectors.data.voc import main
from detectors.errors import UserInputError

_XML = """<annotation><filename>{name}.jpg</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"""
_OBJ = """<object><name>{cls}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>
</bndbox></object>"""


def _voc_tree(root: Path, images: dict[str, list[tuple[str, tuple, int]]]) -> Path:
    year = root / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    for name, objects in images.items():
        body = "".join(_OBJ.format(cls=c, box=b, difficult=d) for c, b, d in objects)
        (year / "Annotations" / f"{name}.xml").write_text(
            _XML.format(name=name, w=500, h=375, objects=body))
    (year / "ImageSets/Main/trainval.txt").write_text("\n".join(images) + "\n")
    return year


_TWO_IMAGES = {
    "000005": [("chair", (263, 211, 324, 339), 0), ("person", (1, 1, 10, 20), 1)],
    "000007": [("car", (141, 50, 500, 330), 0)],
}


def test_two_files_convert_to_expected_coco_boxes(tmp_path):
    year = _voc_tree(tmp_path, _TWO_IMAGES)
    out = tmp_path / "voc_trainval.json"
    summary = convert_voc_to_coco(year, out)
    assert summary["num_images"] == 2 and summary["num_annotations"] == 3
    coco = COCO(str(out))
    assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == list(VOC_CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert [(coco.cats[a["category_id"]]["name"], a["bbox"], a["iscrowd"]) for a in anns] == [
        ("chair", [262, 210, 62, 129], 0),
        ("person", [0, 0, 10, 20], 1),  # difficult: kept as an ignored crowd region
        ("car", [140, 49, 360, 281], 0),
    ]
    assert coco.imgs[1] == {"width": 500, "height": 375, "id": 1,
                            "file_name": "JPEGImages/000005.jpg"}
    convert_voc_to_coco(year, out, include_difficult=True)
    assert [a["iscrowd"] for a in json.loads(out.read_text())["annotations"]] == [0, 0, 0]


def test_years_layout_and_cli(tmp_path, capsys):
    _voc_tree(tmp_path, _TWO_IMAGES)
    out = tmp_path / "out.json"
    assert main([str(tmp_path), str(out), "--years", "2007"]) == 0
    data = json.loads(out.read_text())
    assert data["images"][0]["file_name"] == "VOC2007/JPEGImages/000005.jpg"
    (tmp_path / "VOC2007/JPEGImages/000005.jpg").write_bytes(b"")  # dataset checks files
    with pytest.raises(UserInputError, match=r"000007\.jpg"):
        CocoDetection(tmp_path, out).check_files()
    assert main([str(tmp_path / "missing"), str(out)]) == 2
    assert "error: VOC root directory not found" in capsys.readouterr().err


def test_unknown_class_names_the_file(tmp_path):
    year = _voc_tree(tmp_path, {"000001": [("unicorn", (1, 1, 5, 5), 0)]})
    with pytest.raises(UserInputError, match=r"000001\.xml: unknown class name 'unicorn'"):
        convert_voc_to_coco(year, tmp_path / "out.json")


def test_malformed_xml_names_the_file(tmp_path):
    year = _voc_tree(tmp_path, _TWO_IMAGES)
    (year / "Annotations/000007.xml").write_text("<annotation><object>")
    with pytest.raises(UserInputError, match=r"000007\.xml: malformed XML"):
        convert_voc_to_coco(year, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(UserInputError, match="VOC root directory not found: .*nowhere"):
        convert_voc_to_coco(tmp_path / "nowhere", tmp_path / "out.json")
    year = _voc_tree(tmp_path, _TWO_IMAGES)
    with pytest.raises(UserInputError, match=r"image set file not found: .*test\.txt"):
        convert_voc_to_coco(year, tmp_path / "out.json", image_set="test")
    (year / "Annotations/000005.xml").unlink()
    with pytest.raises(UserInputError, match=r"annotation file not found: .*000005\.xml"):
        convert_voc_to_coco(year, tmp_path / "out.json")
    with pytest.raises(UserInputError, match="VOC year directory not found: .*VOC2012"):
        convert_voc_to_coco(tmp_path, tmp_path / "out.json", years=["2012"])
