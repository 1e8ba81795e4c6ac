"""The papers' table, as text (``table.txt``) and as data (``table.json``)."""
from __future__ import annotations

import dataclasses
from typing import Any

from tabulate import tabulate

from orchestrator.compare.rows import (SEED_PARAM, Group, Row, _defaults, _difference, _fmt, _ratio, figure_columns,
                                       references)
from orchestrator.tasks import Column


def build_table(groups: list[Group], against: str = "full") -> str:
    """The papers' table, one row per group; where runs differ in setting (backbone start, data budget),
    one block per setting, each against its own ``against`` runs."""
    rows = [r for g in groups for r in g.rows]
    columns = figure_columns(rows)
    refs = references(groups, against)
    varied = _varied_hyperparameters(rows)
    by_setting, seeded = any(g.setting for g in groups), any(g.n > 1 for g in groups)
    table = []
    for g in groups:
        ref = refs[g.setting]
        hyper = " ".join(f"{k}={v}" for k, v in g.hyperparameters().items() if k in varied.get(g.method, ()))
        table.append([g.name, *([g.setting] if by_setting else []), g.method, f"{g.variant} {hyper}".strip(),
                      *([str(g.n)] if seeded else []),
                      _fmt(None if g.trainable is None else g.trainable / 1e6, 3), _fmt(g.percent, 2),
                      _fmt(g.memory, 0), _ratio(g.memory, ref.memory if ref else None),
                      _fmt(g.seconds, 3), _ratio(g.seconds, ref.seconds if ref else None),
                      *_figure_cells(g, columns, ref), g.state()])
    headers = ["run", *(["setting"] if by_setting else []), "method", "variant", *(["n"] if seeded else []),
               "params (M)", "% of full", "peak mem (MB)", f"vs {against}", "s/iter", f"vs {against}",
               *_figure_headers(columns), "status"]
    text = tabulate(table, headers=headers, disable_numparse=True)
    legend = _legend(seeded, against, by_setting)
    return f"{text}\n{legend}" if legend else text


def _figure_cells(group: Group, columns: list[Column], ref: Group | None) -> list[str]:
    cells = []
    for c in columns:
        shown = _difference(group, ref, c) if c.delta else group.stats(c)
        cells.append("-" if shown is None else shown.cell())
    return cells


def _figure_headers(columns: list[Column]) -> list[str]:
    return [c.header for c in columns]


def _legend(seeded: bool, against: str, by_setting: bool) -> str:
    """What the cells mean, where it is not the plain one-run table against ``full``."""
    if not seeded and against == "full":
        return ""
    where = " of the same setting" if by_setting else ""
    if not seeded:
        return f"delta: difference to {against}{where}"
    return (f"n runs (seeds) per row: mean ± sample std; delta: difference of means to {against}{where}, "
            f"* beyond two standard errors")


def summary(groups: list[Group], against: str = "full") -> list[dict[str, Any]]:
    """The table as data (``table.json``): per row its runs, costs, each figure's mean, std and n, and each
    headline figure's difference to ``against`` with its standard error."""
    rows = [r for g in groups for r in g.rows]
    columns = figure_columns(rows)
    refs = references(groups, against)
    out = []
    for g in groups:
        figures = {c.metric: dataclasses.asdict(s) for c in columns if not c.delta and (s := g.stats(c)) is not None}
        differences = {c.metric: {**dataclasses.asdict(d), "significant": d.significant} for c in columns
                       if c.delta and (d := _difference(g, refs[g.setting], c)) is not None}
        out.append({"name": g.name, "run_ids": [r.run_id for r in g.rows],
                    "seeds": [r.params.get(SEED_PARAM) for r in g.rows], "setting": g.setting, "method": g.method,
                    "variant": g.variant, "hyperparameters": g.hyperparameters(), "n": g.n,
                    "trainable_params": g.trainable, "memory_mb": g.memory, "seconds_per_iteration": g.seconds,
                    "figures": figures, "against": against, "differences": differences, "status": g.state()})
    return out


def _varied_hyperparameters(rows: list[Row]) -> dict[str, set[str]]:
    """Per method, the hyperparameters whose values differ between its rows (or from its defaults)."""
    out: dict[str, set[str]] = {}
    for method in {r.method for r in rows}:
        mine = [r.hyperparameters() for r in rows if r.method == method]
        keys = {k for h in mine for k in h}
        varied = {k for k in keys if len({h.get(k) for h in mine}) > 1}
        defaults = _defaults(method)
        if defaults is not None:
            varied |= {k for h in mine for k, v in h.items() if defaults.get(k) != v}
        out[method] = varied
    return out
