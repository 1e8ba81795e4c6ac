"""Real training runs: local Ray, Ray Train workers on CPU (gloo), a local MLflow store."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator.config import load_experiment  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo.yaml"
FAST = ["schedule.iterations=4", "checkpoint.period=2", "schedule.batch_size=2",
        "data.synthetic.num_train=16", "data.synthetic.num_val=4"]


def only_run(tracking_uri: str, experiment: str):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_demo_command_finishes_an_mlflow_run_with_coco_metrics_and_the_adapter_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", *sum((["--set", s] for s in FAST), []),
         "--set", f"output_dir={tmp_path}", "--set", f"data.synthetic.root={tmp_path}/synthetic"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlflow ui --backend-store-uri" in result.stdout and "AP50" in result.stdout
    client, run = only_run(f"sqlite:///{tmp_path}/mlflow.db", "e3va-demo")
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "e3va" and run.data.params["rank"] == "8"
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert f"val_bbox_{name}" in run.data.metrics and f"val_segm_{name}" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert "checkpoint/trainable.safetensors" in artifacts
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [1, 2, 3, 4]


def test_two_gloo_workers_take_part(tmp_path, ray_local):
    from orchestrator.run import run_experiment
    cfg = load_experiment(DEMO, FAST + ["scaling.workers=2", f"output_dir={tmp_path}",
                                        f"data.synthetic.root={tmp_path}/synthetic"])
    outcome = run_experiment(cfg)
    assert outcome["metrics"]["world_size"] == 2
    client, run = only_run(outcome["tracking_uri"], "e3va-demo")
    assert run.data.params["batch_total"] == "4"


def test_a_worker_failure_resumes_from_the_checkpoint_without_losing_or_repeating_steps(tmp_path, ray_local):
    from orchestrator.run import run_experiment
    cfg = load_experiment(DEMO, FAST + ["schedule.iterations=6", f"output_dir={tmp_path}",
                                        f"data.synthetic.root={tmp_path}/synthetic"])
    outcome = run_experiment(cfg, fail_at_step=3)  # the worker dies after the step-2 checkpoint
    client, run = only_run(outcome["tracking_uri"], "e3va-demo")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6], steps


def test_training_finishes_when_the_tracking_server_is_down(tmp_path, ray_local, capsys):
    import socket
    from orchestrator.run import run_experiment
    with socket.socket() as sock:  # a port on 127.0.0.1 where nothing listens: a stopped server
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = load_experiment(DEMO, FAST + [f"output_dir={tmp_path}", f"data.synthetic.root={tmp_path}/synthetic",
                                        f"tracking.uri=http://127.0.0.1:{port}"])
    outcome = run_experiment(cfg)
    assert outcome["metrics"]["step"] == 4 and outcome["run_id"] is None
    assert capsys.readouterr().out.count("training continues without it") == 1
