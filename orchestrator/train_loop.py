"""The per-worker training loop: data, model, DDP, AdamW schedule, evaluation, checkpoints.

``train_loop_per_worker`` runs inside every Ray Train worker; ``train_locally`` runs the same loop
in this process without Ray (for the overhead comparison and for debugging). It is the only place
that calls ``ray.train.report``: once a step, with a checkpoint where one is due. Workers never
talk to MLflow; the driver logs their reports (``orchestrator.tracking.metrics_callback``).
What differs between detection and segmentation comes from the experiment's task
(``orchestrator.tasks``). Evaluation is sharded: every rank predicts its own share of the validation
split, and rank 0 scores it once over all of them (COCO AP, or mIoU from the summed confusion matrices), while the other ranks wait in Ray's report (which has no
timeout), not in the process group. What follows each step (reports, evaluation, checkpoints) is
``orchestrator.train_reporter``'s ``StepReporter``.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from detectors.data.sampling import ProportionalBatchSampler, rank_loss_weight
from detectors.errors import UserInputError
from detectors.training import training_step
from detectors.tuning import resolve_method, result_hyperparameters
from orchestrator.checkpointing import backbone_fingerprint, load_checkpoint, trained_buffers
from orchestrator.config import ExperimentConfig
from orchestrator.gpu_kinds import CPU, kind_from_name, kind_from_resources
from orchestrator.train_reporter import MAX_STEPS_PER_REPORT, POLL_INTERVAL_VARIABLE, StepReporter, steps_per_report


def build_datasets(cfg: ExperimentConfig):
    """The training and validation datasets of the experiment's task."""
    return cfg.task.build_datasets(cfg)


def build_model(cfg: ExperimentConfig, num_classes: int):
    """The experiment's detector or segmentation model, its backbone tuned as the file says."""
    return cfg.task.build_model(cfg, num_classes)


def lr_factor(cfg: ExperimentConfig, iterations_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up times the decay: a factor ``gamma`` at every decay point (iterations, or epochs),
    or poly, ``(1 - iteration / total) ** power`` (mmcv's rule: warm-up scales the decayed rate)."""
    s = cfg.schedule
    scale = iterations_per_epoch if s.epochs else 1
    decays = sorted(int(point * scale) for point in s.decay_at)
    total = s.iterations or s.epochs * iterations_per_epoch

    def factor(iteration: int) -> float:
        warm = 1.0
        if iteration < s.warmup_iterations:
            alpha = iteration / s.warmup_iterations
            warm = s.warmup_factor * (1 - alpha) + alpha
        if s.policy == "poly":
            return warm * max(1 - iteration / total, 0.0) ** s.power
        return warm * s.gamma ** sum(iteration >= d for d in decays)
    return factor


def worker_batch_size(cfg: ExperimentConfig, rank: int, device: torch.device,
                      node_resources: dict) -> tuple[int, dict[str, Any]]:
    """This worker's images per step (fixed by the file, looked up by the kind of its GPU, or planned)
    and the tuning hyperparameters the planner switched on to fit them (``{}``: none)."""
    fixed = cfg.batch_sizes()
    if fixed is not None:
        return fixed[rank], {}
    by_kind = cfg.schedule.batch_size
    if by_kind == "auto":
        from orchestrator.plan import auto_batch_size
        memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
        return auto_batch_size(cfg, device, memory)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = kind_from_resources(node_resources, by_kind) or kind_from_name(name, by_kind)
    else:
        name, kind = "CPU", kind_from_resources(node_resources, by_kind) or (CPU if CPU in by_kind else None)
    if kind is None:
        raise UserInputError(f"schedule.batch_size: worker {rank} runs on {name!r}, a kind with no batch size "
                             f"here (given: {', '.join(by_kind)})")
    return by_kind[kind], {}


def with_hyperparameters(cfg: ExperimentConfig, switched: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with ``switched`` added to its tuning hyperparameters."""
    if not switched:
        return cfg
    tuning = cfg.tuning.model_copy(update={"hyperparameters": {**cfg.tuning.hyperparameters, **switched}})
    return cfg.model_copy(update={"tuning": tuning})


def config_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a checkpoint must have been made for, as far as the experiment file says."""
    method, _ = resolve_method(cfg.tuning.method, cfg.tuning.hyperparameters)
    hparams = result_hyperparameters(cfg.tuning.method, cfg.tuning.hyperparameters)
    return {"backbone": cfg.backbone.name, "method": method, "hyperparameters": hparams,
            "detector": cfg.task.model_id(cfg)}


def run_identity(cfg: ExperimentConfig, detector) -> dict[str, Any]:
    return {**config_identity(cfg), "fingerprint": backbone_fingerprint(detector.backbone)}


class _Hooks:
    """What differs between running under Ray Train and running in this process."""
    rank = 0
    world = 1
    save_final_checkpoint = True  # under Ray, the reported checkpoints are the run's record
    progress = None  # where rank 0 says how far evaluation got (the driver's display), if anywhere

    def device(self) -> torch.device:
        return torch.device("cpu")

    def wrap(self, model):
        return model

    def checkpoint_dir(self) -> Path | None:
        return None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        pass

    def node_resources(self) -> dict[str, float]:
        return {}

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order."""
        return [value]

    def share_buffers(self, model) -> None:
        """Rank 0's trained buffers (BatchNorm statistics) on every rank, as its checkpoint has them."""


class _RayHooks(_Hooks):
    save_final_checkpoint = False

    def __init__(self, cfg: ExperimentConfig, resume_from: str | None = None):
        import ray.train
        self.cfg, self.resume_from = cfg, resume_from
        self.context = ray.train.get_context()
        self.rank, self.world = self.context.get_world_rank(), self.context.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch
        return ray.train.torch.get_device()

    def wrap(self, model):
        import ray.train.torch
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def checkpoint_dir(self) -> Path | None:
        import ray.train
        checkpoint = ray.train.get_checkpoint()  # the newest Ray recorded, after a worker failure too
        if checkpoint is None and self.resume_from:  # one the driver found in the run's storage
            storage = self.cfg.ray_storage()
            checkpoint = ray.train.Checkpoint(self.resume_from, filesystem=storage.filesystem)
        if checkpoint is None:
            return None
        return Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="resume-")))

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def node_resources(self) -> dict[str, float]:
        import ray
        node = ray.get_runtime_context().get_node_id()
        return next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node), {})

    def share_buffers(self, model) -> None:
        # DDP broadcasts them before each forward: after the last step each rank holds its own batch's.
        if self.world > 1:
            import torch.distributed as dist
            for buffer in trained_buffers(model).values():
                dist.broadcast(buffer, src=0)

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        import torch.distributed as dist
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config`` holds the experiment (as a dict) and where to resume from."""
    # the COCO summaries and other detectors' INFO lines, into the worker's log (the run's log file)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("detectors").setLevel(logging.INFO)
    cfg = ExperimentConfig.model_validate(config["experiment"])
    if cfg.backbone.upstream is not None:
        from orchestrator.pretrain import install_on_this_node
        install_on_this_node(cfg.backbone.upstream, config.get("upstream_checkpoint"))
    hooks = _RayHooks(cfg, config.get("resume_from"))
    hooks.progress = config.get("progress")
    _train(cfg, hooks, config.get("fail_at_step"))


def train_locally(cfg: ExperimentConfig) -> dict:
    """The same loop in this process, no Ray and no tracking: returns the last metrics."""
    from orchestrator.pretrain import resolve_upstream
    resolve_upstream(cfg)
    return _train(cfg, _Hooks())


def loader_workers(cfg: ExperimentConfig, device: torch.device) -> int:
    """Data-loading processes: as the file says, else the worker's CPUs less the one that trains."""
    if cfg.data.loader_workers is not None:
        return cfg.data.loader_workers
    return max(0, int(cfg.scaling.cpus_per_worker) - 1)


@dataclasses.dataclass
class _Run:
    """This worker's training once set up: what the loop and its reporter share."""
    cfg: ExperimentConfig  # with any hyperparameters the batch planner switched on
    device: torch.device
    train_set: Any
    val_set: Any
    detector: torch.nn.Module
    model: torch.nn.Module  # the detector as the loop trains it (wrapped for DDP under Ray)
    identity: dict[str, Any]  # what the checkpoints are made for
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: ProportionalBatchSampler
    batch_sizes: list[int]
    switched_by_rank: list[dict[str, Any]]
    resume_from: Path | None = None
    start: int = 0

    @property
    def per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def total(self) -> int:
        return self.cfg.schedule.iterations or self.cfg.schedule.epochs * self.per_epoch


def _set_up(cfg: ExperimentConfig, hooks: _Hooks) -> _Run:
    """Device, batch sizes, data, model, optimizer and schedule, resumed from a checkpoint where there is one."""
    device = hooks.device() if cfg.device != "cpu" else torch.device("cpu")
    if device.type == "cpu":  # the CPUs this worker reserved, in and out of Ray alike
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    cfg, batch_sizes, switched_by_rank = _batch_sizes(cfg, hooks, device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    task = cfg.task
    train_set, val_set = task.build_datasets(cfg)
    # the classes travel with the checkpoint: predict and serve name them without the dataset
    classes = task.classes(train_set)
    detector = task.prepare(task.build_model(cfg, train_set.num_classes), device, hooks.world).to(device)
    identity = {**run_identity(cfg, detector), "classes": classes}
    model = hooks.wrap(detector)
    # fused: one kernel over all parameters (CPU and CUDA), where the default runs ~10 ops per tensor
    optimizer = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad],
                                  lr=cfg.schedule.lr, weight_decay=cfg.schedule.weight_decay, fused=True)
    sampler = ProportionalBatchSampler(len(train_set), batch_sizes, hooks.rank, seed=cfg.seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, len(sampler)))
    run = _Run(cfg, device, train_set, val_set, detector, model, identity, optimizer, scheduler, sampler,
               batch_sizes, switched_by_rank)
    run.resume_from = hooks.checkpoint_dir()
    if run.resume_from is not None:
        run.start = load_checkpoint(run.resume_from, detector, optimizer, scheduler, identity)
        print(f"[rank {hooks.rank}] resuming from step {run.start}", flush=True)
    return run


def _batch_sizes(cfg: ExperimentConfig, hooks: _Hooks,
                 device: torch.device) -> tuple[ExperimentConfig, list[int], list[dict[str, Any]]]:
    """Every rank's images per step and the hyperparameters the planner switched on for each; ``cfg`` with
    this rank's."""
    # planning (batch_size: auto) profiles models: before the seed is set for this run's own
    batch_size, switched = worker_batch_size(cfg, hooks.rank, device, hooks.node_resources())
    if switched:
        print(f"[rank {hooks.rank}] schedule.batch_size: auto: {cfg.tuning.method} fits no image on this worker as "
              f"written; with {switched}, batch {batch_size}", flush=True)
        cfg = with_hyperparameters(cfg, switched)
    return cfg, hooks.gather(batch_size), hooks.gather(switched)


def _train(cfg: ExperimentConfig, hooks: _Hooks, fail_at_step: int | None = None) -> dict:
    run = _set_up(cfg, hooks)
    cfg, device, task = run.cfg, run.device, run.cfg.task
    loss_weight = rank_loss_weight(run.batch_sizes, hooks.rank)
    use_amp = cfg.schedule.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    reporter = StepReporter(run, hooks)
    step = run.start
    while step < run.total:
        epoch, offset = divmod(step, run.per_epoch)
        run.sampler.set_epoch(epoch)
        batches = run.sampler.batches()[offset:]
        loader = DataLoader(run.train_set, batch_sampler=batches, collate_fn=task.collate,
                            num_workers=loader_workers(cfg, device), pin_memory=device.type == "cuda")
        run.detector.train()
        for batch, (images, targets) in zip(batches, loader):
            images, targets = task.move_batch(images, targets, device)
            losses = training_step(run.model, run.optimizer, images, targets, clip_norm=cfg.schedule.clip_grad_norm,
                                   scaler=scaler, autocast_device="cuda" if use_amp else None,
                                   loss_scale=loss_weight)
            run.scheduler.step()
            step += 1
            if fail_at_step is not None and step == fail_at_step and run.resume_from is None:
                raise RuntimeError(f"injected failure at step {step}")
            reporter.after_step(step, epoch, batch, losses)
            if step >= run.total:
                break
    reporter.after_train(step)
    return reporter.metrics


__all__ = ["build_datasets", "build_model", "lr_factor", "worker_batch_size", "with_hyperparameters", "config_identity",
           "run_identity", "train_loop_per_worker", "train_locally", "loader_workers",
           # the report cadence lives beside the reports; it stays importable from here
           "MAX_STEPS_PER_REPORT", "POLL_INTERVAL_VARIABLE", "steps_per_report"]
