"""Experiment YAML: overrides and one-line errors naming the file and the field."""
import subprocess
import sys
from pathlib import Path

import pytest

from detectors.errors import UserInputError
from orchestrator.config import load_experiment

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_demo_experiment_loads_and_overrides_apply():
    cfg = load_experiment(DEMO, ["schedule.lr=0.01", "tuning.hyperparameters.rank=16", "scaling.workers=2"])
    assert cfg.schedule.lr == 0.01 and cfg.tuning.hyperparameters == {"rank": 16} and cfg.scaling.workers == 2
    assert cfg.tuning.method == "e3va" and cfg.model.detector == "mask_rcnn"


@pytest.mark.parametrize("text, overrides, expected", [
    ("data: {synthetic: {}}\nschedule: {iterations: [1\n", [], "not valid YAML at line"),
    ("data: {synthetic: {}}\nschedule: {iterations: 10, lr: fast}\n", [], "schedule.lr: .*got 'fast'"),
    ("data: {synthetic: {}}\nschedule: {iterations: 10}\nschedul: {}\n", [], "schedul: unknown key"),
    ("data: {synthetic: {}}\nschedule: {iterations: 10}\n", ["tuning.method=e4va"], "unknown tuning method 'e4va'"),
    ("data: {synthetic: {}}\nschedule: {iterations: 10}\n", ["tuning.hyperparameters.kernel=8"],
     "unknown hyperparameter 'kernel'"),
    ("data: {synthetic: {}}\n", [], "schedule: required field is missing"),
    ("data: {synthetic: {}}\nschedule: {iterations: 10, epochs: 2}\n", [], "exactly one of 'iterations'"),
    ("data: {}\nschedule: {iterations: 10}\n", [], "either 'synthetic' or all of"),
    ("data: {synthetic: {}}\nschedule: {iterations: 10}\n", ["backbone.upstream={stepz: 5}"],
     "backbone.upstream.stepz: unknown key"),
    ("data: {synthetic: {}}\nschedule: {iterations: 10}\n", ["backbone.upstream={}", "backbone.weights=w.pth"],
     "backbone: give either weights or upstream"),
    ("data: {synthetic: {root: 'out/{size}'}}\nschedule: {iterations: 10}\n", [],
     "data.synthetic: root: 'out/{size}' names 'size'"),
])
def test_bad_experiments_name_the_file_and_field(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(UserInputError, match=expected) as info:
        load_experiment(path, overrides)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("field, value", [("data.train_json", "missing/instances.json"),
                                          ("backbone.weights", "missing/swin.pth")])
def test_run_refuses_missing_files_before_creating_anything(tmp_path, field, value):
    text = DEMO.read_text()
    args = [sys.executable, "-m", "orchestrator", "run", str(DEMO), "--set", f"output_dir={tmp_path}/out",
            "--set", f"{field}={value}"]
    if field.startswith("data."):
        args += ["--set", "data.synthetic=null", "--set", f"data.train_images={tmp_path}",
                 "--set", f"data.val_images={tmp_path}", "--set", f"data.val_json={tmp_path}/v.json"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and value in lines[0], result.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()  # no half-created run
    assert text == DEMO.read_text()


@pytest.mark.parametrize("overrides, expected", [
    (["backbone.name=swin_t", "backbone.overrides={}"], "backbone.upstream: pre-trains swin_mini (embed_dim 48"),
    (["backbone.upstream.cache_dir={blocker}/cache"], "backbone.upstream.cache_dir: {blocker}/cache is not a writable"),
])
def test_an_upstream_that_cannot_serve_the_run_is_one_line_before_anything_is_written(tmp_path, overrides, expected):
    """The demo starts from the upstream pre-training: one that does not fit the backbone, or a cache
    that cannot be written, is said in one line before any pre-training, data or run folder."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    overrides = [o.replace("{blocker}", str(blocker)) for o in overrides]
    demo = DEMO.parent / "demo.yaml"
    result = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(demo), "--set", f"output_dir={tmp_path}/out",
                             "--set", f"data.synthetic.root={tmp_path}/data", *sum((["--set", o] for o in overrides), [])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected.replace("{blocker}", str(blocker)) in lines[0], result.stderr
    assert "pre-training" not in result.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("override, expected", [
    ("schedule.batch_size=[1, 3]", "2 batch sizes for 1 workers"),
    ("schedule.batch_size={v100: 4, k9000: 1}", "unknown GPU kind 'k9000'"),
    ("schedule.batch_size=0", "schedule.batch_size: Input should be greater than 0"),
])
def test_bad_batch_sizes_name_the_field(override, expected):
    with pytest.raises(UserInputError, match=expected) as info:
        load_experiment(DEMO, [override])
    assert "\n" not in str(info.value)


def test_batch_sizes_per_rank_and_per_gpu_kind():
    assert load_experiment(DEMO, ["scaling.workers=2", "schedule.batch_size=[1, 3]"]).batch_sizes() == [1, 3]
    cfg = load_experiment(DEMO, ["scaling.workers=3", "schedule.batch_size={V100: 4, 1080 Ti: 1}"])
    assert cfg.schedule.batch_size == {"v100": 4, "1080ti": 1} and cfg.batch_sizes() is None


def test_run_refuses_a_checkpoint_of_another_method_before_starting(tmp_path):
    """A run directory holding an E3VA checkpoint cannot be resumed as LoRA: one line, no MLflow run."""
    import json
    from orchestrator.train_loop import config_identity
    cfg = load_experiment(DEMO, [f"output_dir={tmp_path}/out"])
    checkpoint = cfg.run_dir / "ray" / cfg.name / "checkpoint_000001"  # where Ray Train keeps it
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainable.safetensors").write_bytes(b"")
    (checkpoint / "state.json").write_text(json.dumps({"step": 2, "identity": config_identity(cfg)}))
    result = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(DEMO), "--set",
                             f"output_dir={tmp_path}/out", "--set", "tuning.method=lora",
                             "--set", "tuning.hyperparameters={}", "--set", f"data.synthetic.root={tmp_path}/s"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "its method is 'e3va', this run has 'lora'" in lines[0], result.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()
