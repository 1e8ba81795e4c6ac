"""Ray Tune sweeps of real tiny training runs on local Ray (CPU), tracked as nested MLflow runs."""
import collections
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from detectors.errors import UserInputError  # noqa: E402
from orchestrator.cli import main  # noqa: E402
from orchestrator.sweep import load_sweep, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "tiny.yaml"
ITERATIONS = 6
# Every step reports (checkpoint.period=1), so ASHA sees train/loss at each step; no warm-up, so a
# too-large learning rate blows the loss up from the second step on (the first loss is the same for all).
TINY = [f"schedule.iterations={ITERATIONS}", "checkpoint.period=1", "schedule.batch_size=2",
        "schedule.warmup_iterations=0", "data.synthetic.num_train=8", "data.synthetic.num_val=4",
        "scaling.cpus_per_worker=1"]
GOOD_LR, BAD_LR = 0.0001, 0.003


def write_sweep(directory: Path, **fields) -> Path:
    spec = {"name": "tiny", "base": str(DEMO), "overrides": {"tracking.experiment": "sweep-test"},
            "space": {"schedule.lr": {"grid": [GOOD_LR, BAD_LR]}, "tuning.hyperparameters.rank": {"grid": [4, 8]}},
            "max_concurrent_trials": 2, **fields}
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def places(tmp: Path) -> list[str]:
    return [f"output_dir={tmp}", f"data.synthetic.root={tmp}/synthetic"]


@pytest.fixture(scope="module")
def ray_local():
    import ray
    # With the dashboard: Train frees the workers of a trial ASHA stopped through the state API.
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


INCLUDED = {"tuning": {"hyperparameters": {"rank": 4}}, "seed": 7}  # a control beside the grid, its own seed


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Four tiny trials (learning rate x rank) and one included trial with another seed, ASHA on train/loss,
    through the command with its own local Ray, as a person runs it. One at a time: ASHA's verdict on a
    trial depends on which trials reached its rung before it, and in grid order a good learning rate
    always comes before a bad one, so a bad trial is always judged against a good one."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = write_sweep(tmp, asha={"metric": "train/loss", "mode": "min", "grace_period": 1, "reduction_factor": 2},
                       max_concurrent_trials=1, include=[INCLUDED])
    result = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(path),
                             *sum((["--set", item] for item in TINY + places(tmp)), [])],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, path, (result.stdout + result.stderr).splitlines(), recorded_outcome(f"sqlite:///{tmp}/mlflow.db")


def children(outcome) -> list:
    client = MlflowClient(outcome["tracking_uri"])
    parent = client.get_run(outcome["parent_run_id"])
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{outcome['parent_run_id']}'")


def recorded_outcome(tracking_uri: str) -> dict:
    """What ``run_sweep`` returns, read back from MLflow: the parent run and how each child ended."""
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    outcome = {"tracking_uri": tracking_uri, "parent_run_id": parent.info.run_id}
    return {**outcome, "counts": collections.Counter(r.data.tags.get("sweep.outcome") for r in children(outcome))}


def test_each_trial_is_a_child_mlflow_run_of_one_parent_and_compare_tabulates_and_plots_them(swept, tmp_path, capsys):
    from PIL import Image
    tmp, path, lines, outcome = swept
    assert outcome["counts"]["failed"] == 0
    runs = children(outcome)
    assert len(runs) == 5
    grid = [r for r in runs if r.data.params["seed"] == "0"]
    varied = sorted((r.data.params["schedule.lr"], r.data.params["tuning.hyperparameters.rank"]) for r in grid)
    assert varied == sorted((str(lr), str(rank)) for lr in (GOOD_LR, BAD_LR) for rank in (4, 8))
    names = {r.info.run_name for r in runs}
    assert len(names) == 5 and all(n.startswith("tiny-") for n in names)
    (included,) = [r for r in runs if r.data.params["seed"] == "7"]
    assert included.info.run_name == "tiny-seed=7-rank=4" and included.data.params["tuning.hyperparameters.rank"] == "4"
    for run in runs:  # own output dir and checkpoints per trial, the trial's final metrics in its run
        assert (tmp / "tiny" / "trials" / run.info.run_name / "ray").is_dir()
        assert "train_loss" in run.data.metrics and run.data.params["method"] == "e3va"
    finished = [r for r in runs if r.data.tags.get("sweep.outcome") == "finished"]
    assert finished and all("val_bbox_AP" in r.data.metrics for r in finished)

    capsys.readouterr()
    out = tmp_path / "compare"
    assert main(["compare", "--parent", outcome["parent_run_id"], "--tracking-uri", outcome["tracking_uri"],
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(sum(name in line for line in printed.splitlines()) == 1 for name in names), printed
    assert "AP box" in printed and "s/iter" in printed
    for png in ("ap_vs_memory.png", "ap_heatmap.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and 300 <= image.width <= 3000 and 200 <= image.height <= 3000
    artifacts = [a.path for a in MlflowClient(outcome["tracking_uri"]).list_artifacts(outcome["parent_run_id"],
                                                                                          "compare")]
    assert "compare/ap_heatmap.png" in artifacts and "compare/ap_vs_memory.png" in artifacts


def test_asha_stops_a_trial_whose_learning_rate_blows_the_loss_up(swept):
    tmp, path, lines, outcome = swept
    client = MlflowClient(outcome["tracking_uri"])
    steps = {run.info.run_id: max(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
             for run in children(outcome)}
    stopped = [r for r in children(outcome) if r.data.tags["sweep.outcome"] == "stopped early"]
    assert stopped
    assert all(r.info.status == "KILLED" for r in stopped)
    # ASHA keeps the better half at each rung, so a good trial can be stopped too (its loss is close to
    # the other good one's); a bad one always is. Tune's stop reaches a trial asynchronously, so a stopped
    # trial may get a step or two further before it ends.
    # (the included trial runs at the experiment's own rate: it has no schedule.lr param of its own)
    assert any(r.data.params.get("schedule.lr") == str(BAD_LR) and steps[r.info.run_id] < ITERATIONS
               for r in stopped), [(r.data.params.get("schedule.lr"), steps[r.info.run_id]) for r in stopped]
    for run in children(outcome):
        if run.data.tags["sweep.outcome"] == "finished":
            assert steps[run.info.run_id] == ITERATIONS and run.info.status == "FINISHED"


def test_the_sweep_says_one_line_as_each_trial_starts_and_ends(swept):
    tmp, path, lines, outcome = swept
    assert len(lines) <= 50, "\n".join(lines)
    assert sum(line.endswith(" started") and line.startswith("trial ") for line in lines) == 5, "\n".join(lines)
    ended = [line for line in lines if line.startswith("trial ") and re.search(r" ended at step [1-6]\b", line)]
    assert len(ended) == 5 and ended[-1].endswith("[5/5 trials ended]"), "\n".join(lines)
    assert f"finished: sweep tiny under MLflow run {outcome['parent_run_id']} in {outcome['tracking_uri']}" in lines
    (log_line,) = [line for line in lines if line.startswith("log: ")]
    assert "Trial status" in Path(log_line.removeprefix("log: ")).read_text()  # Tune's own table, in the log


def test_running_the_sweep_again_restores_it_and_keeps_its_parent_run(swept, ray_local):
    tmp, path, lines, outcome = swept
    again = run_sweep(load_sweep(path, TINY + places(tmp)), compare=False)
    assert again["parent_run_id"] == outcome["parent_run_id"]
    assert len(children(again)) == 5 and again["counts"]["failed"] == 0


def test_a_search_space_over_a_field_that_does_not_exist_fails_in_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path, space={"schedule.lr": {"grid": [0.1]}, "tuning.hyperparameters.rnk": {"grid": [8]}})
    assert main(["sweep", str(path), "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: space.tuning.hyperparameters.rnk=8:"), err
    path = write_sweep(tmp_path, space={"schedule.learning_rate": {"grid": [0.1]}})
    assert main(["sweep", str(path)]) == 2
    assert "schedule.learning_rate: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()


def test_an_empty_grid_fails_in_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path, space={"tuning.hyperparameters.rank": {"grid": []}})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "space.tuning.hyperparameters.rank.grid: List should have at least 1 item" in err


def test_a_method_sweep_with_another_methods_hyperparameters_says_to_clear_them(tmp_path):
    path = write_sweep(tmp_path, space={"tuning.method": {"grid": ["e3va", "lorand"]}})
    with pytest.raises(UserInputError, match=r"tuning.method=\"lorand\".*tuning.hyperparameters: \{\}"):
        load_sweep(path)


def test_by_method_sets_fields_on_that_methods_trials_only(tmp_path, capsys):
    path = write_sweep(tmp_path, overrides={"tracking.experiment": "sweep-test", "tuning.hyperparameters": {}},
                       space={"tuning.method": {"grid": ["e3va", "full"]}},
                       by_method={"full": {"schedule": {"lr": 5.0e-5}, "schedule.clip_grad_norm": 0.5}})
    sweep = load_sweep(path)
    lrs = {c.tuning.method: (c.schedule.lr, c.schedule.clip_grad_norm) for c in sweep.configs}
    assert lrs["full"] == (5.0e-5, 0.5) and lrs["e3va"] == (sweep.base.schedule.lr, sweep.base.schedule.clip_grad_norm)
    path = write_sweep(tmp_path, by_method={"fulll": {"schedule.lr": 1.0e-4}})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "by_method: fulll: not a tuning method" in err, err
    path = write_sweep(tmp_path, overrides={"tuning.hyperparameters": {}}, space={"tuning.method": {"grid": ["full"]}},
                       by_method={"full": {"schedule.lrr": 1}})
    assert main(["sweep", str(path)]) == 2
    assert "schedule.lrr" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("scaling.workers=3", "a trial needs 3 workers x 1 CPU = 3 CPU (scaling.workers, scaling.cpus_per_worker) "
                          "but this Ray cluster has 2"),
    ("scaling.cpus_per_worker=4", "a trial worker needs 4 CPU (scaling.cpus_per_worker) but no node"),
    ("scaling.use_gpu=true", "a trial worker needs 1 GPU (scaling.gpus_per_worker) but no node"),
])
def test_resources_no_trial_can_get_fail_in_one_line_before_any_trial(tmp_path, capsys, ray_local, override,
                                                                       message):
    path = write_sweep(tmp_path)
    assert main(["sweep", str(path), "--set", override, *sum((["--set", s] for s in places(tmp_path)), [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "tiny" / "tune").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_ablation_sweeps_load_and_span_the_papers_grids():
    ablations = ROOT / "experiments" / "ablations"
    rank = load_sweep(ablations / "e3va_rank.yaml")
    assert [c.tuning.hyperparameters["rank"] for c in rank.configs] == [8, 16, 32]
    lorand = load_sweep(ablations / "lorand_branches_kernel.yaml")
    assert sorted((c.tuning.hyperparameters["branches"], c.tuning.hyperparameters["kernel"])
                  for c in lorand.configs) == [(b, k) for b in (2, 4, 6) for k in (4, 8, 16)]
    methods = load_sweep(ablations / "methods.yaml")
    assert [c.tuning.method for c in methods.configs] == ["full", "fixed", "bitfit", "norm", "partial-1", "adapter",
                                                          "lora", "adaptformer", "lorand", "mona", "e3va"]
    assert all(c.tuning.hyperparameters == {} for c in methods.configs)
    transfer = load_sweep(ablations / "transfer.yaml")
    setups = [(c.tuning.method, c.data.synthetic.num_train, c.backbone.upstream is not None, c.seed)
              for c in transfer.configs]
    assert transfer.cfg.num_trials == len(setups) == 78 and len(set(setups)) == 78
    assert {(m, n, s) for m, n, pretrained, s in setups if not pretrained} == {
        (m, n, s) for m in ("full", "e3va") for n in (32, 256) for s in (0, 1, 2)}
    assert {m for m, _, pretrained, _ in setups if pretrained} == set(methods.cfg.space["tuning.method"].grid)
    assert all(c.data.synthetic.colours == "shifted" for c in transfer.configs)
    assert {c.tuning.method: c.schedule.lr for c in transfer.configs if c.tuning.method in ("full", "e3va")} == {
        "full": 1.0e-4, "e3va": 1.0e-3}
    # each data budget in its own folder: trials of both run at once without sharing files
    assert len({c.data.synthetic.folder() for c in transfer.configs}) == 2


@pytest.mark.parametrize("fields, message", [
    ({"include": [{"tuning.hyperparameters.rnk": 8}]}, 'include[0]: the trial tuning.hyperparameters.rnk=8:'),
    ({"include": [{"name": "x"}]}, "include: name: set by the sweep for each trial"),
    ({"include": [{"seed": 1}], "space": {"schedule.lr": {"uniform": [0.001, 0.01]}}},
     "include: extra trials need a space of grids only"),
])
def test_bad_included_trials_fail_in_one_line(tmp_path, capsys, fields, message):
    path = write_sweep(tmp_path, **fields)
    assert main(["sweep", str(path), "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_included_trials_are_read_as_flat_fields_beside_the_grid(tmp_path):
    """They run as children named for their fields: the sweep above has one."""
    path = write_sweep(tmp_path, space={"tuning.hyperparameters.rank": {"grid": [4, 8]}},
                       include=[{"tuning": {"hyperparameters": {"rank": 4}}, "seed": 7}])
    sweep = load_sweep(path, [*TINY, *places(tmp_path)])
    assert sweep.cfg.include == [{"tuning.hyperparameters.rank": 4, "seed": 7}]


def test_a_trial_lets_ray_train_wait_for_workers_that_a_resumed_sweeps_other_trials_hold(monkeypatch):
    """Tune brings every unfinished trial back at once when a sweep resumes; a trial that finds the cluster full
    must wait for workers rather than fail after Ray Train's 60 s. Ray Train hands the trial's value to its
    controller (get_env_vars_to_propagate); a value the user set is kept."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate
    from orchestrator.sweep.trials import WORKER_WAIT_S, WORKER_WAIT_VARIABLE, wait_for_workers
    monkeypatch.delenv(WORKER_WAIT_VARIABLE, raising=False)
    wait_for_workers()
    assert float(get_env_vars_to_propagate()[WORKER_WAIT_VARIABLE]) == WORKER_WAIT_S >= 3600
    monkeypatch.setenv(WORKER_WAIT_VARIABLE, "120")
    wait_for_workers()
    assert get_env_vars_to_propagate()[WORKER_WAIT_VARIABLE] == "120"
