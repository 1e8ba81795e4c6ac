"""`ray job submit --working-dir . -- python -m orchestrator run ...` against a real cluster on 127.0.0.1."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")
from conftest import local_ray_cluster  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster():
    with local_ray_cluster() as (_, dashboard, env):
        yield dashboard, env


def test_ray_job_submit_runs_the_demo_experiment_on_a_running_cluster(cluster, tmp_path):
    address, env = cluster
    out = tmp_path / "out"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--", "python", "-m", "orchestrator", "run", "experiments/tiny.yaml",
         "--set", "schedule.iterations=3", "--set", "checkpoint.period=0", "--set", "schedule.batch_size=2",
         "--set", "data.synthetic.num_train=8", "--set", "data.synthetic.num_val=4",
         "--set", f"data.synthetic.root={tmp_path}/synthetic", "--set", f"output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e3va-tiny").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "val_bbox_AP50" in runs[0].data.metrics
