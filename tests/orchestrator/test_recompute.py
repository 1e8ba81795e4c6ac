"""E3VA's ``recompute`` through the training loop ``run`` uses: the same run, for less memory."""
from pathlib import Path

import pytest

from orchestrator.config import load_experiment
from orchestrator.train_loop import config_identity, train_locally

TINY = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"


def _tiny(tmp: Path, recompute: bool, *overrides: str):
    return load_experiment(TINY, [f"tuning.hyperparameters.recompute={str(recompute).lower()}",
                                  f"data.synthetic.root={tmp}/data", f"output_dir={tmp}/runs",
                                  f"name=recompute-{recompute}", *overrides])


@pytest.mark.slow
def test_a_run_with_recompute_trains_as_the_run_without(tmp_path):
    """Same seed, drop-path on (the frozen blocks' random numbers are replayed in backward): every
    training loss of the last step and the evaluation after it agree."""
    short = ["schedule.iterations=4", "schedule.warmup_iterations=0", "schedule.decay_at=[]", "checkpoint.period=0",
             "backbone.drop_path_rate=0.2"]
    plain, recomputed = (train_locally(_tiny(tmp_path, r, *short)) for r in (False, True))
    losses = sorted(k for k in plain if k.startswith("train/"))
    assert "train/loss_mask" in losses and plain["step"] == recomputed["step"] == 4
    for key in [*losses, "val/bbox/AP", "val/segm/AP"]:
        assert recomputed[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-9), key


def test_a_checkpoint_is_the_same_model_with_or_without_recompute(tmp_path):
    """Recomputation changes memory, not the model: a run resumes or is evaluated in either mode."""
    assert config_identity(_tiny(tmp_path, True)) == config_identity(_tiny(tmp_path, False))
    assert config_identity(_tiny(tmp_path, True)) != config_identity(
        _tiny(tmp_path, True, "tuning.hyperparameters.rank=4"))
