"""Run state in storage every node reaches: a real S3-compatible server (moto) over HTTP on 127.0.0.1,
real Ray Train runs and a real Ray Tune sweep keeping their checkpoints and state there, resuming from
it, and every step's metrics in a real MLflow store exactly once."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytest.importorskip("moto")
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator.checkpointing import STATE, WEIGHTS, newest_checkpoint  # noqa: E402
from orchestrator.config import load_experiment  # noqa: E402
from orchestrator.storage import open_storage  # noqa: E402
from conftest import S3_SECRET, free_port, make_bucket, s3_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "tiny.yaml"
FAST = ["schedule.iterations=6", "checkpoint.period=2", "schedule.batch_size=2",
        "data.synthetic.num_train=8", "data.synthetic.num_val=4"]


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        make_bucket("runs")
        yield endpoint


def places(tmp: Path, prefix: str) -> list[str]:
    return [f"output_dir={tmp}", f"data.synthetic.root={tmp}/synthetic", f"storage=s3://runs/{prefix}"]


def train_loss_steps(tracking_uri: str, experiment: str = "e3va-tiny") -> tuple[list[int], object]:
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")), run


def test_storage_reads_writes_and_lists_through_s3(s3):
    storage = open_storage("s3://runs/unit")
    assert storage.remote and storage.shared
    storage.write_text(storage.path("a", "b.txt"), "hello")
    assert storage.read_text(storage.path("a", "b.txt")) == "hello"
    assert storage.read_text(storage.path("a", "missing.txt")) is None
    assert storage.files(storage.path("a")) == {"runs/unit/a/b.txt": 5}
    assert storage.files(storage.path("nothing-here")) == {}
    storage.check()


def test_a_checkpoint_whose_weights_were_not_copied_whole_is_never_the_newest(s3):
    storage = open_storage("s3://runs/partial")
    for step, written, recorded in [(2, 100, 100), (4, 60, 100), (6, 100, None)]:
        folder = storage.path("run", f"checkpoint_{step}")
        storage.write_text(f"{folder}/{WEIGHTS}", "x" * written)
        if recorded is not None:
            storage.write_text(f"{folder}/{STATE}", json.dumps({"step": step, "weights_bytes": recorded}))
    storage.write_text(storage.path("run", "checkpoint_8", STATE), "{not json")
    path, state = newest_checkpoint(storage, storage.path("run"))
    assert path == "runs/partial/run/checkpoint_2" and state["step"] == 2


@pytest.mark.parametrize("storage, message", [
    ("s3://no-such-bucket/runs", "storage: s3://no-such-bucket/runs: the bucket 'no-such-bucket' does not exist"),
    ("s3://runs/x", "storage: s3://runs/x cannot be used:"),  # the endpoint below answers nothing
    ("FILE/below", "is a file; give a folder"),
])
def test_storage_that_cannot_hold_the_run_is_one_line_before_anything_starts(s3, tmp_path, storage, message):
    (tmp_path / "file").write_text("not a folder")
    storage = storage.replace("FILE", str(tmp_path / "file"))
    env_endpoint = f"http://127.0.0.1:{free_port()}" if storage == "s3://runs/x" else s3
    import os
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(DEMO), "--set", f"output_dir={tmp_path}/out",
         "--set", f"data.synthetic.root={tmp_path}/synthetic", "--set", f"storage={storage}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "AWS_ENDPOINT_URL": env_endpoint})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_worker_failure_resumes_from_the_newest_checkpoint_in_s3_logging_each_step_once(s3, tmp_path, ray_local):
    from orchestrator.run import run_experiment
    cfg = load_experiment(DEMO, FAST + places(tmp_path, "failure"))
    outcome = run_experiment(cfg, fail_at_step=3)  # the worker dies after the step-2 checkpoint
    steps, run = train_loss_steps(outcome["tracking_uri"])
    assert run.info.status == "FINISHED" and steps == [1, 2, 3, 4, 5, 6]
    storage = open_storage("s3://runs/failure")
    checkpoints = {p.rsplit("/", 2)[-2] for p in storage.files(storage.path("tiny")) if p.endswith(WEIGHTS)}
    assert len(checkpoints) == 2  # num_to_keep
    assert newest_checkpoint(storage, storage.path("tiny"))[1]["step"] == 6
    assert not list((tmp_path / "tiny").glob("**/" + WEIGHTS))  # nothing of the run's state on local disk
    assert outcome["checkpoint"].startswith("runs/failure/tiny/")
    # the credentials reached the workers through the environment, and were written nowhere
    client = MlflowClient(outcome["tracking_uri"])
    resolved = Path(client.download_artifacts(run.info.run_id, "experiment.yaml", str(tmp_path / "dl"))).read_text()
    assert "s3://runs/failure" in resolved and S3_SECRET not in resolved
    assert not any(S3_SECRET in str(v) for v in [*run.data.params.values(), *run.data.tags.values()])


def test_a_stopped_run_continues_from_s3_when_run_again_and_logs_each_step_once(s3, tmp_path):
    """SIGTERM (``ray job stop``, a scheduler) after steps past a checkpoint were logged ends the MLflow run as
    KILLED; the same command then resumes from the newest checkpoint in S3 into the same MLflow run. The steps
    past the checkpoint run again, but MLflow and the terminal hold each once."""
    # stopped just after the first odd step past a checkpoint is in MLflow, with steps left to run
    iterations, period = 12, 2
    args = [sys.executable, "-m", "orchestrator", "run", str(DEMO), *sum((["--set", s] for s in FAST), []),
            "--set", f"schedule.iterations={iterations}", "--set", f"checkpoint.period={period}",
            *sum((["--set", s] for s in places(tmp_path, "stopped")), [])]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while True:  # until a step past a checkpoint is in MLflow
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
        try:
            newest = max(train_loss_steps(uri)[0], default=0)
            if newest > period and newest % period:
                break
        except (AttributeError, ValueError, Exception):  # noqa: B014 - the store is still being created
            pass
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=300)[0]
    assert first.returncode != 0, output[-3000:]
    logged_before, stopped = train_loss_steps(uri)
    assert logged_before[-1] < iterations and stopped.info.status == "KILLED"

    second = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    lines = (second.stdout + second.stderr).splitlines()
    resumed = [re.search(r"resuming from step (\d+)", line) for line in lines]
    resumed = [int(m.group(1)) for m in resumed if m]
    assert len(resumed) == 1 and resumed[0] % period == 0 and period <= resumed[0] <= logged_before[-1], lines
    assert len(lines) <= 40 and "AP50" in second.stdout and "checkpoint: " in second.stdout, "\n".join(lines)
    shown = [line.split()[1] for line in lines if line.startswith("step ")]
    assert shown and len(shown) == len(set(shown)) and shown[-1] == f"{iterations}/{iterations}", "\n".join(lines)
    steps, run = train_loss_steps(uri)
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    assert steps == list(range(1, iterations + 1)), steps


def test_a_sweep_keeps_its_tune_state_in_s3_and_a_rerun_resumes_it_under_the_same_parent(s3, tmp_path, ray_local):
    import yaml

    from orchestrator.sweep import load_sweep, run_sweep
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"name": "two", "base": str(DEMO), "overrides": {"tracking.experiment": "s3-sweep"},
                                    "space": {"tuning.hyperparameters.rank": {"grid": [4, 8]}},
                                    "max_concurrent_trials": 1}))
    overrides = ["schedule.iterations=2", "checkpoint.period=0", "schedule.batch_size=2",
                 "data.synthetic.num_train=4", "data.synthetic.num_val=2", *places(tmp_path, "sweeps")]
    outcome = run_sweep(load_sweep(path, overrides), compare=False)
    assert outcome["counts"]["finished"] == 2
    storage = open_storage("s3://runs/sweeps")
    files = storage.files(storage.path("two"))
    assert any(p.startswith("runs/sweeps/two/tune/") for p in files)
    trial_checkpoints = [p for p in files if p.startswith("runs/sweeps/two/trials/") and p.endswith(WEIGHTS)]
    assert len(trial_checkpoints) == 2
    again = run_sweep(load_sweep(path, overrides), compare=False)
    assert again["parent_run_id"] == outcome["parent_run_id"]
    client = MlflowClient(outcome["tracking_uri"])
    parent = client.get_run(outcome["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome['parent_run_id']}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
