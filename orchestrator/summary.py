"""What a finished run prints: its evaluation table and where to find it in MLflow."""
from __future__ import annotations

from typing import Any

from tabulate import tabulate

COCO_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def results_table(metrics: dict[str, Any]) -> str:
    """The COCO table of a run's ``val/{bbox,segm}/*`` figures (empty when it did not evaluate)."""
    rows = [[kind] + [f"{metrics.get(f'val/{kind}/{name}', float('nan')):.1f}" for name in COCO_COLUMNS]
            for kind in ("bbox", "segm") if f"val/{kind}/AP" in metrics]
    return tabulate(rows, headers=["", *COCO_COLUMNS], disable_numparse=True) if rows else ""


def print_summary(cfg, outcome: dict[str, Any], heading: str | None = None) -> None:
    from orchestrator.console import CONSOLE
    metrics = outcome["metrics"] or {}
    table = results_table(metrics)
    if table:
        CONSOLE.say()
        CONSOLE.say(heading or f"{cfg.tuning.method} {cfg.backbone.name} {cfg.model.detector} on the validation "
                               f"split after {metrics.get('step', '?')} iterations:")
        CONSOLE.say(table)
    if outcome.get("checkpoint"):
        CONSOLE.say(f"\ncheckpoint: {outcome['checkpoint']}")


__all__ = ["results_table", "print_summary"]
