"""The transfer benchmark's robust claims, each over two seeds (data order, head and method init):

- the upstream pre-training gives features that transfer: E3VA on the pre-trained swin_mini detects the
  downstream shapes (classes the upstream task never showed) far better than E3VA on a random swin_mini trained
  the same steps on the same data;
- on the *shifted* downstream (speckled greys the upstream never showed, classes told apart only by shape),
  E3VA's highway adapts what the frozen backbone cannot: E3VA above FIXED at each seed.

Benchmarks (`pytest -m benchmark`), not in CI: 10 to 30 minutes each on 2 cores."""
from pathlib import Path

import pytest

from detectors.upstream import UpstreamSpec, ensure_pretrained
from orchestrator.config import load_experiment
from orchestrator.train_loop import train_locally

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo.yaml"
# a short pre-training (about a minute and a half on 2 cores), and a short downstream schedule
UPSTREAM = {"steps": 150, "batch_size": 32, "warmup_steps": 10}
ITERATIONS = 50


def downstream_metrics(tmp: Path, cache: Path | None, seed: int, *overrides: str, upstream: dict = UPSTREAM,
                       iterations: int = ITERATIONS) -> dict:
    """Tunes the demo's E3VA Mask R-CNN (or what the overrides make of it); `cache` None starts from random."""
    start = f"backbone.upstream={ {**upstream, 'cache_dir': str(cache)} }" if cache else "backbone.upstream=null"
    name = "-".join([("pretrained" if cache else "random"), str(seed), *overrides]).replace("/", "_")
    cfg = load_experiment(DEMO, [start, f"seed={seed}", f"schedule.iterations={iterations}",
                                 f"schedule.decay_at=[{iterations * 4 // 5}]", "checkpoint.period=0",
                                 "data.synthetic.num_train=32", f"data.synthetic.root={tmp}/data-{{colours}}",
                                 f"output_dir={tmp}/runs", f"name={name}", "scaling.cpus_per_worker=2", *overrides])
    return train_locally(cfg)


@pytest.mark.slow
@pytest.mark.benchmark  # 10-13 minutes on 2 cores: `pytest -m benchmark`, not in CI
@pytest.mark.timeout(2400)
def test_e3va_on_the_pretrained_backbone_beats_e3va_on_a_random_one(tmp_path):
    cache = tmp_path / "pretrained"
    ensure_pretrained(UpstreamSpec(**UPSTREAM, cache_dir=str(cache)))
    gaps = []
    for seed in (0, 1):
        pretrained = downstream_metrics(tmp_path, cache, seed)["val/bbox/AP50"]
        random = downstream_metrics(tmp_path, None, seed)["val/bbox/AP50"]
        print(f"seed {seed}: AP50 {pretrained:.1f} from the pre-trained backbone, {random:.1f} from a random one")
        gaps.append(pretrained - random)
    assert min(gaps) >= 10 and sum(gaps) / len(gaps) >= 15, gaps


# the transfer benchmark's own budgets (the demo's 300-step pre-training, 100 iterations): at the 150-step
# pre-training and 50 iterations above, both detectors are at 3-8 box AP and E3VA was below FIXED at seed 1
SHIFTED = ("data.synthetic.colours=shifted", "data.synthetic.num_val=32", "tuning.hyperparameters={}")
BENCHMARK_UPSTREAM = {}  # the demo's


@pytest.mark.slow
@pytest.mark.benchmark  # 27 minutes on 2 cores: `pytest -m benchmark`, not in CI
@pytest.mark.timeout(5400)
def test_e3va_adapts_where_the_frozen_backbone_does_not(tmp_path):
    cache = tmp_path / "pretrained"
    gaps = []
    for seed in (0, 1):
        e3va = downstream_metrics(tmp_path, cache, seed, *SHIFTED, upstream=BENCHMARK_UPSTREAM, iterations=100)
        fixed = downstream_metrics(tmp_path, cache, seed, *SHIFTED, "tuning.method=fixed", upstream=BENCHMARK_UPSTREAM,
                                   iterations=100)
        e3va, fixed = e3va["val/bbox/AP"], fixed["val/bbox/AP"]
        print(f"seed {seed}: box AP {e3va:.1f} with E3VA, {fixed:.1f} with the frozen backbone")
        gaps.append(e3va - fixed)
    # with the highway's output zeroed, E3VA came out 0.6 above FIXED at seed 0: the mean's 2 AP is what catches it
    assert min(gaps) > 0 and sum(gaps) / len(gaps) >= 2, gaps
