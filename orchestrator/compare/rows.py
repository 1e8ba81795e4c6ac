"""The table's rows: each run's figures (``Row``), and the runs that differ only by seed as one (``Group``)."""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from detectors.errors import UserInputError
from orchestrator.tasks import TASKS, Column

# Params every run of ``orchestrator run`` logs besides the method's hyperparameters.
RUN_PARAMS = {"method", "variant", "backbone", "detector", "engine", "batch_per_worker", "workers", "batch_total",
              "lr", "gpu_kind", "trainable_params", "trainable_percent", "sweep", "sweep.trial_id", "backbone_init",
              "train_images", "seed"}
SEED_PARAM = "seed"  # what the runs of one row differ in
MEMORY_KEYS = ("peak_memory_mb", "train_memory_mb")  # metric or param; the first one a run has


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
        """The method's own hyperparameters among the run's params. One the run does not name is at its
        default: the run predates it (e.g. E3VA's ``recompute``), so it groups with runs at the default."""
        defaults = _defaults(self.variant)
        if defaults is None:
            return {k: v for k, v in self.params.items() if k not in RUN_PARAMS and "." not in k}
        return {k: self.params.get(k, default) for k, default in defaults.items()}


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
    runs = one_run_per_trial([r for r in runs if r.info.run_id not in parents and r.data.tags.get("sweep.parent") != "true"])
    if not runs:
        what = f"child runs of {parent_run_id}" if parent_run_id else f"runs in experiment {experiment!r}"
        raise UserInputError(f"no {what} to compare")
    return runs, parent


def one_run_per_trial(runs: list) -> list:
    """A sweep trial that failed and was retried, or was cut off and resumed, leaves an MLflow run per attempt:
    its finished attempt (else its last) stands for it, so a seed is never counted twice or as a failure."""
    chosen: dict[tuple, Any] = {}
    for run in runs:  # oldest first
        trial = run.data.params.get("sweep.trial_id")
        key = (run.data.tags.get("mlflow.parentRunId"), trial) if trial else (run.info.run_id,)
        if key not in chosen or chosen[key].info.status != "FINISHED":
            chosen[key] = run
    kept = {id(run) for run in chosen.values()}
    return [run for run in runs if id(run) in kept]


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
