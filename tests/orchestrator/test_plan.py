"""python -m orchestrator plan: E3VA's Table 4 for an experiment, and its bad inputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from detectors.planner import MethodPlan, Sample
from orchestrator.plan import suggest

REPO = Path(__file__).resolve().parents[2]
# the demo's tiny Swin, as a RetinaNet (no RoI heads: quick) on a 64x128 training size
TINY = ["--set", "model.detector=retinanet", "--set", "model.options={}", "--set", "data.train_short_edges=[64]",
        "--set", "data.max_size=128"]


def orchestrator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


@pytest.mark.slow
def test_plan_prints_one_row_per_method_and_batch_with_fit_marks():
    result = orchestrator("plan", "experiments/tiny.yaml", *TINY, "--methods", "fixed,e3va",
                          "--gpus", "tiny=0.1,big=4", "--reserve", "0", "--profile-sizes", "64x64,96x96")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["fixed"], ["e3va"])]
    assert [(r[0], r[1]) for r in rows] == [("fixed", "1"), ("fixed", "2"), ("e3va", "1"), ("e3va", "2")]
    assert all(r[-2:] == ["✗", "✓"] for r in rows)  # 100 MiB holds no retinanet (0.12 GiB static); 4 GiB holds all
    assert "tiny 0.1GB" in result.stdout and "64x128" in result.stdout
    assert not [line for line in lines if line.startswith("*")]  # footnotes only for rows that fit nowhere


@pytest.mark.slow
def test_plan_json():
    result = orchestrator("plan", "experiments/tiny.yaml", *TINY, "--methods", "e3va,e3va-recompute", "--batches",
                          "1", "--gpus", "v100=32,tiny=0.05", "--profile-sizes", "64x64,96x96", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    row, recompute = out["rows"]
    assert row["method"] == "e3va" and row["batch"] == 1 and row["fits"] == {"v100": True, "tiny": False}
    assert row["peak_bytes"] == row["static_bytes"] + row["dynamic_bytes"]
    assert out["notes"] == []
    assert out["plans"]["e3va"]["coefficients"] and len(out["plans"]["e3va"]["samples"]) == 3
    # the same weights, fewer activations: the frozen blocks run again in backward
    assert recompute["method"] == "e3va-recompute" and recompute["static_bytes"] == row["static_bytes"]
    assert 0 < recompute["dynamic_bytes"] < row["dynamic_bytes"]


def test_the_files_method_and_its_variants_are_planned_with_the_files_hyperparameters():
    from orchestrator.config import load_experiment
    from orchestrator.plan import PLAN_METHODS, _experiment_hyperparameters
    cfg = load_experiment(REPO / "experiments" / "tiny.yaml",
                          ["tuning.method=e3va+", "tuning.hyperparameters={init: kaiming}"])
    assert {"e3va", "e3va-recompute"} <= set(PLAN_METHODS)
    assert _experiment_hyperparameters(cfg, "e3va+") == {"init": "kaiming"}
    assert _experiment_hyperparameters(cfg, "e3va-recompute") == {"rank": 16, "init": "kaiming"}
    assert _experiment_hyperparameters(cfg, "e3va++") == {"init": "kaiming"}  # its own rank, 32
    assert _experiment_hyperparameters(cfg, "lorand") == {}


@pytest.mark.slow
def test_a_row_that_fits_no_gpu_gets_a_footnote():
    result = orchestrator("plan", "experiments/tiny.yaml", *TINY, "--methods", "e3va", "--batches", "1",
                          "--gpus", "tiny=0.05", "--profile-sizes", "64x64,96x96")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("* e3va at batch 1 fits no listed GPU (needs 0.1")


@pytest.mark.parametrize("args, named", [
    (("--gpus", "v100"), "v100"),
    (("--gpus", "v100=lots"), "lots"),
    (("--gpus", "v100=-3"), "positive"),
    (("--methods", "full,e4va"), "e4va"),
    (("--batches", "0"), "--batches"),
    (("--profile-sizes", "64"), "--profile-sizes"),
])
def test_bad_input_is_one_line_and_exit_2_before_profiling(args, named):
    result = orchestrator("plan", "experiments/tiny.yaml", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and named in result.stderr
    assert "MiB dynamic" not in result.stderr  # nothing was profiled


def _plan(method: str, per_image_gib: float) -> MethodPlan:
    return MethodPlan(method=method, size=(800, 1344), device="cpu", weight_bytes=2**30, grad_state_bytes=0,
                      coefficients=(0.0, 0.0, per_image_gib * 2**30), samples=[Sample(1, (64, 64), 0)], window=7,
                      stage_weights=(1.0, 1.0, 1.0, 1.0))


def test_a_batch_no_gpu_holds_names_what_would_fit_instead():
    plans = {"full": _plan("full", 20), "e3va": _plan("e3va", 6)}
    gpus = {"p100": 16, "v100": 32}
    line = suggest(plans, gpus, "full", 2)
    assert line == ("full at batch 2 fits no listed GPU (needs 41.0 GiB); instead: full at batch 1 on v100 (32 GiB), "
                    "or e3va at batch 2 on p100 (16 GiB)")


@pytest.mark.slow
def test_auto_batch_size_is_the_largest_the_planner_fits_in_the_workers_memory():
    import torch

    from detectors.errors import UserInputError
    from orchestrator.config import load_experiment
    from orchestrator.plan import GIB, auto_batch_size, plan_for
    overrides = [item for item in TINY if item != "--set"]
    cfg = load_experiment(REPO / "experiments" / "tiny.yaml", overrides)
    cpu = torch.device("cpu")
    assert cfg.tuning.method == "e3va"
    plan = plan_for(cfg, "e3va", cfg.tuning.hyperparameters, cpu)
    room_for_three = plan.peak_bytes(3) + 0.5 * GIB + (plan.peak_bytes(4) - plan.peak_bytes(3)) / 2
    assert auto_batch_size(cfg, cpu, room_for_three) == (3, {})  # fits as written: no recomputation
    # Where not one image fits as written, recomputing the frozen branches is switched on, if that fits.
    recomputing = plan_for(cfg, "e3va", {**cfg.tuning.hyperparameters, "recompute": True}, cpu)
    assert recomputing.peak_bytes(1) < plan.peak_bytes(1)
    between = (recomputing.peak_bytes(1) + plan.peak_bytes(1)) / 2 + 0.5 * GIB
    assert auto_batch_size(cfg, cpu, between) == (1, {"recompute": True})
    written = load_experiment(REPO / "experiments" / "tiny.yaml", [*overrides, "tuning.hyperparameters.recompute=false"])
    with pytest.raises(UserInputError, match="auto: one .* image needs .* GiB with e3va, more"):
        auto_batch_size(written, cpu, between)  # the file said no: not overruled
    with pytest.raises(UserInputError, match=r"auto: one .* image needs .* GiB with e3va \(.* GiB with \{'recompute'"):
        auto_batch_size(cfg, cpu, recomputing.peak_bytes(1) / 2)
    with pytest.raises(UserInputError, match="'auto' sizes batches to each worker's GPU memory"):
        load_experiment(REPO / "experiments" / "tiny.yaml", ["schedule.batch_size=auto"])
    assert load_experiment(REPO / "experiments" / "tiny.yaml",
                           ["schedule.batch_size=auto", "scaling.use_gpu=true"]).batch_sizes() is None
