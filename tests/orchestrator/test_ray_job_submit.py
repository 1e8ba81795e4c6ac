"""`ray job submit --working-dir . -- python -m orchestrator run ...` against a real cluster on 127.0.0.1."""
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def cluster():
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    ray = str(bin_dir / "ray")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray 2.60 protects the dashboard with a token: the cluster and the client share one.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    started = subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                              "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                              f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}"],
                             env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_runs_the_demo_experiment_on_a_running_cluster(cluster, tmp_path):
    address, env = cluster
    out = tmp_path / "out"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--", "python", "-m", "orchestrator", "run", "experiments/demo.yaml",
         "--set", "schedule.iterations=3", "--set", "checkpoint.period=0", "--set", "schedule.batch_size=2",
         "--set", "data.synthetic.num_train=8", "--set", "data.synthetic.num_val=4",
         "--set", f"data.synthetic.root={tmp_path}/synthetic", "--set", f"output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e3va-demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "val_bbox_AP50" in runs[0].data.metrics
