"""Semantic segmentation through the same product: UPerNet on an E3VA Swin trained with ``run`` (two Ray
Train workers), scored again in one process, swept over E3VA ranks and compared, and bad input refused in
one line before anything is written."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytest.importorskip("transformers")
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator.cli import main  # noqa: E402
from orchestrator.config import load_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "tiny_segmentation.yaml"


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout)


def sets(*overrides: str) -> list[str]:
    return sum((["--set", item] for item in overrides), [])


@pytest.fixture(scope="module")
def trained(trained_segmentation):
    """The tiny segmentation experiment as a user runs it, on two Ray Train workers (conftest; the serve
    test of test_after_training serves it too)."""
    return trained_segmentation


def untrained_miou(root: Path) -> float:
    """The same model before its first step (the run's seed), scored on the same split."""
    from detectors.segmentation.evaluation import predict_split
    cfg = load_experiment(TINY, [f"output_dir={root}", f"data.synthetic.root={root}/synthetic"])
    train, val = cfg.task.build_datasets(cfg)
    torch.manual_seed(cfg.seed)
    model = cfg.task.build_model(cfg, train.num_classes)
    return predict_split(model, val).scores()["mIoU"]


def test_upernet_on_an_e3va_swin_learns_the_synthetic_shapes_through_run(trained):
    metrics = trained["run"].data.metrics
    before = untrained_miou(trained["root"])
    print(f"synthetic segmentation, tiny E3VA Swin-T UPerNet, 120 iterations: mIoU {before:.1f} untrained -> "
          f"{metrics['val_segmentation_mIoU']:.1f} (mAcc {metrics['val_segmentation_mAcc']:.1f}, "
          f"aAcc {metrics['val_segmentation_aAcc']:.1f})")
    assert metrics["val_segmentation_mIoU"] >= before + 30 and metrics["val_segmentation_mIoU"] >= 50
    params, tags = trained["run"].data.params, trained["run"].data.tags
    assert params["task"] == "segmentation" and params["detector"] == "upernet" and "engine" not in params
    assert tags["task"] == "semantic-segmentation" and metrics["world_size"] == 2
    # fast steps report in bundles; every step's figures still reach MLflow
    history = MlflowClient(trained["uri"]).get_metric_history(trained["run"].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 121))
    assert "mIoU" in trained["stdout"] and "aAcc" in trained["stdout"]  # the run's table
    evaluation = json.loads((trained["run_dir"] / "evaluation.json").read_text())
    for name in ("background", "square", "circle", "triangle"):  # per-class IoU in the evaluation artifact
        assert f"val/segmentation/IoU/{name}" in evaluation
    artifacts = {a.path for a in MlflowClient(trained["uri"]).list_artifacts(trained["run"].info.run_id)}
    assert "evaluation.json" in artifacts


def test_one_process_scores_the_mIoU_the_two_workers_scored(trained):
    """The two ranks each predicted half the split and summed their confusion matrices; ``evaluate``
    predicts all of it in one process from the run's checkpoint."""
    result = cli("evaluate", str(trained["run_dir"]), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads(result.stdout)
    logged = trained["run"].data.metrics
    assert {k for k in again if not k.startswith("val_segmentation_IoU")} == \
        {"val_segmentation_mIoU", "val_segmentation_mAcc", "val_segmentation_aAcc"}
    for key in ("val_segmentation_mIoU", "val_segmentation_mAcc", "val_segmentation_aAcc",
                "val_segmentation_IoU_square"):
        assert abs(again[key] - logged[key]) <= 1e-6, key
    assert logged["eval_images_rank0"] == logged["eval_images_rank1"] == 8


def test_predict_writes_the_label_maps_evaluation_scores_and_pictures_with_a_legend(trained, tmp_path):
    """``predict`` on every validation image: its label PNGs score the aAcc the run logged (the same model,
    the same resizing), its JSON's RLEs hold the same pixels, and each picture has a legend in the label
    PNG's colours beside the image. ``evaluate --data`` on a folder of some of those images scores what
    their label PNGs score."""
    from orchestrator.tasks.segmentation import label_map
    synthetic = trained["root"] / "synthetic"
    images = sorted((synthetic / "images" / "validation").iterdir())
    out = tmp_path / "out"
    result = cli("predict", str(trained["run_dir"]), "--images", *map(str, images), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "tiny_segmentation"
    correct = []
    for image in images:
        label_file = Image.open(folder / f"{image.stem}_labels.png")
        predicted = np.asarray(label_file)
        truth = np.asarray(Image.open(synthetic / "annotations" / "validation" / f"{image.stem}.png"))
        correct.append((int((predicted == truth).sum()), truth.size))
        found = json.loads((folder / f"{image.stem}.json").read_text())
        assert sum(c["pixels"] for c in found["classes"]) == predicted.size
        assert np.array_equal(label_map(found).numpy(), predicted)
        picture = Image.open(folder / f"{image.stem}.png").convert("RGB")
        width = Image.open(image).width
        assert picture.width > width + 40  # the legend's panel
        legend = np.asarray(picture)[:, width:]
        colours = {tuple(c) for c in legend.reshape(-1, 3)}
        palette = label_file.getpalette()
        for region in found["classes"]:  # each class found has its swatch, in its label-file colour
            assert tuple(palette[3 * region["id"]: 3 * region["id"] + 3]) in colours
    logged = trained["run"].data.metrics["val_segmentation_aAcc"]
    assert abs(100 * sum(c for c, _ in correct) / sum(n for _, n in correct) - logged) <= 1e-6

    subset = tmp_path / "subset #1"  # a path YAML would cut at '#'
    for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):
        (subset / kind / "validation").mkdir(parents=True)
        for image in images[:6]:
            shutil.copy(synthetic / kind / "validation" / f"{image.stem}{suffix}", subset / kind / "validation")
    result = cli("evaluate", str(trained["run_dir"]), "--data", str(subset), "--json", "--out",
                 str(tmp_path / "subset.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = 100 * sum(c for c, _ in correct[:6]) / sum(n for _, n in correct[:6])
    assert abs(json.loads(result.stdout)["val_segmentation_aAcc"] - expected) <= 1e-6
    wrong = cli("evaluate", str(trained["run_dir"]), "--data", str(tmp_path / "absent"))
    assert wrong.returncode == 2 and "--data folder:" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_sweep_of_two_e3va_ranks_ends_with_two_children_holding_mIoU_and_compare_prints_them(tmp_path, ray_local,
                                                                                              capsys):
    from orchestrator.sweep import load_sweep, run_sweep
    spec = {"name": "ranks", "base": str(TINY), "overrides": {"tracking.experiment": "segmentation-ranks"},
            "space": {"tuning.hyperparameters.rank": {"grid": [4, 8]}}, "max_concurrent_trials": 2}
    path = tmp_path / "ranks.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path, ["schedule.iterations=2", "checkpoint.period=0", "data.synthetic.num_train=8",
                              "data.synthetic.num_val=4", f"output_dir={tmp_path}",
                              f"data.synthetic.root={tmp_path}/synthetic"])
    outcome = run_sweep(sweep)
    assert outcome["counts"]["failed"] == 0
    client = MlflowClient(outcome["tracking_uri"])
    parent = client.get_run(outcome["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{outcome['parent_run_id']}'")
    assert sorted(r.data.params["rank"] for r in runs) == ["4", "8"]
    assert all("val_segmentation_mIoU" in r.data.metrics for r in runs)
    capsys.readouterr()
    assert main(["compare", "--parent", outcome["parent_run_id"], "--tracking-uri", outcome["tracking_uri"],
                 "--out", str(tmp_path / "compare")]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("run "))
    assert "mIoU" in header and "mAcc" in header and "AP box" not in header
    for run in runs:
        line = next(line for line in printed.splitlines() if line.startswith(run.info.run_name))
        assert f"{run.data.metrics['val_segmentation_mIoU']:.1f}" in line.split()
    assert (tmp_path / "compare" / "ap_vs_memory.png").is_file()


def write_ade(root: Path, labels_by_stem: dict, split: str) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for stem, labels in labels_by_stem.items():
        Image.fromarray(np.zeros((*labels.shape, 3), np.uint8)).save(root / "images" / split / f"{stem}.jpg")
        Image.fromarray(labels.astype(np.uint8)).save(root / "annotations" / split / f"{stem}.png")


def ade_folder(root: Path) -> Path:
    for split in ("training", "validation"):
        write_ade(root, {f"ADE_{split}_1": np.array([[0, 1, 2]] * 3)}, split)
    return root


def broken_without_annotations(root: Path) -> str:
    import shutil
    shutil.rmtree(ade_folder(root) / "annotations")
    return "annotations/training is missing"


def broken_image_without_labels(root: Path) -> str:
    (ade_folder(root) / "annotations" / "validation" / "ADE_validation_1.png").unlink()
    return "ADE_validation_1.jpg has no label file"


def broken_label_value(root: Path) -> str:
    write_ade(ade_folder(root), {"ADE_training_2": np.array([[0, 7]] * 3)}, "training")
    return "ADE_training_2.png: label value 7 is not a class of this dataset (2 classes, 0 ignored; 255 = ignore)"


@pytest.mark.parametrize("break_it", [broken_without_annotations, broken_image_without_labels, broken_label_value])
def test_a_broken_ade20k_folder_is_one_line_naming_the_file_before_anything_is_written(tmp_path, capsys, break_it):
    message = break_it(tmp_path / "ADEChallengeData2016")
    out = tmp_path / "out"
    code = main(["run", str(TINY), *sets("data.synthetic=null", f"data.root={tmp_path}/ADEChallengeData2016",
                                         "data.classes=[wall, sky]", "data.reduce_zero_label=true",
                                         f"output_dir={out}")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("data.max_size=512", "data.max_size: a detection field, but this experiment's task is segmentation"),
    ("data.train_json=a.json", "data.train_json: a detection field"),
    ("model.engine=detectron2", "model.engine: a detection field"),
    ("data.root=x", "data: give either 'synthetic' or 'root'"),
    ("model.options={dropout: 0.1}", "model.options: dropout is not an option of upernet"),
    ("schedule.batch_size=1", "UPerNet needs at least 2 images per worker"),
    ("schedule.decay_at=[10]", "decay_at: poly decays every iteration"),
    ("model.task=detection", "'upernet' is not a detection model"),
])
def test_a_segmentation_experiment_with_a_field_it_cannot_use_fails_in_one_line(tmp_path, capsys, override, message):
    out = tmp_path / "out"
    assert main(["run", str(TINY), *sets(override, f"output_dir={out}",
                                         f"data.synthetic.root={tmp_path}/synthetic")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "synthetic").exists()


def test_a_detection_experiment_with_a_segmentation_field_fails_in_one_line(tmp_path, capsys):
    assert main(["run", str(ROOT / "experiments" / "tiny.yaml"), *sets("data.crop_size=[64, 64]",
                                                                       f"output_dir={tmp_path}/out")]) == 2
    # classification reads data.crop_size too: the line names both tasks that do
    assert "data.crop_size: a classification and segmentation field, but this experiment's task is detection" in \
        capsys.readouterr().err


@pytest.mark.parametrize("poll_interval, bundle_seconds", [(None, 2.5), ("0.4", 0.5)])
def test_fast_steps_share_a_report_and_slow_ones_report_alone(monkeypatch, poll_interval, bundle_seconds):
    """A report covers a little more than one of Ray Train's poll intervals (2 s unless set)."""
    from orchestrator.train_loop import MAX_STEPS_PER_REPORT, POLL_INTERVAL_VARIABLE, steps_per_report
    if poll_interval is None:
        monkeypatch.delenv(POLL_INTERVAL_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(POLL_INTERVAL_VARIABLE, poll_interval)
    assert steps_per_report(bundle_seconds * 2) == 1 and steps_per_report(bundle_seconds) == 1
    assert steps_per_report(bundle_seconds / 10) == 10 and steps_per_report(0.0) == MAX_STEPS_PER_REPORT


def test_poly_decay_follows_the_warm_up_to_zero_at_the_last_iteration():
    from orchestrator.train_loop import lr_factor
    cfg = load_experiment(TINY, ["schedule.iterations=100", "schedule.warmup_iterations=10",
                                 "schedule.warmup_factor=0.000001", "schedule.power=1.0"])
    factor = lr_factor(cfg, iterations_per_epoch=16)
    assert factor(0) == pytest.approx(1e-6)
    assert factor(5) == pytest.approx((1e-6 * 0.5 + 0.5) * 0.95)  # warm-up scales the decayed rate (mmcv)
    assert factor(10) == pytest.approx(0.9) and factor(50) == pytest.approx(0.5) and factor(100) == 0.0
    squared = lr_factor(load_experiment(TINY, ["schedule.iterations=100", "schedule.warmup_iterations=0",
                                               "schedule.power=2.0"]), 16)
    assert squared(50) == pytest.approx(0.25)


def test_the_papers_segmentation_and_voc_recipes_load_as_their_tasks():
    for method in ("full", "fixed", "lorand", "e3va"):
        ade = load_experiment(ROOT / "experiments" / f"ade20k_upernet_swin_l_{method}.yaml")
        assert ade.task.name == "segmentation" and ade.tuning.method == method
        assert ade.schedule.iterations == 160_000 and sum(ade.batch_sizes()) == 16 and ade.schedule.lr == 6e-5
        assert ade.schedule.policy == "poly" and ade.schedule.warmup_iterations == 1500
        assert ade.task.num_classes(ade) == 150 and ade.data.reduce_zero_label
        voc = load_experiment(ROOT / "experiments" / f"voc_faster_rcnn_swin_l_{method}.yaml")
        assert voc.task.name == "detection" and voc.model.detector == "faster_rcnn" and voc.tuning.method == method
    sweep = yaml.safe_load((ROOT / "experiments" / "ablations" / "e3va_rank_segmentation.yaml").read_text())
    from orchestrator.sweep import load_sweep
    loaded = load_sweep(ROOT / "experiments" / "ablations" / "e3va_rank_segmentation.yaml")
    assert loaded.base.task.name == "segmentation" and len(loaded.configs) == 3
    assert sweep["space"]["tuning.hyperparameters.rank"]["grid"] == [8, 16, 32]


def test_a_checkpoint_keeps_the_batchnorm_statistics_the_heads_learned(tmp_path):
    """UPerNet's heads normalise with BatchNorm: its running statistics train as the weights do, and a
    checkpoint without them predicts something else."""
    from orchestrator.checkpointing import load_checkpoint, save_checkpoint
    cfg = load_experiment(TINY, [f"data.synthetic.root={tmp_path}/synthetic"])
    torch.manual_seed(0)
    model = cfg.task.build_model(cfg, 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    images, labels = torch.randn(2, 3, 64, 64) * 3 + 1, torch.randint(0, 4, (2, 64, 64))
    model.train()(images, labels)  # running statistics move; no step needed
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, 1, {})
    torch.manual_seed(0)
    again = cfg.task.build_model(cfg, 4)
    load_checkpoint(tmp_path / "checkpoint", again, None, None, {})
    with torch.no_grad():
        assert torch.equal(model.eval()(images), again.eval()(images))
