"""``python -m orchestrator sweep SWEEP.yaml``: an ablation over experiment fields with Ray Tune.

A sweep file names a base experiment (relative to the sweep file), overrides of it, a search space
over any experiment field by dotted path, optional ASHA early stopping and how many trials run at
once. Each trial is one Ray Train run with its own workers: a function trainable builds the trial's
``TorchTrainer`` (``run_experiment``) with ``TuneReportCallback`` in its ``RunConfig``, so every
report of the Train run reaches Tune and its scheduler (Ray 2.60's Train V2 pattern).

Everything a user can get wrong is found before any trial starts: every grid value is applied to the
base experiment and validated, and each trial's resources are compared with the Ray cluster's.

MLflow: one parent run for the sweep, one child run per trial (``mlflow.parentRunId``) with the
trial's varied fields as params. Running the same sweep again restores it from its Tune state
(``Tuner.restore``) and keeps the parent run, whose id lives in the sweep's storage beside that
state: the base experiment's ``storage`` (``<storage>/<sweep name>/tune``, the trials' Ray Train
runs in ``.../trials``), or by default the sweep's output directory. The trials' own drivers only
wait on their Train runs and log to MLflow; they run on the sweep driver's node, so a tracking
store or output directory on that node's disk serves them on a cluster too.
"""
from orchestrator.sweep.loading import Sweep, load_sweep
from orchestrator.sweep.schema import AshaConfig, Dimension, SweepConfig
# Tune pickles the trial name creator with its state: sweeps saved before the split resume through this name.
from orchestrator.sweep.trials import trial_name
from orchestrator.sweep.tune_run import run_sweep

__all__ = ["load_sweep", "run_sweep", "SweepConfig", "Dimension", "AshaConfig", "Sweep", "trial_name"]
