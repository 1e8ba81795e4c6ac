"""What a person sees: under a terminal a live progress bar, without one a few lines; a sweep says one line
as each trial starts and ends. Real commands, each in its own process with its own local Ray."""
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "tiny.yaml"
TINY = ["schedule.iterations=6", "checkpoint.period=3", "schedule.batch_size=2", "data.synthetic.num_train=8",
        "data.synthetic.num_val=4"]


def sets(*overrides: str) -> list[str]:
    return sum((["--set", item] for item in overrides), [])


@pytest.mark.slow
def test_the_demo_under_a_terminal_shows_a_progress_bar_that_advances(tmp_path):
    main, child = pty.openpty()
    demo = subprocess.Popen([sys.executable, "-m", "orchestrator", "demo",
                             *sets(*TINY, f"output_dir={tmp_path}", f"data.synthetic.root={tmp_path}/synthetic",
                                   "backbone.upstream.steps=2", "backbone.upstream.batch_size=4",
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


@pytest.mark.slow
def test_a_sweep_says_one_line_as_each_trial_starts_and_ends(tmp_path):
    """A grid of two ranks plus one included control with another seed: three trials, three child runs named
    for their fields, each announced as it starts and ends."""
    from mlflow.tracking import MlflowClient
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"name": "two", "base": str(DEMO), "overrides": {"tracking.experiment": "terminal"},
                                    "space": {"tuning.hyperparameters.rank": {"grid": [4, 8]}},
                                    "include": [{"tuning": {"hyperparameters": {"rank": 4}}, "seed": 7}],
                                    "max_concurrent_trials": 1}))
    result = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(path),
                             *sets("schedule.iterations=2", "checkpoint.period=0", "schedule.batch_size=2",
                                   "data.synthetic.num_train=4", "data.synthetic.num_val=2", f"output_dir={tmp_path}",
                                   f"data.synthetic.root={tmp_path}/synthetic")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert sum(line.endswith(" started") and line.startswith("trial ") for line in lines) == 3, "\n".join(lines)
    ended = [line for line in lines if line.startswith("trial ") and " ended at step 2" in line]
    assert len(ended) == 3 and ended[-1].endswith("[3/3 trials ended]"), "\n".join(lines)
    assert any(line.startswith("finished: sweep two") for line in lines)
    (log_line,) = [line for line in lines if line.startswith("log: ")]
    assert "Trial status" in Path(log_line.removeprefix("log: ")).read_text()  # Tune's own table, in the log
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("terminal").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment], filter_string="tags.mlflow.parentRunId != ''")
            if "mlflow.parentRunId" in r.data.tags}
    assert set(runs) == {"two-rank=4", "two-rank=8", "two-seed=7-rank=4"}, set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["two-seed=7-rank=4"].data.params["seed"] == "7" and runs["two-rank=8"].data.params["seed"] == "0"
