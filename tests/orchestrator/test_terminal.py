"""What a person sees: under a terminal a live progress bar, without one a few lines (a sweep's one line as
each trial starts and ends: tests/orchestrator/test_sweep.py). A real command in its own process with its own
local Ray."""
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "tiny.yaml"
TINY = ["schedule.iterations=6", "checkpoint.period=3", "schedule.batch_size=2", "data.synthetic.num_train=8",
        "data.synthetic.num_val=4"]


def sets(*overrides: str) -> list[str]:
    return sum((["--set", item] for item in overrides), [])


@pytest.mark.slow
def test_the_demo_under_a_terminal_shows_a_progress_bar_and_finishes_an_mlflow_run_with_its_figures(tmp_path):
    """The demo on two workers, as a person at a terminal runs it: what they see, then what MLflow holds."""
    main, child = pty.openpty()
    demo = subprocess.Popen([sys.executable, "-m", "orchestrator", "demo",
                             *sets(*TINY, "scaling.workers=2", f"output_dir={tmp_path}",
                                   f"data.synthetic.root={tmp_path}/synthetic", "backbone.upstream.steps=2",
                                   "backbone.upstream.batch_size=4", "backbone.upstream.warmup_steps=1",
                                   f"backbone.upstream.cache_dir={tmp_path}/pretrained")],
                            stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    screen, deadline = b"", time.monotonic() + 600
    while time.monotonic() < deadline:
        if select.select([main], [], [], 1)[0]:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif demo.poll() is not None:
            break
    demo.wait(timeout=60)
    os.close(main)
    text = screen.decode(errors="replace")
    assert demo.returncode == 0, text[-3000:]
    # tqdm redraws one line with \r: the bar's count goes up to 6/6, and no plain step lines are printed
    counts = [int(n) for n in re.findall(r"train:\s+\d+%\|[^|]*\|\s+(\d)/6", text)]
    assert counts and counts[-1] == 6 and len(set(counts)) >= 3 and counts == sorted(counts), text[-2000:]
    assert "loss" in text and not re.search(r"^step \d", text, re.M)
    assert "AP50" in text and "mlflow ui --backend-store-uri" in text
    assert re.search(r"pre-training:\s+100%\|", text), text[:2000]  # the upstream pre-training's own bar
    assert "pre-trained in" in text and "upstream validation: objectness" in text and "Traceback" not in text
    (log_line,) = [line for line in text.splitlines() if line.startswith("log: ")]
    log = Path(log_line.removeprefix("log: ").strip()).read_text()  # Ray's and pycocotools' own output
    assert "TrainController" in log and "creating index" in log and "Average Precision" in log
    assert_the_demo_run_in_mlflow(tmp_path)


def assert_the_demo_run_in_mlflow(root: Path) -> None:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("e3va-demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone_init"] == "upstream 2 steps s0"
    assert run.info.artifact_uri.startswith(root.resolve().as_uri())  # beside the store, not in ./mlruns
    assert run.data.params["method"] == "e3va" and run.data.params["rank"] == "8"
    assert run.data.params["workers"] == "2" and run.data.metrics["world_size"] == 2
    # what a user compares by: the run named for what it is, its tags, its data, the machine's load
    assert run.info.run_name == "e3va-r8 swin_mini mask_rcnn"
    assert {k: run.data.tags[k] for k in ("method", "backbone", "detector", "task")} == {
        "method": "e3va", "backbone": "swin_mini", "detector": "mask_rcnn", "task": "instance-segmentation"}
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "synthetic-shapes-8+4" and dataset.tags[0].value == "train"
    assert "system/cpu_utilization_percentage" in run.data.metrics and "system/system_memory_usage_megabytes" in \
        run.data.metrics
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert f"val_bbox_{name}" in run.data.metrics and f"val_segm_{name}" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert "checkpoint/trainable.safetensors" in artifacts
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
