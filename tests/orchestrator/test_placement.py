"""Two GPU kinds simulated on one machine: a head node labelled gpu_1080ti and a second node
labelled gpu_v100 (custom resources, as cluster/ labels real nodes), all on 127.0.0.1."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")
from conftest import local_ray_cluster  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator.config import load_experiment  # noqa: E402
from orchestrator.cluster import check_cluster  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"
# the simulated nodes share this machine's disk: storage.shared says so (else the run is refused)
FAST = ["storage.shared=true", "schedule.iterations=2", "checkpoint.period=0", "data.synthetic.num_train=12",
        "data.synthetic.num_val=2",
        "scaling.workers=2", "schedule.batch_size={1080ti: 1, v100: 3}"]


def run(tmp_path, env, address, *overrides):
    args = [sys.executable, "-m", "orchestrator", "run", str(DEMO)]
    for item in [*FAST, f"output_dir={tmp_path}", f"data.synthetic.root={tmp_path}/synthetic", *overrides]:
        args += ["--set", item]
    return subprocess.run(args, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def two_kinds():
    """One cluster for the module: a 1080ti head and a v100 node (starting one costs about 20 s)."""
    with local_ray_cluster({"gpu_1080ti": 2}, ({"gpu_v100": 2},)) as cluster:
        yield cluster


def test_a_gpu_kind_the_cluster_lacks_is_one_line_before_the_run_starts(tmp_path, two_kinds):
    address, _, env = two_kinds
    missing = run(tmp_path / "h100", env, address, "scaling.gpu_kind=h100")
    assert missing.returncode == 2
    lines = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "do not fit this cluster" in lines[0] and "gpu_h100" in lines[0], missing.stderr
    assert not (tmp_path / "h100" / "mlflow.db").exists()


def test_the_cluster_check_counts_workers_per_node():
    cfg = load_experiment(DEMO, ["scaling.workers=3", "scaling.gpu_kind=v100", "scaling.cpus_per_worker=2"])
    two_v100_nodes = [{"Resources": {"CPU": 4, "gpu_v100": 1}}, {"Resources": {"CPU": 2, "gpu_v100": 1}},
                      {"Resources": {"CPU": 16, "gpu_1080ti": 4}}]
    check_cluster(cfg, two_v100_nodes)  # 2 + 1 workers fit
    with pytest.raises(Exception, match="3 workers each needing .* do not fit this cluster .room for 1"):
        check_cluster(cfg, two_v100_nodes[1:])


def test_a_sweep_routes_e3va_trials_to_the_small_gpus_and_full_tuning_to_the_large(tmp_path, two_kinds):
    sweep = tmp_path / "routed.yaml"
    sweep.write_text(f"""
name: routed
base: {DEMO}
overrides: {{tuning.hyperparameters: {{}}, tracking.experiment: routed}}
space: {{tuning.method: {{grid: [e3va, fixed]}}}}
route: {{e3va: 1080ti, fixed: v100}}
max_concurrent_trials: 2
""")
    address, _, env = two_kinds
    args = [sys.executable, "-m", "orchestrator", "sweep", str(sweep)]
    for item in [*FAST, f"output_dir={tmp_path}", f"data.synthetic.root={tmp_path}/synthetic"]:
        args += ["--set", item]
    result = subprocess.run(args, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("routed").experiment_id],
                              "tags.mlflow.parentRunId != ''")
    # each trial's two workers found themselves on their kind's node and took its batch size
    placed = {run.data.params["method"]: (run.data.params["gpu_kind"], run.data.params["batch_sizes"]) for run in runs}
    assert placed == {"e3va": ("1080ti", "[1, 1]"), "fixed": ("v100", "[3, 3]")}
