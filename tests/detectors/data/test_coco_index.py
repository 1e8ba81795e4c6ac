"""CocoDetection's index at scale: each image's annotations as the file has them, kept in one pickled buffer
that a DataLoader's forked processes read without copying it."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from detectors.data.coco import CocoDetection, PickledList, check_coco_files
from detectors.errors import UserInputError

psutil = pytest.importorskip("psutil")


def write_file(path, images: int, per_image: int, points: int = 20) -> dict:
    rng = np.random.default_rng(0)
    annotations = []
    for image_id in range(1, images + 1):
        for _ in range(per_image):
            polygon = np.round(rng.uniform(0, 60, size=2 * points), 2).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 3, "iscrowd": 0,
                                "bbox": [1.0, 2.0, 30.5, 40.25], "area": 5.0, "segmentation": [polygon]})
    data = {"images": [{"id": i, "file_name": f"sub/{i}.jpg", "height": 64, "width": 64} for i in range(1, images + 1)],
            "categories": [{"id": 3, "name": "c"}], "annotations": annotations}
    path.write_text(json.dumps(data))
    return data


def test_each_image_has_its_annotations_as_the_file_has_them(tmp_path):
    data = write_file(tmp_path / "a.json", images=5, per_image=3)
    dataset = CocoDetection(tmp_path, tmp_path / "a.json")
    assert dataset.ids == [1, 2, 3, 4, 5] and dataset.has_masks
    third = dataset.annotations(2)
    assert [a["id"] for a in third] == [7, 8, 9]
    assert third[0]["bbox"] == data["annotations"][6]["bbox"]
    assert third[0]["segmentation"] == data["annotations"][6]["segmentation"]  # the same floats, bit for bit
    for check in (dataset.check_files, lambda: check_coco_files(tmp_path, tmp_path / "a.json")):
        with pytest.raises(UserInputError, match=r"image file not found: .*/sub/1.jpg \(5 of 5 images listed in"):
            check()
    (tmp_path / "sub").mkdir()
    for image_id in range(1, 6):
        (tmp_path / "sub" / f"{image_id}.jpg").touch()
    dataset.check_files()
    check_coco_files(tmp_path, tmp_path / "a.json")
    assert dataset.coco.imgToAnns[3][0]["id"] == 7  # pycocotools' index, for evaluation, on first use


def test_a_repeated_image_id_is_one_line_naming_it(tmp_path):
    data = write_file(tmp_path / "a.json", images=2, per_image=1)
    data["images"][1]["id"] = 1
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(UserInputError, match=r"a.json: images\[1\] repeats image id 1$"):
        CocoDetection(tmp_path, tmp_path / "a.json")


def _private_growth_in_a_fork(read) -> int:
    """Bytes a forked child makes its own while it calls ``read()`` (as a DataLoader's processes do)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, leave without running any of the parent's cleanup
        try:
            before = psutil.Process().memory_full_info().uss
            read()
            os.write(writer, str(psutil.Process().memory_full_info().uss - before).encode())
        finally:
            os._exit(0)
    os.close(writer)
    grown = int(os.read(reader, 64))
    os.waitpid(pid, 0)
    return grown


def test_forked_loader_processes_read_the_index_without_copying_it(tmp_path):
    write_file(tmp_path / "a.json", images=3000, per_image=8, points=24)  # 1.15M coordinates
    dataset = CocoDetection(tmp_path, tmp_path / "a.json")

    def read_all(annotations_of):
        def read():
            for index in range(len(dataset)):
                for ann in annotations_of(index):
                    np.asarray(ann["segmentation"][0], dtype=np.float64)
        return read

    as_objects = [dataset.annotations(index) for index in range(len(dataset))]  # what a plain list would hold
    copied = _private_growth_in_a_fork(read_all(as_objects.__getitem__))
    kept = _private_growth_in_a_fork(read_all(dataset.annotations))
    assert copied > 20 * 2**20  # the reference counts of every float written: the objects' pages copied
    assert kept < copied / 5, (kept, copied)


def test_a_pickled_list_gives_back_what_it_was_given():
    records = [{"a": [1.5, 2.25]}, [], "x" * 1000, None]
    kept = PickledList(iter(records))
    assert len(kept) == 4 and [kept[i] for i in range(4)] == records
    assert kept.nbytes > 1000
