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
