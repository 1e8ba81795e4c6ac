"""``compare_runs``: the rows from MLflow, the table on the terminal, and the files of the table and figures."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from detectors.errors import UserInputError
from orchestrator.compare.plots import _pick_heatmap_keys, plot_ap_vs_memory, plot_heatmap
from orchestrator.compare.rows import Group, Row, find_runs, group_runs
from orchestrator.compare.table import build_table, summary
from orchestrator.console import CONSOLE


def default_tracking_uri() -> str:
    from orchestrator.tracking import default_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri(Path("outputs") / "run")


def compare_runs(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
                 out: str | Path | None = None, heatmap: str | None = None,
                 against: str | None = None) -> dict[str, Any]:
    """Print the table, write the figures (and log them to the parent run); returns what it made.
    ``against``: the variant each setting's rows are compared with (default ``full``)."""
    client = _client(tracking_uri)
    runs, parent = find_runs(client, experiment, parent_run_id)
    rows = [Row(client, run) for run in runs]
    groups = group_runs(rows)
    against = _reference_variant(groups, against)
    table = build_table(groups, against)
    title = f"{len(rows)} runs" + (f" of experiment {experiment!r}" if experiment else "") + \
        (f" under sweep run {parent_run_id} ({parent.info.run_name})" if parent is not None else "")
    CONSOLE.say(title)
    CONSOLE.say(table)

    out = Path(out or Path("outputs") / "compare")
    made = _write_table(out, title, table, rows, groups, against)
    _add_figures(made, out, rows, groups, parent, heatmap)
    plots = [p for p in (made.get("ap_vs_memory"), made.get("ap_heatmap")) if p is not None]
    CONSOLE.say("wrote " + ", ".join(str(p) for p in [made["table_path"], made["json_path"], *plots]))
    if parent is not None:
        _log_to_parent(client, parent, [made["table_path"], made["json_path"], *plots])
    return made


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserInputError(f"no MLflow store at {uri} (give --tracking-uri)")
    return MlflowClient(tracking_uri=uri)


def _reference_variant(groups: list[Group], against: str | None) -> str:
    """``against``, which some run must be of; by default ``full``."""
    if against is not None and not any(g.variant == against for g in groups):
        raise UserInputError(f"--against {against}: no such run among these (there are: "
                             f"{', '.join(dict.fromkeys(g.variant for g in groups))})")
    return against or "full"


def _write_table(out: Path, title: str, table: str, rows: list[Row], groups: list[Group],
                 against: str) -> dict[str, Any]:
    """``table.txt`` and ``table.json`` in ``out``; returns what ``compare_runs`` made so far."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(f"{title}\n{table}\n")
    made = {"rows": rows, "groups": summary(groups, against), "table": table, "table_path": out / "table.txt",
            "json_path": out / "table.json", "notes": []}
    made["json_path"].write_text(json.dumps(made["groups"], indent=1) + "\n")
    return made


def _add_figures(made: dict[str, Any], out: Path, rows: list[Row], groups: list[Group], parent,
                 heatmap: str | None) -> None:
    """Plot both figures into ``out`` and add them to ``made``; a heat map the runs cannot have is a note,
    unless ``heatmap`` asked for one."""
    memory_plot = out / "ap_vs_memory.png"
    note = plot_ap_vs_memory(groups, memory_plot)
    made["ap_vs_memory"] = memory_plot
    if note:
        made["notes"].append(note)
        CONSOLE.say(f"note: {note}")
    try:
        keys = _pick_heatmap_keys(rows, parent, heatmap)
    except UserInputError as exc:
        if heatmap is not None:
            raise
        made["notes"].append(f"no heat map: {exc}")
        CONSOLE.say(f"note: no heat map: {exc}")
    else:
        plot_heatmap(rows, keys, out / "ap_heatmap.png")
        made["ap_heatmap"] = out / "ap_heatmap.png"


def _log_to_parent(client, parent, paths: list[Path]) -> None:
    try:
        for path in paths:
            client.log_artifact(parent.info.run_id, str(path), "compare")
    except Exception as exc:  # noqa: BLE001
        CONSOLE.say(f"warning: could not log the figures to MLflow ({str(exc).splitlines()[0]})")
