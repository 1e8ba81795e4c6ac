"""`python -m orchestrator overhead`: the same experiment through TorchTrainer and the plain loop."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"


@pytest.mark.benchmark  # a timing command, a minute of Ray runs: out of CI's 45 minutes (pytest -m benchmark)
def test_overhead_alternates_both_paths_and_reports_the_ratio_of_their_medians(tmp_path):
    tiny = ["schedule.iterations=2", "schedule.batch_size=1", "data.synthetic.num_train=4", "data.synthetic.num_val=2",
            f"output_dir={tmp_path}", f"data.synthetic.root={tmp_path}/synthetic"]
    result = subprocess.run([sys.executable, "-m", "orchestrator", "overhead", str(DEMO), "--rounds", "2",
                             *sum((["--set", s] for s in tiny), [])],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^(\d)\s+(plain loop|TorchTrainer)\s+([\d.]+)\s+[\d.]+$", result.stdout, re.M)
    # round 2 runs the paths in the other order, so neither always runs second
    assert [(r, p) for r, p, _ in rows] == [("1", "plain loop"), ("1", "TorchTrainer"),
                                            ("2", "TorchTrainer"), ("2", "plain loop")]
    speed = {(r, p): float(s) for r, p, s in rows}
    summary = re.search(r"plain loop, seconds per iteration: ([\d.]+) \(([+-][\d.]+)%\); by round: (.+)$",
                        result.stdout, re.M)
    assert summary, result.stdout
    plain = (speed["1", "plain loop"] + speed["2", "plain loop"]) / 2  # the median of two
    trainer = (speed["1", "TorchTrainer"] + speed["2", "TorchTrainer"]) / 2
    # the table rounds speeds to 3 decimals: the ratio recomputed from it is that far off
    rounding = trainer / plain * (0.0005 / plain + 0.0005 / trainer)
    assert float(summary[1]) == pytest.approx(trainer / plain, abs=2e-3 + rounding)
    by_round = [float(x.rstrip("%")) for x in summary[3].split(", ")]
    expected = [(speed[r, "TorchTrainer"] / speed[r, "plain loop"] - 1) * 100 for r in ("1", "2")]
    # the table shows speeds to 3 decimals: a ratio recomputed from them is off by up to this much (in %),
    # which grows with the ratio (TorchTrainer's startup dominates 2 iterations on a busy machine)
    slack = [0.06 + 100 * speed[r, "TorchTrainer"] / speed[r, "plain loop"]
             * (0.0005 / speed[r, "plain loop"] + 0.0005 / speed[r, "TorchTrainer"]) for r in ("1", "2")]
    assert all(abs(got - want) <= tol for got, want, tol in zip(by_round, expected, slack)), (by_round, expected)
