"""``python -m orchestrator bench-startup``: what a run does before its first step, at COCO and ADE20K size.

It writes (once, then reuses) a COCO-sized annotation file - train2017's 118,287 images and 860,001
annotations, polygons as long as COCO's, one crowd RLE in a hundred, category ids 1..90 with COCO's
gaps - beside empty placeholder image files, and an ADE20K-sized folder of 20,210 + 2,000 label PNGs
at 512x683. Then it measures, each in a fresh process (``spawn``), the real code paths of a run:

- the driver's check (``task.check_files``: reading and validating the annotations, every image listed
  being there, every label PNG's values) - seconds and peak resident memory;
- a Ray Train worker's start (``task.build_datasets`` and the class check) - seconds and the resident
  memory the index adds;
- that worker's data-loading processes (forked, as PyTorch's DataLoader does on Linux) reading every
  image's annotations once - the memory each one holds on its own (USS): a copy of the index shows
  here, as Python's reference counts write to every object a forked process touches.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detectors.data._atomic import atomic_write_bytes, atomic_write_json

COCO_TRAIN = (118_287, 860_001)  # train2017: images, annotations
COCO_VAL = (5_000, 36_781)  # val2017
ADE20K = (20_210, 2_000)  # training, validation label PNGs
ADE20K_SIZE = (512, 683)  # height, width: ADE20K's most common shape
# COCO's 80 category ids: 1..90 with ten gaps
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
_SHAPES = [(480, 640), (427, 640), (640, 480), (375, 500), (426, 640), (424, 640), (640, 427), (512, 640)]
_VERSION = 1
_GIB = 2**30


def write_coco_sized(folder: str | Path, train: tuple[int, int] = COCO_TRAIN, val: tuple[int, int] = COCO_VAL,
                     seed: int = 0) -> dict[str, str]:
    """COCO-shaped ``instances_{train,val}.json`` and empty image files, written once (a manifest says so)."""
    folder = Path(folder)
    params = {"version": _VERSION, "train": list(train), "val": list(val), "seed": seed}
    paths = {f"{split}_{kind}": str(folder / (f"instances_{split}.json" if kind == "json" else split))
             for split in ("train", "val") for kind in ("images", "json")}
    if _manifest_matches(folder / "coco_manifest.json", params):
        return paths
    for index, (split, (images, annotation_count)) in enumerate((("train", train), ("val", val))):
        rng = np.random.default_rng([seed, index])
        shapes = [_SHAPES[i] for i in rng.integers(len(_SHAPES), size=images)]
        _write_coco_json(Path(paths[f"{split}_json"]), rng, shapes, annotation_count)
        image_dir = Path(paths[f"{split}_images"])
        image_dir.mkdir(parents=True, exist_ok=True)
        for image_id in range(1, images + 1):
            (image_dir / f"{image_id:012d}.jpg").touch()
    atomic_write_json(folder / "coco_manifest.json", params)
    return paths


def _write_coco_json(path: Path, rng: np.random.Generator, shapes: list[tuple[int, int]], count: int) -> None:
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w} for i, (h, w) in enumerate(shapes, 1)]
    categories = [{"id": c, "name": f"class {c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]
    owners = np.sort(rng.integers(1, len(shapes) + 1, size=count))
    head = json.dumps({"info": {"description": "COCO-sized synthetic annotations"}, "images": images,
                       "categories": categories})
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as out:
        out.write(head[:-1] + ', "annotations": [')
        for start in range(0, count, 20_000):
            chunk = [_annotation(rng, ann_id, int(owner), shapes[owner - 1])
                     for ann_id, owner in enumerate(owners[start:start + 20_000], start + 1)]
            out.write(("," if start else "") + json.dumps(chunk)[1:-1])
        out.write("]}")
    os.replace(tmp, path)


def _annotation(rng: np.random.Generator, ann_id: int, image_id: int, shape: tuple[int, int]) -> dict[str, Any]:
    """An ellipse-like polygon of 4 to 52 points (COCO's average is about 28), or one crowd RLE in a hundred."""
    height, width = shape
    w, h = rng.uniform(8, width / 2), rng.uniform(8, height / 2)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    ann = {"id": ann_id, "image_id": image_id, "category_id": int(rng.choice(COCO_CATEGORY_IDS)), "iscrowd": 0,
           "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)], "area": round(np.pi * w * h / 4, 2)}
    if rng.random() < 0.01:
        ann.update(iscrowd=1, segmentation=_rectangle_rle(int(x0), int(y0), int(w), int(h), height, width))
        return ann
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(4, 53))))
    xs, ys = x0 + w / 2 * (1 + np.cos(angles)), y0 + h / 2 * (1 + np.sin(angles))
    ann["segmentation"] = [np.round(np.stack([xs, ys], 1).reshape(-1), 2).tolist()]
    return ann


def _rectangle_rle(x: int, y: int, w: int, h: int, height: int, width: int) -> dict[str, Any]:
    """Uncompressed column-major RLE of a rectangle, as COCO's crowd annotations are stored."""
    counts = [x * height + y]
    for _ in range(w - 1):
        counts += [h, height - h]
    counts += [h, height * width - sum(counts) - h]
    return {"counts": counts, "size": [height, width]}


def write_ade20k_sized(folder: str | Path, splits: tuple[int, int] = ADE20K, size: tuple[int, int] = ADE20K_SIZE,
                       seed: int = 0) -> str:
    """An ADEChallengeData2016-layout folder: label PNGs of 0..150 regions, empty image files; written once."""
    from detectors.segmentation.data import _encode
    folder = Path(folder)
    params = {"version": _VERSION, "splits": list(splits), "size": list(size), "seed": seed}
    if _manifest_matches(folder / "ade_manifest.json", params):
        return str(folder)
    height, width = size
    for index, (split, count) in enumerate(zip(("training", "validation"), splits)):
        rng = np.random.default_rng([seed, index])
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        for number in range(1, count + 1):
            stem = f"ADE_{split[:5]}_{number:08d}"
            (folder / "images" / split / f"{stem}.jpg").touch()
            coarse = rng.integers(0, 151, size=(height // 32 + 1, width // 32 + 1), dtype=np.uint8)
            labels = np.kron(coarse, np.ones((32, 32), np.uint8))[:height, :width]
            atomic_write_bytes(folder / "annotations" / split / f"{stem}.png", _encode(labels, "PNG"))
    atomic_write_json(folder / "ade_manifest.json", params)
    return str(folder)


def _manifest_matches(path: Path, params: dict) -> bool:
    try:
        return json.loads(path.read_text()) == params
    except (OSError, ValueError):
        return False


# --- measuring, each role in a fresh process ---------------------------------------------------------------

def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_driver(experiment: str, overrides: list[str]) -> dict[str, float]:
    from orchestrator.config import load_experiment
    cfg = load_experiment(experiment, overrides)
    before, start = _rss(), time.perf_counter()
    cfg.task.check_files(cfg)
    return {"seconds": time.perf_counter() - start, "peak_gib": (_peak_rss() - before) / _GIB,
            "rss_gib": (_rss() - before) / _GIB}


def _measure_worker(experiment: str, overrides: list[str], loader_workers: int) -> dict[str, Any]:
    import psutil

    from orchestrator.config import load_experiment
    cfg = load_experiment(experiment, overrides)
    before, start = _rss(), time.perf_counter()
    train, _ = cfg.task.build_datasets(cfg)
    cfg.task.classes(train)
    result: dict[str, Any] = {"seconds": time.perf_counter() - start, "index_gib": (_rss() - before) / _GIB,
                              "peak_gib": (_peak_rss() - before) / _GIB}
    loader = torch.utils.data.DataLoader(_Touch(train), batch_size=256, num_workers=loader_workers,
                                         multiprocessing_context="fork", collate_fn=sum)
    batches = iter(loader)
    touched = sum(next(batches) for _ in range(len(loader) - loader_workers))  # every loader done, none gone
    loaders = psutil.Process().children()
    result["loader_uss_gib"] = [child.memory_full_info().uss / _GIB for child in loaders]
    result["touched"] = touched + sum(batches)
    return result


class _Touch(torch.utils.data.Dataset):
    """Reads each image's annotations - every box and polygon coordinate - as ``__getitem__`` does before it
    rasterizes masks, or a label file's path; no picture is decoded. Returns the numbers read."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> int:
        if not hasattr(self.dataset, "annotations"):
            return len(str(self.dataset.label_path(index)))
        read = 0
        for ann in self.dataset.annotations(index):
            read += np.asarray(ann["bbox"], dtype=np.float64).size
            if isinstance(ann.get("segmentation"), list):
                read += sum(np.asarray(polygon, dtype=np.float64).size for polygon in ann["segmentation"])
        return read


def _in_fresh_process(target, *args):
    """``target(*args)`` in a new interpreter, so its memory figures hold nothing of this process."""
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(target, *args).result()


def _scaled(sizes: tuple[int, ...], scale: float) -> tuple[int, ...]:
    return tuple(max(2, round(size * scale)) for size in sizes)


def run_startup_bench(folder: str | Path, loader_workers: int = 2, coco: bool = True, ade20k: bool = True,
                      scale: float = 1.0, progress=print) -> dict[str, dict]:
    folder, results = Path(folder) / (f"scale-{scale:g}" if scale != 1 else ""), {}
    root = Path(__file__).resolve().parents[1] / "experiments"
    if coco:
        start = time.perf_counter()
        paths = write_coco_sized(folder / "coco", _scaled(COCO_TRAIN, scale), _scaled(COCO_VAL, scale))
        progress(f"COCO-sized files in {folder / 'coco'} ({time.perf_counter() - start:.0f} s to write or find)")
        overrides = [f"data.{key}={value}" for key, value in paths.items()] + ["backbone.weights=null"]
        experiment = str(root / "coco_cascade_mask_rcnn_swin_b_e3va.yaml")
        results["coco"] = {"driver": _in_fresh_process(_measure_driver, experiment, overrides),
                           "worker": _in_fresh_process(_measure_worker, experiment, overrides, loader_workers)}
    if ade20k:
        start = time.perf_counter()
        ade_root = write_ade20k_sized(folder / "ADEChallengeData2016", _scaled(ADE20K, scale))
        progress(f"ADE20K-sized files in {ade_root} ({time.perf_counter() - start:.0f} s to write or find)")
        checked = folder / "outputs"
        shutil.rmtree(checked / "checked-labels", ignore_errors=True)  # the first check reads every label
        overrides = [f"data.root={ade_root}", "backbone.weights=null", f"output_dir={checked}"]
        experiment = str(root / "ade20k_upernet_swin_l_e3va.yaml")
        results["ade20k"] = {"driver": _in_fresh_process(_measure_driver, experiment, overrides),
                             "again": _in_fresh_process(_measure_driver, experiment, overrides),
                             "worker": _in_fresh_process(_measure_worker, experiment, overrides, loader_workers)}
    return results


def print_startup_table(results: dict[str, dict]) -> None:
    """One row per role and dataset, against the targets (60 s; 2 GiB of index per worker; none copied)."""
    from tabulate import tabulate
    rows = []
    for dataset, roles in results.items():
        driver, worker = roles["driver"], roles["worker"]
        rows.append([dataset, "driver: check files", f"{driver['seconds']:.1f}", f"{driver['peak_gib']:.2f}",
                     f"{driver['rss_gib']:.2f}", "-"])
        if "again" in roles:
            rows.append([dataset, "driver: same folder again", f"{roles['again']['seconds']:.1f}",
                         f"{roles['again']['peak_gib']:.2f}", f"{roles['again']['rss_gib']:.2f}", "-"])
        rows.append([dataset, "worker: datasets and classes", f"{worker['seconds']:.1f}", f"{worker['peak_gib']:.2f}",
                     f"{worker['index_gib']:.2f}", " / ".join(f"{uss:.3f}" for uss in worker["loader_uss_gib"])])
    print(tabulate(rows, headers=["dataset", "what", "seconds", "peak GiB", "held GiB", "each loader's own GiB"]))
    print("targets: under 60 s; under 2 GiB held per worker; loaders' own memory far below the index's "
          "(the index is not copied into them)")
