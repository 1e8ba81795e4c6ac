"""``python -m orchestrator compare``: the papers' comparison table and figures from MLflow runs.

Rows are the runs of an MLflow experiment, or the child runs of a sweep's parent run. Columns, as in
the papers' tables: method, variant, trainable backbone parameters (and % of the backbone, i.e. of
full fine-tuning), peak training memory, seconds per iteration (each with its % of ``full`` when a
``full`` run is among the rows, else ``-``), then each task's figures where runs have them (its
``columns`` in ``orchestrator.tasks``): box and mask AP, mIoU/mAcc/aAcc, the headline ones with their
difference to ``full`` (or to the variant given as ``against``).

Runs that differ only by their seed (same setting, method, variant and hyperparameters) are one row
(``group_runs``): its figures are ``mean ± std`` over the seeds (sample standard deviation), ``n`` says
how many, a difference is one of means, and ``*`` marks one beyond two standard errors
(``sqrt(s1²/n1 + s2²/n2)``). With one seed per row the table is one run per row, without ``±``.

Two figures (PNG, and artifacts of the parent run when one is given), of the first headline figure
the runs have (box AP, mask AP, or mIoU):
- ``ap_vs_memory.png``: it against peak training memory, bubble area = trainable parameters
  (E3VA's Figure 1). Runs on CPU record no peak memory; the x axis is then seconds per iteration,
  and the figure says so.
- ``ap_heatmap.png``: it over two swept hyperparameters (LoRand's Figure 6).
Beside them ``table.txt`` and ``table.json`` (per row: its runs, each figure's mean, std and n, and each
difference with its standard error).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from tabulate import tabulate

from detectors.errors import UserInputError
from orchestrator.console import CONSOLE
from orchestrator.tasks import TASKS, Column

# Params every run of ``orchestrator run`` logs besides the method's hyperparameters.
RUN_PARAMS = {"method", "variant", "backbone", "detector", "engine", "batch_per_worker", "workers", "batch_total",
              "lr", "gpu_kind", "trainable_params", "trainable_percent", "sweep", "sweep.trial_id", "backbone_init",
              "train_images", "seed"}
SEED_PARAM = "seed"  # what the runs of one row differ in
MEMORY_KEYS = ("peak_memory_mb", "train_memory_mb")  # metric or param; the first one a run has


def default_tracking_uri() -> str:
    from orchestrator.tracking import default_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri(Path("outputs") / "run")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _sort_key(value: str):
    number = _number(value)
    return (0, number, "") if number is not None else (1, 0.0, str(value))


class Row:
    """One run's figures, read from its MLflow params and metrics."""

    def __init__(self, client, run):
        params, metrics = run.data.params, run.data.metrics
        self.run_id = run.info.run_id
        self.name = run.info.run_name or self.run_id[:8]
        self.status = run.info.status
        self.outcome = run.data.tags.get("sweep.outcome")
        self.params = params
        self.method = params.get("method", "?")
        self.variant = params.get("variant", self.method)
        self.trainable = _number(params.get("trainable_params"))
        self.percent = _number(params.get("trainable_percent"))
        self.memory, self.memory_key = None, None
        for key in MEMORY_KEYS:
            value = _number(metrics.get(key, params.get(key)))
            if value is not None:
                self.memory, self.memory_key = value, key
                break
        history = [m.value for m in client.get_metric_history(self.run_id, "seconds_per_iteration")
                   if m.step > 1] if "seconds_per_iteration" in metrics else []
        self.seconds = statistics.median(history) if history else _number(metrics.get("seconds_per_iteration"))
        self.metrics = metrics
        self.steps = _number(metrics.get("step"))

    def figure(self, column: Column) -> float | None:
        return _number(self.metrics.get(column.metric))

    def state(self) -> str:
        """How the run ended, in a word or two: finished, failed, stopped early @step."""
        status = self.outcome or self.status.lower()
        if self.outcome == "stopped early" and self.steps is not None:
            status += f" @{self.steps:.0f}"
        return status

    def hyperparameters(self) -> dict[str, str]:
        """The method's own hyperparameters among the run's params."""
        defaults = _defaults(self.variant)
        names = defaults if defaults is not None else [k for k in self.params if k not in RUN_PARAMS and "." not in k]
        return {k: self.params[k] for k in names if k in self.params}


def _defaults(method: str) -> dict[str, str] | None:
    """A method's or variant's default hyperparameters as MLflow params, or None if this checkout
    does not know it (a run from another version)."""
    from detectors.tuning import resolve_method
    try:
        _, config = resolve_method(method, {})
    except UserInputError:
        return None
    return {k: str(v) for k, v in dataclasses.asdict(config).items()}


def find_runs(client, experiment: str | None, parent_run_id: str | None) -> tuple[list, Any]:
    """The runs to compare, oldest first, and the parent run (if any)."""
    from mlflow.exceptions import MlflowException
    if experiment is None and parent_run_id is None:
        raise UserInputError("give --experiment NAME, --parent RUN_ID or both")
    parent = None
    if parent_run_id is not None:
        try:
            parent = client.get_run(parent_run_id)
        except MlflowException:
            raise UserInputError(f"--parent {parent_run_id}: no such MLflow run") from None
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments()]
            raise UserInputError(f"--experiment {experiment!r}: no such MLflow experiment "
                                 f"(there are: {', '.join(names) or 'none'})")
        experiment_ids = [found.experiment_id]
        if parent is not None and parent.info.experiment_id != found.experiment_id:
            raise UserInputError(f"--parent {parent_run_id} is not a run of experiment {experiment!r}")
    else:
        experiment_ids = [parent.info.experiment_id]
    where = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
    runs = client.search_runs(experiment_ids, filter_string=where, max_results=5000, order_by=["start_time ASC"])
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    runs = [r for r in runs if r.info.run_id not in parents and r.data.tags.get("sweep.parent") != "true"]
    if not runs:
        what = f"child runs of {parent_run_id}" if parent_run_id else f"runs in experiment {experiment!r}"
        raise UserInputError(f"no {what} to compare")
    return runs, parent


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{100 * value / reference:.0f}%"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


SETTING_PARAMS = ("backbone_init", "train_images")  # what a method is run on, besides the sweep's own fields


def settings(rows: list[Row]) -> dict[str, str]:
    """Each run's setting (what it was run on, where runs differ in more than the method), by run id:
    the backbone's start, the data budget and the sweep's fields other than the method's own. Where
    the runs' seeds differ, a random start is ``random`` (its seed is the run's, not the setting's)."""
    seeds_differ = len({r.params.get(SEED_PARAM) for r in rows}) > 1

    def value(row: Row, key: str) -> str:
        given = row.params.get(key, "-")
        if seeds_differ and key == "backbone_init" and given == f"random s{row.params.get(SEED_PARAM)}":
            return "random"
        return given

    candidates = set(SETTING_PARAMS) | {k for r in rows for k in r.params
                                        if "." in k and k != "sweep.trial_id" and not k.startswith("tuning.")}
    varied = sorted(k for k in candidates if len({value(r, k) for r in rows}) > 1)
    if "backbone_init" in varied:  # the sweep's own field for it says the same, less readably
        varied = [k for k in varied if not k.startswith("backbone.")]
    if "train_images" in varied:
        varied = [k for k in varied if k != "data.synthetic.num_train"]
    return {r.run_id: " ".join(f"{k.rsplit('.', 1)[-1]}={value(r, k)}" for k in varied) for r in rows}


def figure_columns(rows: list[Row]) -> list[Column]:
    """The columns of the tasks some run has figures for (detection's when none has any)."""
    have = [task.columns for task in TASKS.values() if any(r.figure(c) is not None for c in task.columns for r in rows)]
    return [c for columns in have or [TASKS["detection"].columns] for c in columns]


def headline_column(rows: list[Row]) -> Column:
    """What the figures plot: the first plotted figure (box AP, mask AP, mIoU) the runs have."""
    plotted = [c for c in figure_columns(rows) if c.plotted]
    return next((c for c in plotted if any(r.figure(c) is not None for r in rows)), plotted[0])


# ----------------------------------------------------------------------------- seeds

@dataclasses.dataclass(frozen=True)
class Stats:
    """A figure over the runs of a group: mean, sample standard deviation (n - 1; None for one run), n."""
    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values) -> Stats | None:
        values = [v for v in values if v is not None]
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def cell(self) -> str:
        return _fmt(self.mean) if self.std is None else f"{self.mean:.1f} ± {self.std:.1f}"

    def minus(self, other: Stats) -> Difference:
        """The difference of means, with its standard error where both sides have a spread."""
        if self.std is None or other.std is None:
            return Difference(self.mean - other.mean, None)
        return Difference(self.mean - other.mean, math.sqrt(self.std ** 2 / self.n + other.std ** 2 / other.n))


@dataclasses.dataclass(frozen=True)
class Difference:
    value: float
    se: float | None  # sqrt(s1²/n1 + s2²/n2); None where a side has one run

    @property
    def significant(self) -> bool:
        """Beyond two standard errors of the difference."""
        return self.se is not None and abs(self.value) > 2 * self.se

    def cell(self) -> str:
        return f"{self.value:+.1f}" + ("*" if self.significant else "")


class Group:
    """Runs that differ only by their seed: one row of the table. Costs are means; figures are ``Stats``."""

    def __init__(self, rows: list[Row], setting: str):
        self.rows, self.setting, self.n = rows, setting, len(rows)
        first = rows[0]
        self.name = first.name if self.n == 1 else f"{first.name} +{self.n - 1}"
        self.method, self.variant = first.method, first.variant
        self.trainable, self.percent = first.trainable, first.percent
        self.memory = _mean(r.memory for r in rows)
        self.seconds = _mean(r.seconds for r in rows)

    def stats(self, column: Column) -> Stats | None:
        return Stats.of(r.figure(column) for r in self.rows)

    def hyperparameters(self) -> dict[str, str]:
        return self.rows[0].hyperparameters()

    def state(self) -> str:
        return ", ".join(dict.fromkeys(r.state() for r in self.rows))


def group_runs(rows: list[Row]) -> list[Group]:
    """The table's rows: runs with the same setting, method, variant and hyperparameters (so differing at
    most in their seed) make one group, in the order of their first run; groups sorted by setting."""
    setting_of = settings(rows)
    members: dict[tuple, list[Row]] = {}
    for r in rows:
        key = (setting_of[r.run_id], r.method, r.variant, tuple(sorted(r.hyperparameters().items())))
        members.setdefault(key, []).append(r)
    return sorted((Group(runs, key[0]) for key, runs in members.items()), key=lambda g: g.setting)


def references(groups: list[Group], against: str) -> dict[str, Group | None]:
    """Per setting, what its rows are compared with: all its runs of the variant ``against`` (None if none)."""
    out = {}
    for setting in dict.fromkeys(g.setting for g in groups):
        runs = [r for g in groups if g.setting == setting and g.variant == against for r in g.rows]
        out[setting] = Group(runs, setting) if runs else None
    return out


def _difference(group: Group, ref: Group | None, column: Column) -> Difference | None:
    mine, theirs = group.stats(column), ref.stats(column) if ref is not None else None
    return mine.minus(theirs) if mine is not None and theirs is not None else None


# ----------------------------------------------------------------------------- table

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


# ----------------------------------------------------------------------------- figures

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ap_vs_memory(groups: list[Group], path: Path) -> str | None:
    """The headline figure (box AP, mask AP or mIoU) against peak training memory, one point per group (its
    means, a bar of ± std where it has several seeds), bubble area = trainable parameters. Returns a note, if any."""
    plt = _pyplot()
    note = None
    rows = [r for g in groups for r in g.rows]
    use_memory = any(r.memory is not None for r in rows)
    x_of = (lambda g: g.memory) if use_memory else (lambda g: g.seconds)
    headline = headline_column(rows)
    if use_memory:
        keys = {r.memory_key for r in rows if r.memory_key}
        xlabel = "peak training memory (MB)" if keys == {"peak_memory_mb"} else "training memory (MB)"
    else:
        xlabel = "seconds per iteration"
        note = "no run recorded peak memory (CPU runs): x axis is seconds per iteration"
    shown = [g for g in groups if x_of(g) is not None and g.stats(headline) is not None]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    if shown:
        biggest = max((g.trainable or 0) for g in shown) or 1
        methods = sorted({g.method for g in shown})
        colours = plt.get_cmap("tab10")
        marker_of = {setting: "osD^vP*X"[i % 8] for i, setting in enumerate(sorted({g.setting for g in shown}))}
        for i, method in enumerate(methods):
            for setting, marker in marker_of.items():
                mine = [g for g in shown if g.method == method and g.setting == setting]
                xs, ys = [x_of(g) for g in mine], [g.stats(headline) for g in mine]
                sizes = [60 + 1500 * (g.trainable or 0) / biggest for g in mine]
                ax.scatter(xs, [y.mean for y in ys], marker=marker, s=sizes, alpha=0.55, color=colours(i % 10),
                           edgecolors="black")
                if any(y.std for y in ys):
                    ax.errorbar(xs, [y.mean for y in ys], yerr=[y.std or 0 for y in ys], fmt="none",
                                ecolor=colours(i % 10), capsize=3)
                for g, y in zip(mine, ys):  # with several settings the marker says which: the method name is enough
                    ax.annotate(g.method if len(marker_of) > 1 else g.name, (x_of(g), y.mean), fontsize=7,
                                xytext=(4, 4), textcoords="offset points")
        from matplotlib.lines import Line2D
        handles = [Line2D([], [], marker="o", linestyle="", color=colours(i % 10), label=method)
                   for i, method in enumerate(methods)]
        if len(marker_of) > 1:
            handles += [Line2D([], [], marker=marker, linestyle="", color="grey", label=setting)
                        for setting, marker in marker_of.items()]
        if len(marker_of) > 1:  # the settings' names are long: the legend goes beside the axes
            fig.set_size_inches(11, 5)
            ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            ax.legend(handles=handles, fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, f"no run has both {headline.header} and the x figure", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(headline.header)
    title = f"{headline.header} vs training cost (bubble area = trainable backbone parameters"
    title += "; bars: ± std over seeds)" if any(g.n > 1 for g in shown) else ")"
    ax.set_title(title if note is None else f"{title}\n{note}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return note


def swept_keys(rows: list[Row], parent) -> list[str]:
    """Params that take more than one value among the rows, the sweep's space first."""
    def varies(key: str) -> bool:
        return len({r.params.get(key) for r in rows if key in r.params}) > 1

    space = json.loads(parent.data.tags.get("sweep.space", "[]")) if parent is not None else []
    keys = [k for k in space if k != SEED_PARAM and varies(k)]
    if not keys:  # runs from outside a sweep: dotted (sweep) params, then the methods' hyperparameters
        keys = sorted({k for r in rows for k in r.params if "." in k and k != "sweep.trial_id" and varies(k)})
    if len(keys) < 2:
        hyper = sorted({k for r in rows for k in r.hyperparameters() if varies(k)})
        keys += [k for k in hyper if not any(s.rsplit(".", 1)[-1] == k for s in keys)]
    return keys


def plot_heatmap(rows: list[Row], keys: tuple[str, str], path: Path) -> None:
    """The mean headline figure of the runs with each pair of values of ``keys`` (LoRand's Figure 6)."""
    plt = _pyplot()
    import numpy as np
    first, second = keys
    ys = sorted({r.params[first] for r in rows if first in r.params}, key=_sort_key)
    xs = sorted({r.params[second] for r in rows if second in r.params}, key=_sort_key)
    headline = headline_column(rows)
    grid = np.full((len(ys), len(xs)), np.nan)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            values = [r.figure(headline) for r in rows
                      if r.params.get(first) == y and r.params.get(second) == x]
            mean = _mean(values)
            if mean is not None:
                grid[i, j] = mean
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 1.0 * len(ys) + 2.5), dpi=100)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    low, high = (np.nanmin(grid), np.nanmax(grid)) if not np.isnan(grid).all() else (0.0, 0.0)
    for i in range(len(ys)):
        for j in range(len(xs)):
            value = grid[i, j]
            light = math.isnan(value) or (high > low and (value - low) / (high - low) > 0.6)
            ax.text(j, i, "-" if math.isnan(value) else f"{value:.1f}", ha="center", va="center",
                    color="black" if light else "white", fontsize=9)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(second)
    ax.set_ylabel(first)
    ax.set_title(f"{headline.header} over {first.rsplit('.', 1)[-1]} x {second.rsplit('.', 1)[-1]}", fontsize=10)
    fig.colorbar(image, ax=ax, label=headline.header)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pick_heatmap_keys(rows: list[Row], parent, requested: str | None) -> tuple[str, str]:
    available = swept_keys(rows, parent)
    if requested is not None:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        if len(names) != 2:
            raise UserInputError(f"--heatmap {requested!r}: give two params, e.g. branches,kernel")
        keys = []
        for name in names:
            match = [k for k in available if k == name or k.rsplit(".", 1)[-1] == name]
            if not match:
                raise UserInputError(f"--heatmap: {name!r} does not vary among these runs "
                                     f"(varied: {', '.join(available) or 'none'})")
            keys.append(match[0])
        return keys[0], keys[1]
    if len(available) < 2:
        raise UserInputError(f"a heat map needs two swept hyperparameters; these runs vary "
                             f"{len(available)}: {', '.join(available) or 'none'}")
    return available[0], available[1]


def compare_runs(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
                 out: str | Path | None = None, heatmap: str | None = None,
                 against: str | None = None) -> dict[str, Any]:
    """Print the table, write the figures (and log them to the parent run); returns what it made.
    ``against``: the variant each setting's rows are compared with (default ``full``)."""
    from mlflow.tracking import MlflowClient
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserInputError(f"no MLflow store at {uri} (give --tracking-uri)")
    client = MlflowClient(tracking_uri=uri)
    runs, parent = find_runs(client, experiment, parent_run_id)
    rows = [Row(client, run) for run in runs]
    groups = group_runs(rows)
    if against is not None and not any(g.variant == against for g in groups):
        raise UserInputError(f"--against {against}: no such run among these (there are: "
                             f"{', '.join(dict.fromkeys(g.variant for g in groups))})")
    against = against or "full"
    table = build_table(groups, against)
    title = f"{len(rows)} runs" + (f" of experiment {experiment!r}" if experiment else "") + \
        (f" under sweep run {parent_run_id} ({parent.info.run_name})" if parent is not None else "")
    CONSOLE.say(title)
    CONSOLE.say(table)

    out = Path(out or Path("outputs") / "compare")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(f"{title}\n{table}\n")
    made = {"rows": rows, "groups": summary(groups, against), "table": table, "table_path": out / "table.txt",
            "json_path": out / "table.json", "notes": []}
    made["json_path"].write_text(json.dumps(made["groups"], indent=1) + "\n")
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
    plots = [p for p in (made.get("ap_vs_memory"), made.get("ap_heatmap")) if p is not None]
    CONSOLE.say("wrote " + ", ".join(str(p) for p in [made["table_path"], made["json_path"], *plots]))
    if parent is not None:
        try:
            for path in [made["table_path"], made["json_path"], *plots]:
                client.log_artifact(parent.info.run_id, str(path), "compare")
        except Exception as exc:  # noqa: BLE001
            CONSOLE.say(f"warning: could not log the figures to MLflow ({str(exc).splitlines()[0]})")
    return made


__all__ = ["compare_runs"]
