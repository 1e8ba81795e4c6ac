"""The sweep's Tune run: checks of the cluster, the recorded sweep it may resume, the Tuner and its terminal lines."""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

from detectors.errors import UserInputError
from orchestrator.cluster import check_resources, check_state_api, check_storage_reach, connect
from orchestrator.sweep.loading import Sweep
from orchestrator.sweep.parent_run import SWEEP_FILE, _parent_run, _terminate
from orchestrator.sweep.results import conclude
from orchestrator.sweep.trials import _trainable, trial_name


def run_sweep(sweep: Sweep, compare: bool = True) -> dict[str, Any]:
    """Run the sweep's trials with Ray Tune, or resume them where the same sweep stopped; returns how each
    ended (``results``, ``counts``) and where they are recorded."""
    connect(dashboard=True)  # its state API is how Train frees the workers of a trial ASHA stopped
    fits = _check_before_trials(sweep)
    # Trials run in the job's working directory, as `run` does, so relative data paths mean the same.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    resuming = _record_sweep(sweep)
    client, parent_run_id = _parent_run(sweep, resuming)
    trainable = _trainable(sweep, parent_run_id)
    status = "FAILED"
    started = time.time()
    try:
        results = _tuner(sweep, trainable, resuming, fits).fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent_run_id is not None and status != "FINISHED":
            _terminate(client, parent_run_id, status)
    return conclude(sweep, results, client, parent_run_id, started, compare)


def _check_before_trials(sweep: Sweep) -> int:
    """What a trial would otherwise fail on, checked once for all of them; returns how many trials fit at once."""
    import ray
    configs = sweep.configs
    fits = check_resources(sweep.path, configs)
    if sweep.cfg.asha is not None:
        check_state_api(sweep.path)
    from orchestrator.run import preflight
    seen = set()
    for cfg in configs:  # data and weights of each distinct setup, once (writes the synthetic data once)
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.backbone.model_dump(mode="json"),
                          cfg.model.engine, cfg.model.detector], sort_keys=True)
        if key not in seen:
            seen.add(key)
            preflight(cfg)
    nodes, here = ray.nodes(), ray.get_runtime_context().get_node_id()
    for cfg in configs:  # the trials' workers may land on other nodes; their storage must reach them
        check_storage_reach(cfg.ray_storage(), nodes, cfg.scaling.worker_resources(), here,
                            fixed_cluster=cfg.scaling.check_cluster)
    return fits


def _record_sweep(sweep: Sweep) -> bool:
    """Keep what this sweep is beside its Tune state; returns whether that state is there to resume from.
    A different sweep's state there is refused."""
    from ray import tune
    storage = sweep.storage
    sweep.dir.mkdir(parents=True, exist_ok=True)
    fingerprint = json.dumps(_fingerprint(sweep), sort_keys=True, default=str)
    resuming = tune.Tuner.can_restore(storage.path("tune"),
                                      storage_filesystem=storage.ray_kwargs().get("storage_filesystem"))
    recorded = storage.read_text(storage.path(SWEEP_FILE))
    if resuming and recorded is not None and recorded != fingerprint:
        raise UserInputError(f"{sweep.path}: {storage.uri} holds a different sweep (base, space or ASHA changed); "
                             f"give this one another name (--set sweep.name=...) or output_dir")
    storage.write_text(storage.path(SWEEP_FILE), fingerprint)
    (sweep.dir / SWEEP_FILE).write_text(fingerprint)  # the parent run's artifact
    return resuming


def _tuner(sweep: Sweep, trainable, resuming: bool, fits: int):
    from ray import tune
    storage = sweep.storage
    if resuming:
        return tune.Tuner.restore(storage.path("tune"), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True,
                                  storage_filesystem=storage.ray_kwargs().get("storage_filesystem"))
    return tune.Tuner(
        trainable, param_space=sweep.cfg.param_space(),
        tune_config=tune.TuneConfig(
            num_samples=sweep.cfg.num_samples, scheduler=_scheduler(sweep),
            max_concurrent_trials=sweep.cfg.max_concurrent_trials or fits,
            trial_name_creator=functools.partial(trial_name, sweep.name, _numbered(sweep)),
            trial_dirname_creator=functools.partial(trial_name, sweep.name, _numbered(sweep))),
        run_config=tune.RunConfig(name="tune", **storage.ray_kwargs(), verbose=1,
                                  callbacks=[_trial_lines(sweep.cfg.num_trials, sweep.base.task.headline)]))


def _numbered(sweep: Sweep) -> bool:
    return sweep.cfg.num_samples > 1 or sweep.cfg.random


def _trial_lines(total: int, headline: str):
    """A Tune callback (in this driver): one line as each trial starts and as it ends, with the count.
    Tune pickles it with its state, so it finds the terminal when called, not when made."""
    from ray.tune import Callback

    def say(text: str) -> None:
        from orchestrator.console import CONSOLE
        CONSOLE.say(text)

    class TrialLines(Callback):
        def __init__(self):
            self.ended = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            say(f"trial {trial} started")

        def _ended(self, trial, how: str) -> None:
            self.ended += 1
            result = trial.last_result or {}
            figures = ", ".join(f"{key} {result[key]:.4g}" for key in ("train/loss", headline) if key in result)
            say(f"trial {trial} {how} at step {result.get('step', 0)}" + (f" ({figures})" if figures else "")
                + f"  [{self.ended}/{total} trials ended]")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trial, "ended")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, "failed")
    return TrialLines()


def _scheduler(sweep: Sweep):
    asha = sweep.cfg.asha
    if asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler
    return ASHAScheduler(time_attr="step", metric=asha.metric, mode=asha.resolved_mode,
                         max_t=asha.max_t or sweep.base.schedule.iterations, grace_period=asha.grace_period,
                         reduction_factor=asha.reduction_factor,
                         stop_last_trials=False)  # a trial that reaches max_t ends by itself, logging its results


def _fingerprint(sweep: Sweep) -> dict[str, Any]:
    return {"base": sweep.base_raw, "route": sweep.cfg.route,
            **({"by_method": sweep.cfg.by_method} if sweep.cfg.by_method else {}),
            "space": {k: v.model_dump(exclude_none=True) for k, v in sweep.cfg.space.items()},
            **({"include": sweep.cfg.include} if sweep.cfg.include else {}),
            "num_samples": sweep.cfg.num_samples,
            "asha": sweep.cfg.asha.model_dump() if sweep.cfg.asha else None}
