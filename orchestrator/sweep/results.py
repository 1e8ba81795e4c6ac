"""After the Tune run: how each trial ended, in its child run, in the parent run and on the terminal; the comparison."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detectors.errors import UserInputError
from orchestrator.console import CONSOLE
from orchestrator.sweep.parent_run import _terminate
from orchestrator.sweep.schema import trial_values

if TYPE_CHECKING:
    from orchestrator.sweep.loading import Sweep


def _close_children(client, sweep: Sweep, results, interrupted: bool, max_t: int | None) -> dict[str, int]:
    """Tag each trial's child run with how the trial ended; runs ASHA stopped end as KILLED.

    A trial finished when its MLflow run did (``run_experiment`` got to its end). A trial Tune ended
    without an error before that was stopped early by ASHA, unless the whole sweep was interrupted.
    """
    from orchestrator.tracking import remembered_run_id
    counts = {"finished": 0, "stopped early": 0, "failed": 0, "unfinished": 0}
    for result in results:
        name = result.path.rstrip("/").rsplit("/", 1)[-1]
        metrics = result.metrics or {}
        run_id = (remembered_run_id(sweep.trial_config(trial_values(result.config), name))
                  if client is not None else None)
        status = None
        if run_id is not None:
            try:
                status = client.get_run(run_id).info.status
            except Exception:  # noqa: BLE001
                run_id = None
        if result.error is not None:
            outcome = "failed"
        elif status == "FINISHED" or (status is None and metrics.get("step", 0) >= (max_t or 0) and not interrupted):
            outcome = "finished"
        elif interrupted:
            outcome = "unfinished"
        else:
            outcome = "stopped early"
        counts[outcome] += 1
        if run_id is None:
            continue
        try:
            client.set_tag(run_id, "sweep.outcome", outcome)
            if outcome == "stopped early":  # Tune killed the trial: its run ended RUNNING, or FAILED on the way
                client.set_tag(run_id, "sweep.stopped_at_step", str(metrics.get("step")))
                client.set_terminated(run_id, "KILLED")
            elif outcome == "unfinished" and status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
        except Exception as exc:  # noqa: BLE001
            CONSOLE.warn(f"MLflow tracking failed for trial {name} ({str(exc).splitlines()[0]})")
    return counts


def conclude(sweep: Sweep, results, client, parent_run_id: str | None, started: float,
             compare: bool) -> dict[str, Any]:
    """Record and say how the trials ended, compare them and close the parent run; returns the sweep's outcome."""
    max_t = (sweep.cfg.asha.max_t if sweep.cfg.asha else None) or sweep.base.schedule.iterations
    # Tune catches SIGINT, saves its state and returns: trials are then unfinished or not even created.
    interrupted = (results.num_terminated + results.num_errors < len(results)
                   or len(results) < sweep.cfg.num_trials)
    counts = _close_children(client if parent_run_id else None, sweep, results, interrupted, max_t)
    if parent_run_id is not None:
        _log_counts(client, parent_run_id, counts, sweep.tracking_uri)
    _say_results(sweep, results, counts, interrupted, started)
    outcome = {"parent_run_id": parent_run_id, "tracking_uri": sweep.tracking_uri, "dir": str(sweep.dir),
               "results": results, "counts": counts, "interrupted": interrupted}
    if compare and parent_run_id is not None:
        compared = _compare(sweep, parent_run_id)
        if compared is not None:
            outcome["compare"] = compared
    if parent_run_id is not None:
        _terminate(client, parent_run_id, "KILLED" if interrupted else "FAILED" if counts["failed"] else "FINISHED")
    return outcome


def _log_counts(client, parent_run_id: str, counts: dict[str, int], tracking_uri: str) -> None:
    try:
        for key, value in counts.items():
            client.log_metric(parent_run_id, f"trials_{key.replace(' ', '_')}", value)
    except Exception as exc:  # noqa: BLE001
        CONSOLE.warn(f"MLflow tracking at {tracking_uri} failed ({str(exc).splitlines()[0]})")


def _say_results(sweep: Sweep, results, counts: dict[str, int], interrupted: bool, started: float) -> None:
    CONSOLE.say(f"sweep {sweep.name}: {len(results)} trials in {time.time() - started:.0f} s: "
                + ", ".join(f"{n} {k}" for k, n in counts.items() if n or k != "unfinished"))
    if interrupted:
        CONSOLE.say(f"sweep {sweep.name} interrupted: run the same command again to resume it")
    for result in results:
        if result.error is not None:
            CONSOLE.say(f"  trial {Path(result.path).name} failed: {str(result.error).strip().splitlines()[-1]}")


def _compare(sweep: Sweep, parent_run_id: str) -> dict[str, Any] | None:
    """The trials' table and figures, beside the sweep's other outputs (None where there is nothing to compare)."""
    from orchestrator.compare import compare_runs
    try:
        return compare_runs(sweep.tracking_uri, parent_run_id=parent_run_id, out=sweep.dir / "compare")
    except UserInputError as exc:
        CONSOLE.say(f"note: no comparison: {exc}")
        return None
