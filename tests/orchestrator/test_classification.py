"""Image classification, the task added as one module (orchestrator/tasks/classification.py): a linear head
on an E3VA Swin trained with ``run``, scored again in one process and on a folder, predicted with pictures,
compared, and bad input refused in one line. ``serve`` answers it beside detection and segmentation runs
(test_after_training)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ray")
pytest.importorskip("mlflow")

from orchestrator.cli import main  # noqa: E402
from orchestrator.config import load_experiment  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "experiments" / "tiny_classification.yaml"


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout)


def untrained_top1(root: Path) -> float:
    """The same model before its first step (the run's seed), scored on the same split."""
    from detectors.classification import accuracies, predict_split
    cfg = load_experiment(TINY, [f"output_dir={root}", f"data.synthetic.root={root}/synthetic"])
    train, val = cfg.task.build_datasets(cfg)
    torch.manual_seed(cfg.seed)
    return accuracies([predict_split(cfg.task.build_model(cfg, train.num_classes), val)])["top1"]


def test_a_linear_head_on_an_e3va_swin_learns_the_shapes_through_run(trained_classification):
    trained = trained_classification
    metrics, params, tags = (trained["run"].data.metrics, trained["run"].data.params, trained["run"].data.tags)
    before = untrained_top1(trained["root"])
    print(f"synthetic classification, tiny E3VA Swin-T, 40 iterations: top-1 {before:.1f} untrained -> "
          f"{metrics['val_classification_top1']:.1f}")
    assert metrics["val_classification_top1"] >= max(70.0, before + 25)
    assert metrics["val_classification_top5"] == 100.0  # three classes: the top 5 holds them all
    assert params["task"] == "classification" and params["detector"] == "linear"
    assert tags["task"] == "image-classification"
    assert "top-1" in trained["stdout"] and "top-5" in trained["stdout"]  # the run's table


def test_evaluate_again_scores_what_the_run_logged(trained_classification, tmp_path):
    trained = trained_classification
    result = cli("evaluate", str(trained["run_dir"]), "--json", "--out", str(tmp_path / "again.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    figures, logged = json.loads(result.stdout), trained["run"].data.metrics
    assert figures.keys() == {"val_classification_top1", "val_classification_top5"}
    assert all(abs(figures[k] - logged[k]) <= 1e-9 for k in figures)


def test_predict_names_each_picture_as_evaluation_scored_it_and_draws_the_likeliest(trained_classification,
                                                                                     tmp_path):
    """``predict`` on every validation picture: its top-1 names score the top-1 the run logged; ``evaluate
    --data`` on a folder of some of them scores what predict's names for them score; a folder of other
    classes is refused in one line."""
    trained = trained_classification
    val = trained["root"] / "synthetic" / "val"
    images = sorted(val.rglob("*.png"))
    result = cli("predict", str(trained["run_dir"]), "--images", *map(str, images), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "out" / "tiny_classification"
    right = {}
    for image in images:
        found = json.loads((folder / f"{image.stem}.json").read_text())["classes"]
        scores = [c["score"] for c in found]
        assert len(found) == 3 and scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
        right[image] = found[0]["name"] == image.parent.name  # the class folder names the truth
        picture = np.asarray(Image.open(folder / f"{image.stem}.png").convert("RGB"))
        assert picture.shape[1] > Image.open(image).width + 40  # the legend beside the picture
    logged = trained["run"].data.metrics["val_classification_top1"]
    assert abs(100 * sum(right.values()) / len(images) - logged) <= 1e-9

    subset = tmp_path / "subset: yes"  # a path YAML would read as a mapping
    some = images[::2]
    for image in some:
        (subset / "val" / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, subset / "val" / image.parent.name)
    result = cli("evaluate", str(trained["run_dir"]), "--data", str(subset), "--json", "--out",
                 str(tmp_path / "subset.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = 100 * sum(right[image] for image in some) / len(some)
    assert abs(json.loads(result.stdout)["val_classification_top1"] - expected) <= 1e-9
    write_folder(tmp_path / "others", {"val": ["circle", "square", "star"]})
    wrong = cli("evaluate", str(trained["run_dir"]), "--data", str(tmp_path / "others"))
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert "'star' where the model has 'triangle'" in wrong.stderr


def test_compare_tabulates_top1_and_its_difference(trained_classification, tmp_path, capsys):
    assert main(["compare", "--experiment", "e3va-tiny-classification", "--tracking-uri", trained_classification["uri"],
                 "--out", str(tmp_path / "compare")]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" in out
    assert f"{trained_classification['run'].data.metrics['val_classification_top1']:.1f}" in out


def write_folder(root: Path, classes: dict[str, list[str]]) -> None:
    for split, names in classes.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / name / f"{split}-{name}.png")


@pytest.mark.parametrize("override, message", [
    ("data.scale=[64, 64]", "data.scale: a segmentation field, but this experiment's task is classification"),
    ("data.max_size=512", "data.max_size: a detection field"),
    ("model.engine=detectron2", "model.engine: a detection field, but this experiment's task is classification"),
    ("model.options={dropout: 0.1}", "model.options: dropout is not an option of linear"),
    ("data.root=x", "data: give either 'synthetic' or 'root'"),
])
def test_a_classification_experiment_with_a_field_it_cannot_use_fails_in_one_line(tmp_path, capsys, override,
                                                                                   message):
    code = main(["run", str(TINY), "--set", f"output_dir={tmp_path}", "--set", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "tiny_classification").exists()


@pytest.mark.parametrize("layout, message", [
    ({"train": ["circle", "square"], "val": ["circle", "star"]}, "train/ and val/ name different classes"),
    ({"train": ["circle"]}, "val: no such folder"),
])
def test_a_broken_image_folder_is_one_line_before_anything_is_written(tmp_path, capsys, layout, message):
    write_folder(tmp_path / "data", layout)
    code = main(["run", str(TINY), "--set", f"output_dir={tmp_path / 'out'}", "--set", "data.synthetic=null",
                 "--set", f"data.root={tmp_path / 'data'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "tiny_classification").exists()
