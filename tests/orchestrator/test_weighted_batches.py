"""Per-worker batch sizes: 2 Ray Train workers with batches of 1 and 3 take the step of one process
with a batch of 4, for the E3VA backbone under a per-sample loss (gloo on CPU)."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")

from detectors.backbones import build_swin  # noqa: E402
from detectors.data.sampling import ProportionalBatchSampler, rank_loss_weight  # noqa: E402
from detectors.errors import UserInputError  # noqa: E402
from detectors.tuning import build_tuning  # noqa: E402
from orchestrator.config import load_experiment  # noqa: E402
from orchestrator.train_loop import worker_batch_size  # noqa: E402

TINY_EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"  # random init: no pre-training
SIZES = [1, 3]
LR = 0.5
# A detector step on 2 workers (1 + 3 images) against one process on the 4: measured relative difference
# 0.001 with the weights, 0.212 without (DDP's plain mean over the ranks).
COSINE, RELATIVE = 0.999, 0.02
DETECTOR_DATA = "/tmp/e3va-test-weighted-batches-tiny"  # written once, atomically, by whichever rank is first


def tiny_e3va():
    torch.manual_seed(0)
    model = build_swin("swin_t", depths=(1, 1, 2, 1), embed_dim=32, num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    return build_tuning("e3va", rank=4).apply(model)


def images() -> torch.Tensor:
    return torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def mean_sample_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean over samples of a per-sample loss: each feature map against a fixed probe."""
    features = model(batch)
    probes = torch.Generator().manual_seed(2)
    return sum((f * torch.randn(f.shape[1:], generator=probes)).flatten(1).sum(1) for f in features.values()).mean()


def sgd_step(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_weighted_step(config: dict) -> None:
    """Runs in each Ray Train worker."""
    import ray.train
    import ray.train.torch
    rank = ray.train.get_context().get_world_rank()
    model = tiny_e3va()
    ddp = ray.train.torch.prepare_model(model, move_to_device=False)
    batch = ProportionalBatchSampler(8, SIZES, rank, seed=0).batches()[0]
    weight = rank_loss_weight(SIZES, rank) if config["weighted"] else 1.0
    params = sgd_step(model, mean_sample_loss(ddp, images()[batch]) * weight)
    if rank == 0:
        torch.save(params, config["out"])


def run_two_workers(tmp_path, weighted: bool) -> dict[str, torch.Tensor]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    out = tmp_path / f"params-{weighted}.pt"
    TorchTrainer(one_weighted_step, train_loop_config={"out": str(out), "weighted": weighted},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name=f"weighted-{weighted}")).fit()
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def ray_local():
    import sys
    import ray
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_batches_of_1_and_3_on_two_workers_step_like_one_batch_of_4(tmp_path, ray_local):
    union = [i for rank in range(2) for i in ProportionalBatchSampler(8, SIZES, rank, seed=0).batches()[0]]
    assert len(set(union)) == 4
    model = tiny_e3va()
    reference = sgd_step(model, mean_sample_loss(model, images()[union]))
    distributed = run_two_workers(tmp_path, weighted=True)
    # float32 sums in another order (two partial gradients all-reduced): ~1e-6 apart, measured up to 1.6e-6
    for name, value in reference.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # Without the weights, DDP's plain mean over ranks over-counts the lone sample: not the same step.
    unweighted = run_two_workers(tmp_path, weighted=False)
    assert max((unweighted[n] - v).abs().max().item() for n, v in reference.items()) > 1e-4


# Faster R-CNN without subsampling: every anchor and proposal takes part, so its losses are means over
# images (measured: a batch's gradient within 0.1-3.6% of the mean of its images' per loss). Mask R-CNN's
# mask loss is a mean over the batch's positive proposals instead, which weights images by their positives
# (32% apart): no per-rank weight can reproduce that, and it would hide a wrong weighting.
EVERY_SAMPLE = ["model.detector=faster_rcnn", "model.options.rpn_batch_size_per_image=1000000",
                "model.options.box_batch_size_per_image=100000"]


def tiny_detector():
    from orchestrator.train_loop import build_datasets, build_model
    cfg = load_experiment(TINY_EXPERIMENT, ["backbone.drop_path_rate=0", "data.synthetic.num_train=8",
                                            f"data.synthetic.root={DETECTOR_DATA}", *EVERY_SAMPLE])
    train, _ = build_datasets(cfg)
    torch.manual_seed(0)
    return train, build_model(cfg, train.num_classes)


def detector_step(model, forward_model, train, indices, sampling_seed: int, weight: float) -> torch.Tensor:
    from detectors.data import collate_fn
    items = []
    for i in indices:
        torch.manual_seed(123 + i)  # each image flipped alike in one process and on its rank
        items.append(train[i])
    images, targets = collate_fn(items)
    torch.manual_seed(sampling_seed)  # anchors and proposals sampled
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    optimizer.zero_grad()
    (sum(forward_model(list(images), list(targets)).values()) * weight).backward()
    optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]) - before


def one_detector_step(config: dict) -> None:
    import ray.train
    import ray.train.torch
    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    train, model = tiny_detector()
    ddp = ray.train.torch.prepare_model(model, move_to_device=False,
                                        parallel_strategy_kwargs={"find_unused_parameters": True})
    indices = ProportionalBatchSampler(len(train), SIZES, rank, seed=0).batches()[0]
    weight = rank_loss_weight(SIZES, rank) if config["weighted"] else 1.0
    update = detector_step(model, ddp, train, indices, 7 + rank, weight)
    if rank == 0:
        torch.save(update, config["out"])


def test_a_detector_step_on_two_workers_is_close_to_one_process_step(tmp_path, ray_local):
    """Close (float sums in another order, and a batch's loss is a mean over its images only to within a few
    percent), and far closer than the step DDP's plain mean over the ranks takes (each rank's loss weighted 1)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    torch.set_num_threads(1)
    train, model = tiny_detector()
    union = [i for rank in range(2) for i in ProportionalBatchSampler(len(train), SIZES, rank, seed=0).batches()[0]]
    single = detector_step(model, model, train, union, 7, 1.0)
    figures = {}
    for weighted in (True, False):
        out = tmp_path / f"update-{weighted}.pt"
        TorchTrainer(one_detector_step, train_loop_config={"out": str(out), "weighted": weighted},
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(storage_path=str(tmp_path / "ray"), name=f"detector-{weighted}")).fit()
        distributed = torch.load(out, weights_only=True)
        figures[weighted] = (torch.nn.functional.cosine_similarity(distributed, single, dim=0).item(),
                             ((distributed - single).norm() / single.norm()).item())
        print(f"detector update, 2 workers (1+3, {'weighted' if weighted else 'unweighted'}) vs 1 process (4): "
              f"cosine {figures[weighted][0]:.4f}, relative difference {figures[weighted][1]:.3f}")
    (cosine, relative), (_, unweighted_relative) = figures[True], figures[False]
    assert cosine > COSINE and relative < RELATIVE
    assert unweighted_relative > 5 * RELATIVE, figures


def test_each_worker_takes_the_batch_size_of_its_gpu_kind():
    cfg = load_experiment(TINY_EXPERIMENT, ["scaling.workers=2", "schedule.batch_size={v100: 4, 1080ti: 1, cpu: 2}"])
    cpu = torch.device("cpu")
    assert worker_batch_size(cfg, 0, cpu, {"CPU": 8.0, "gpu_v100": 1.0}) == (4, {})
    assert worker_batch_size(cfg, 1, cpu, {"CPU": 8.0, "accelerator_type:1080Ti": 1.0}) == (1, {})
    assert worker_batch_size(cfg, 1, cpu, {"CPU": 8.0}) == (2, {})
    only_gpus = load_experiment(TINY_EXPERIMENT, ["scaling.workers=2", "schedule.batch_size={v100: 4}"])
    with pytest.raises(UserInputError, match="worker 1 runs on 'CPU', a kind with no batch size here"):
        worker_batch_size(only_gpus, 1, cpu, {"CPU": 8.0, "gpu_p100": 1.0})
