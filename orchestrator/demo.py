"""``python -m orchestrator demo``: the whole product on this machine in a few minutes.

Generates the synthetic dataset, trains the E3VA Swin Mask R-CNN of ``experiments/demo.yaml`` (with
``--task segmentation`` the E3VA UPerNet of ``experiments/demo_segmentation.yaml``) through a local Ray
instance, evaluates it, records everything in a local MLflow store, and ends with the result table and
the command that opens the MLflow UI on it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from detectors.errors import UserInputError

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
DEMO_EXPERIMENT = EXPERIMENTS / "demo.yaml"


def run_demo(overrides: Sequence[str] = (), verbose: bool = False, task: str = "detection") -> dict:
    from orchestrator.config import load_experiment
    from orchestrator.console import CONSOLE, internals_to
    from orchestrator.run import preflight, run_experiment
    from orchestrator.summary import print_summary
    from orchestrator.tasks import TASKS
    experiment = EXPERIMENTS / TASKS.get(task).demo_experiment  # an unknown task: one line naming those there are
    if not experiment.is_file():
        raise UserInputError(f"the demo experiment {experiment} is missing: run the demo from a checkout "
                             f"installed with pip install -e .")
    cfg = load_experiment(experiment, overrides)
    checked = preflight(cfg)  # bad input is one line before the run's folder and log exist
    with internals_to(cfg.run_dir / "run.log", verbose):
        outcome = run_experiment(cfg, show_progress=True, checked=checked)
        print_summary(cfg, outcome, f"E3VA {cfg.backbone.name} {cfg.model.detector} on the synthetic validation "
                                    f"split after {cfg.schedule.iterations} iterations:")
        uri = outcome["tracking_uri"]
        CONSOLE.say(f"\nMLflow run {outcome['run_id']} (experiment {cfg.tracking.experiment!r}). Open the UI with:\n"
                    f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
                    f"and browse to http://127.0.0.1:5000")
    return outcome
