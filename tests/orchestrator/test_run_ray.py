"""Real training runs: local Ray, Ray Train workers on CPU (gloo), a local MLflow store."""
import math
from pathlib import Path

import pytest

pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator.config import load_experiment  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"
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


def test_two_gloo_workers_take_part_and_split_the_data_by_their_batch_sizes(tmp_path, ray_local):
    from orchestrator.run import run_experiment
    cfg = load_experiment(DEMO, FAST + ["scaling.workers=2", "schedule.batch_size=[1, 3]", f"output_dir={tmp_path}",
                                        f"data.synthetic.root={tmp_path}/synthetic"])
    outcome = run_experiment(cfg)
    metrics = outcome["metrics"]
    assert metrics["world_size"] == 2 and metrics["images_per_step"] == 4
    # 16 images, 4 per step: one epoch of 4 steps, each image trained on by exactly one rank
    assert metrics["run/images_rank0"] == 4 and metrics["run/images_rank1"] == 12
    assert metrics["run/images_seen_by_two_ranks"] == 0
    assert metrics["run/peak_memory_mb_rank0"] > 100 and metrics["run/peak_memory_mb_rank1"] > 100
    client, run = only_run(outcome["tracking_uri"], "e3va-tiny")
    assert run.data.params["batch_total"] == "4" and run.data.params["batch_per_worker"] == "[1, 3]"
    # each rank predicted its own half of the 4 validation images; the merged COCO figures are one process's
    assert metrics["eval_images_rank0"] == 2 and metrics["eval_images_rank1"] == 2
    single = evaluate_in_this_process(cfg, outcome["checkpoint"])
    assert single.keys() == {k.removeprefix("val/") for k in metrics if k.startswith("val/")}
    for key, value in single.items():
        theirs = metrics[f"val/{key}"]
        assert (math.isnan(value) and math.isnan(theirs)) or abs(theirs - value) <= 1e-6, (key, theirs, value)


def evaluate_in_this_process(cfg, checkpoint: str) -> dict:
    """The run's final model rebuilt here (same seed, so the same frozen weights; the checkpoint's trained
    ones), evaluated on the whole validation split by one process with the workers' one thread."""
    import torch

    from detectors.training import evaluate
    from orchestrator.checkpointing import load_checkpoint
    from orchestrator.train_loop import build_datasets, build_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.seed)
        train_set, val_set = build_datasets(cfg)
        detector = build_model(cfg, train_set.num_classes)
        load_checkpoint(Path(checkpoint), detector, None, None, identity={})
        return evaluate(detector, val_set)
    finally:
        torch.set_num_threads(threads)


def test_a_worker_failure_resumes_from_the_checkpoint_without_losing_or_repeating_steps(tmp_path, ray_local):
    from orchestrator.run import run_experiment
    cfg = load_experiment(DEMO, FAST + ["schedule.iterations=6", f"output_dir={tmp_path}",
                                        f"data.synthetic.root={tmp_path}/synthetic"])
    outcome = run_experiment(cfg, fail_at_step=3)  # the worker dies after the step-2 checkpoint
    client, run = only_run(outcome["tracking_uri"], "e3va-tiny")
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


def test_a_user_error_inside_a_worker_reaches_the_command_line_as_one_line():
    from ray.train import WorkerGroupError

    from detectors.errors import UserInputError
    from orchestrator.run import worker_user_error
    failure = RuntimeError("worker died")
    failure.__cause__ = UserInputError("checkpoint x belongs to another model: its fingerprint is 'a'")
    error = worker_user_error(WorkerGroupError("rank 0 failed", {0: failure}))
    assert isinstance(error, UserInputError) and str(error).startswith("checkpoint x belongs to another model")
    as_text = WorkerGroupError("", {1: RuntimeError("Traceback ...\nUserInputError: data: broken\n  more")})
    assert str(worker_user_error(as_text)) == "data: broken"
    assert worker_user_error(WorkerGroupError("", {0: RuntimeError("out of memory")})) is None

