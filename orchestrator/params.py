"""``python -m orchestrator params``: the papers' parameter table for one backbone."""
from __future__ import annotations

import json
from typing import Any

from tabulate import tabulate

from detectors.errors import UserInputError
from detectors.params import ParamCount, count_parameters, parameter_table


def _hyperparameters(count: ParamCount) -> str:
    return ", ".join(f"{k}={v}" for k, v in count.hyperparameters.items()) or "-"


def print_params(backbone: str, method: str | None, overrides: dict[str, Any], show_all: bool = False,
                 as_json: bool = False) -> None:
    if method and not show_all:
        counts = [count_parameters(backbone, method, overrides)]
    else:
        if overrides:
            raise UserInputError("--set needs --method: hyperparameters differ between methods")
        counts = parameter_table(backbone)
    if as_json:
        rows = [c.as_dict() for c in counts]
        print(json.dumps(rows[0] if len(rows) == 1 and method and not show_all else rows, indent=2))
        return
    table = [[c.variant, _hyperparameters(c), f"{c.trainable / 1e6:.2f}", f"{c.percent:.2f}"] for c in counts]
    print(f"{backbone}: {counts[0].backbone_total / 1e6:.2f}M backbone parameters")
    print(tabulate(table, headers=["method", "hyperparameters", "trainable (M)", "% of backbone"],
                   colalign=("left", "left", "right", "right"), disable_numparse=True))
