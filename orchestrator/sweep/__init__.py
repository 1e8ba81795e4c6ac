"""``python -m orchestrator sweep SWEEP.yaml``: an ablation over experiment fields with Ray Tune."""
from orchestrator.sweep.schema import AshaConfig, Dimension, Sweep, SweepConfig, load_sweep, run_sweep, trial_name

__all__ = ["load_sweep", "run_sweep", "SweepConfig", "Dimension", "AshaConfig", "Sweep", "trial_name"]
