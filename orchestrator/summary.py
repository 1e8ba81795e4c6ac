"""What a finished run prints: its evaluation table and where to find it in MLflow."""
from __future__ import annotations

from typing import Any


def print_summary(cfg, outcome: dict[str, Any], heading: str | None = None) -> None:
    """The task's table of the run's validation figures (COCO AP, or mIoU/mAcc/aAcc), and its checkpoint."""
    from orchestrator.console import CONSOLE
    metrics = outcome["metrics"] or {}
    table = cfg.task.results_table(metrics)
    if table:
        CONSOLE.say()
        CONSOLE.say(heading or f"{cfg.tuning.method} {cfg.backbone.name} {cfg.model.detector} on the validation "
                               f"split after {metrics.get('step', '?')} iterations:")
        CONSOLE.say(table)
    if outcome.get("checkpoint"):
        CONSOLE.say(f"\ncheckpoint: {outcome['checkpoint']}")


__all__ = ["print_summary"]
