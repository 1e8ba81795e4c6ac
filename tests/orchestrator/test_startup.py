"""``bench-startup`` at a small fraction of COCO's and ADE20K's sizes: the command runs end to end, its
worker's loader processes read every annotation once, and a label folder checked once is not read again."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.startup import print_startup_table

pytest.importorskip("psutil")
ROOT = Path(__file__).resolve().parents[2]


def test_bench_startup_measures_driver_worker_and_loaders_on_both_datasets(tmp_path, capsys):
    done = subprocess.run([sys.executable, "-m", "orchestrator", "bench-startup", "--folder", str(tmp_path),
                           "--scale", "0.0005", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    train = json.loads((tmp_path / "scale-0.0005" / "coco" / "instances_train.json").read_text())
    assert len(train["images"]) == 59 and len(train["annotations"]) == 430
    coordinates = sum(4 + (sum(map(len, a["segmentation"])) if isinstance(a["segmentation"], list) else 0)
                      for a in train["annotations"])
    assert results["coco"]["worker"]["touched"] == coordinates  # every image's annotations, once
    for dataset in ("coco", "ade20k"):
        worker = results[dataset]["worker"]
        assert len(worker["loader_uss_gib"]) == 2 and worker["seconds"] > 0
        assert results[dataset]["driver"]["peak_gib"] >= 0
    assert set(results["ade20k"]) == {"driver", "again", "worker"}  # the second check, from the cache
    print_startup_table(results)
    assert "worker: datasets and classes" in capsys.readouterr().out


def test_a_scale_out_of_range_is_one_line():
    done = subprocess.run([sys.executable, "-m", "orchestrator", "bench-startup", "--scale", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0 and "--scale must be in (0, 1], got 0.0" in done.stderr
    assert "Traceback" not in done.stderr
