"""``python -m orchestrator overhead EXP.yaml``: what Ray Train costs per iteration.

Runs the same experiment through a one-worker ``TorchTrainer`` and through the plain per-worker
loop in this process, alternating, and compares their steady-state seconds per iteration (the
median over steps, skipping the first; evaluation and checkpoints are not iteration time). Both
use the experiment's ``scaling.cpus_per_worker`` threads on CPU, leaving the rest of the machine to
Ray's own processes as a cluster node would. Tracking is off, so MLflow is not part of the figure.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from orchestrator.config import ExperimentConfig

SPEED = "run/median_seconds_per_iteration"


def _variant(cfg: ExperimentConfig, output_dir: Path, name: str) -> ExperimentConfig:
    data = json.loads(cfg.model_dump_json())
    data.update(name=name, output_dir=str(output_dir))
    data["scaling"].update(workers=1)
    data["evaluation"]["period"] = data["checkpoint"]["period"] = 0
    return ExperimentConfig.model_validate(data)


def measure_overhead(cfg: ExperimentConfig, rounds: int = 2) -> dict:
    from orchestrator.cluster import connect
    from orchestrator.run import build_trainer, preflight
    from orchestrator.train_loop import train_locally

    preflight(cfg)
    connect(dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        for round_ in range(rounds):
            paths = ("plain loop", "TorchTrainer")
            for path in paths if round_ % 2 == 0 else paths[::-1]:  # neither always runs on a warmer machine
                run_cfg = _variant(cfg, Path(tmp), f"{path.replace(' ', '_')}-{round_}")
                started = time.perf_counter()
                if path == "plain loop":
                    metrics = train_locally(run_cfg)
                else:
                    metrics = build_trainer(run_cfg, None, None, resume=None).fit().metrics  # a fresh folder
                rows.append({"round": round_ + 1, "path": path, "seconds_per_iteration": metrics[SPEED],
                             "wall_seconds": time.perf_counter() - started})
    speed = {(r["round"], r["path"]): r["seconds_per_iteration"] for r in rows}
    plain = statistics.median(v for (_, path), v in speed.items() if path == "plain loop")
    trainer = statistics.median(v for (_, path), v in speed.items() if path == "TorchTrainer")
    # A machine's slow spells last longer than one run, so each round's own ratio shows the spread.
    by_round = [speed[r, "TorchTrainer"] / speed[r, "plain loop"] for r in range(1, rounds + 1)]
    return {"rows": rows, "plain": plain, "trainer": trainer, "ratio": trainer / plain, "round_ratios": by_round}


def print_overhead(result: dict, iterations: int) -> None:
    print(tabulate([[r["round"], r["path"], f"{r['seconds_per_iteration']:.3f}", f"{r['wall_seconds']:.1f}"]
                    for r in result["rows"]],
                   headers=["round", "path", "s/iter (median)", f"wall s ({iterations} its, startup, eval)"],
                   disable_numparse=True))
    print(f"\nTorchTrainer (1 worker) / plain loop, seconds per iteration: {result['ratio']:.3f} "
          f"({(result['ratio'] - 1) * 100:+.1f}%); by round: "
          + ", ".join(f"{(r - 1) * 100:+.1f}%" for r in result["round_ratios"]))
