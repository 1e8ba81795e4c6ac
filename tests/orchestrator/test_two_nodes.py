"""Two machines that share no disk, on one machine: a second Ray node in its own mount namespace, with a
private tmpfs over the test's output folder, so what either node writes there the other never sees.

A two-worker run, one worker on each node, keeps its checkpoints in a real S3-compatible server and its
MLflow artifacts behind a real ``mlflow server`` whose artifact store is that S3 server; COCO figures come
from the sharded evaluation; the upstream checkpoint the driver pre-trained reaches the other node. The same run with a node-local storage path is refused before it starts,
and losing the second node mid-run ends the run with one line and no MLflow run left RUNNING.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytest.importorskip("moto")
from mlflow.tracking import MlflowClient  # noqa: E402

from conftest import local_ray_cluster, make_bucket, mlflow_server, s3_server  # noqa: E402
from orchestrator.checkpointing import newest_checkpoint  # noqa: E402
from orchestrator.storage import open_storage  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                 reason="a private mount namespace needs root and unshare")]

TINY = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"
TWO_WORKERS = ["scaling.workers=2", "scaling.resources={slot: 1}", "schedule.batch_size=2", "checkpoint.period=2",
               "data.synthetic.num_train=8", "data.synthetic.num_val=6", "tracking.experiment=two-nodes"]


@pytest.fixture(scope="module")
def cluster():
    """``(env, outputs, tracking_uri)``: the head in this mount namespace, the second node in its own."""
    outputs = Path(tempfile.mkdtemp(prefix="two-nodes-"))
    with s3_server() as endpoint:
        make_bucket("cluster")
        s3_env = {"MLFLOW_S3_ENDPOINT_URL": endpoint}
        with mlflow_server(outputs / "mlflow.db", "s3://cluster/mlartifacts", s3_env) as tracking_uri, \
                local_ray_cluster({"slot": 1}, ({"slot": 1, "node_b": 1},), private_dir=outputs) as (gcs, _, env):
            yield {**env, **s3_env, "RAY_ADDRESS": gcs}, outputs, tracking_uri
    shutil.rmtree(outputs, ignore_errors=True)


def run(cluster, *overrides, timeout=900, **popen):
    env, outputs, tracking_uri = cluster
    overrides += tuple(f"tracking.run_name={o.removeprefix('name=')}" for o in overrides if o.startswith("name="))
    args = [sys.executable, "-m", "orchestrator", "run", str(TINY),
            *sum((["--set", s] for s in [*TWO_WORKERS, f"output_dir={outputs}", f"tracking.uri={tracking_uri}",
                                         f"data.synthetic.root={outputs}/synthetic", *overrides]), [])]
    if popen:
        return subprocess.Popen(args, **{"env": env, "stdout": subprocess.DEVNULL, **popen})
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def node_b_listing(env, folder: Path) -> list[str]:
    """What the second node sees in ``folder``, asked of a Ray task placed there."""
    code = ("import os, ray\n"
            "@ray.remote(resources={'node_b': 0.01}, num_cpus=0)\n"
            "def listing(folder):\n"
            "    return sorted(os.listdir(folder))\n"
            f"ray.init(log_to_driver=False)\nprint(ray.get(listing.remote({str(folder)!r})))\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_a_two_worker_run_across_two_nodes_without_a_shared_disk_finishes_with_s3_storage(cluster):
    """Checkpoints and artifacts in S3, the evaluation sharded; and the upstream checkpoint reaches the other
    node's worker through the object store: the driver pre-trains into its own disk's cache, which the worker on
    the second node cannot see, so it puts the bytes the driver handed it into that node's cache, intact."""
    env, outputs, tracking_uri = cluster
    upstream = f"{{steps: 2, batch_size: 2, warmup_steps: 1, image_size: 64, cache_dir: {outputs}/pretrained}}"
    result = run(cluster, "schedule.iterations=4", "storage=s3://cluster/runs", "name=across",
                 "backbone.name=swin_mini", "backbone.overrides={}", f"backbone.upstream={upstream}")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id],
                                  filter_string="attributes.run_name = 'across'")
    assert found.info.status == "FINISHED"
    metrics = found.data.metrics
    assert metrics["world_size"] == 2 and "val_bbox_AP" in metrics and "val_segm_AP" in metrics
    # each rank predicted its own shard of the 6 validation images
    assert metrics["eval_images_rank0"] == 3 and metrics["eval_images_rank1"] == 3
    steps = sorted(m.step for m in client.get_metric_history(found.info.run_id, "train_loss"))
    assert steps == [1, 2, 3, 4]
    # the checkpoints and the MLflow artifacts are readable here, whichever node wrote them
    storage = open_storage("s3://cluster/runs")
    assert newest_checkpoint(storage, storage.path("across"))[1]["step"] == 4
    local = client.download_artifacts(found.info.run_id, "checkpoint/trainable.safetensors", str(outputs / "dl"))
    assert Path(local).stat().st_size > 1000
    assert any(p.startswith("cluster/mlartifacts/") for p in open_storage("s3://cluster/mlartifacts").files("cluster"))
    # rank 1 ran on the second node: it wrote the synthetic data there, in a folder the head never sees
    assert "synthetic" in node_b_listing(env, outputs)
    assert not (outputs / "across" / "ray").exists()
    # pre-trained once, on the driver; the same two files in the other node's cache
    assert result.stdout.count("pre-training swin_mini") == 1
    here = sorted(p.name for p in (outputs / "pretrained").iterdir() if not p.name.startswith("."))
    assert len(here) == 2 and here[0].endswith(".json") and here[1].endswith(".pth")
    assert str(here) == node_b_listing(env, outputs / "pretrained")


def test_a_node_local_storage_path_is_refused_before_the_run_starts(cluster):
    env, outputs, tracking_uri = cluster
    started = time.monotonic()
    result = run(cluster, "schedule.iterations=4", f"storage={outputs}/local-state", "name=refused", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: storage: {outputs}/local-state is on this node's disk, but the workers may "
                           f"land on 1 other node"), result.stderr[-2000:]
    assert "storage.shared=true" in last and time.monotonic() - started < 60
    client = MlflowClient(tracking_uri)
    assert not client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id],
                                  filter_string="attributes.run_name = 'refused'")


def test_losing_the_second_node_mid_run_ends_in_one_line_and_no_run_is_left_running(cluster):
    """After the node's raylet dies, the run cannot get its two workers back: it ends, once its restarts
    are spent, with one error line, and its MLflow run is FAILED."""
    env, outputs, tracking_uri = cluster
    log = (outputs / "lost.stderr").open("w+")
    driver = run(cluster, "schedule.iterations=40", "storage=s3://cluster/runs", "name=lost", "scaling.max_failures=1",
                 env={**env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}, stderr=log, start_new_session=True)
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 600
    while True:  # until the run has taken a few steps on both nodes
        assert driver.poll() is None and time.monotonic() < deadline, (outputs / "lost.stderr").read_text()[-3000:]
        experiment = client.get_experiment_by_name("two-nodes")
        runs = experiment and client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'lost'")
        if runs and runs[0].data.metrics.get("step", 0) >= 3:
            break
        time.sleep(1)
    mine = os.readlink("/proc/self/ns/mnt")
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:  # every process of the second node: those in another mount namespace
            if os.readlink(f"/proc/{pid}/ns/mnt") != mine and b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    driver.wait(timeout=400)
    stderr = (outputs / "lost.stderr").read_text()
    assert driver.returncode == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("error: training lost failed: "), stderr[-3000:]
    (lost,) = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id],
                                 filter_string="attributes.run_name = 'lost'")
    assert lost.info.status == "FAILED"
