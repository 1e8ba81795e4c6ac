"""The per-worker training loop: data, model, DDP, AdamW schedule, evaluation, checkpoints.

``train_loop_per_worker`` runs inside every Ray Train worker; ``train_locally`` runs the same loop
in this process without Ray (for the overhead comparison and for debugging). It is the only place
that calls ``ray.train.report``; MLflow is written from world rank 0 only.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler

from detectors.data import CocoDetection, build_transforms, collate_fn, make_synthetic_coco
from detectors.engines import build_detector
from detectors.training import check_num_classes, evaluate, move_batch, training_step
from detectors.tuning import resolve_method
from orchestrator.checkpointing import backbone_fingerprint, load_checkpoint, save_checkpoint
from orchestrator.config import ExperimentConfig
from orchestrator.tracking import Tracker


def dataset_paths(cfg: ExperimentConfig) -> dict[str, Any]:
    """Where the data is; the synthetic dataset is written (once, atomically) on first use."""
    if cfg.data.synthetic is not None:
        s = cfg.data.synthetic
        return make_synthetic_coco(s.root, num_train=s.num_train, num_val=s.num_val, image_size=tuple(s.image_size),
                                   num_classes=s.num_classes, seed=s.seed)
    return {"train_images": cfg.data.train_images, "train_json": cfg.data.train_json,
            "val_images": cfg.data.val_images, "val_json": cfg.data.val_json}


def build_datasets(cfg: ExperimentConfig) -> tuple[CocoDetection, CocoDetection]:
    paths = dataset_paths(cfg)
    d = cfg.data
    train = CocoDetection(paths["train_images"], paths["train_json"],
                          build_transforms(True, d.train_short_edges, d.max_size, flip_prob=d.flip))
    val = CocoDetection(paths["val_images"], paths["val_json"],
                        build_transforms(False, test_short_edge=d.test_short_edge, max_size=d.max_size))
    return train, val


def build_model(cfg: ExperimentConfig, num_classes: int):
    return build_detector(cfg.model.engine, cfg.model.detector, num_classes, backbone=cfg.backbone.name,
                          tuning=cfg.tuning.method, weights=cfg.backbone.weights,
                          hyperparameters=cfg.tuning.hyperparameters, detector_options=cfg.model.options,
                          drop_path_rate=cfg.backbone.drop_path_rate, **cfg.backbone.overrides)


def lr_factor(cfg: ExperimentConfig, iterations_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up, then a factor ``gamma`` at every decay point (iterations, or epochs)."""
    s = cfg.schedule
    scale = iterations_per_epoch if s.epochs else 1
    decays = sorted(int(point * scale) for point in s.decay_at)

    def factor(iteration: int) -> float:
        warm = 1.0
        if iteration < s.warmup_iterations:
            alpha = iteration / s.warmup_iterations
            warm = s.warmup_factor * (1 - alpha) + alpha
        return warm * s.gamma ** sum(iteration >= d for d in decays)
    return factor


def run_identity(cfg: ExperimentConfig, detector) -> dict[str, Any]:
    method, hparams = resolve_method(cfg.tuning.method, cfg.tuning.hyperparameters)
    return {"backbone": cfg.backbone.name, "method": method, "hyperparameters": dataclasses.asdict(hparams),
            "detector": f"{cfg.model.engine}/{cfg.model.detector}", "fingerprint": backbone_fingerprint(detector.backbone)}


class _Hooks:
    """What differs between running under Ray Train and running in this process."""
    rank = 0
    world = 1
    save_final_checkpoint = True  # under Ray, the reported checkpoints are the run's record

    def device(self) -> torch.device:
        return torch.device("cpu")

    def wrap(self, model):
        return model

    def checkpoint_dir(self) -> Path | None:
        return None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        pass


class _RayHooks(_Hooks):
    save_final_checkpoint = False

    def __init__(self):
        import ray.train
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
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._resume = tempfile.mkdtemp(prefix="resume-")
        return Path(checkpoint.to_directory(self._resume))

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config`` holds the experiment (as a dict) and the MLflow run."""
    _train(ExperimentConfig.model_validate(config["experiment"]), _RayHooks(), config.get("tracking_uri"),
           config.get("mlflow_run_id"), config.get("fail_at_step"))


def train_locally(cfg: ExperimentConfig, tracking_uri: str | None = None, run_id: str | None = None) -> dict:
    """The same loop in this process, no Ray: returns the last metrics."""
    return _train(cfg, _Hooks(), tracking_uri, run_id)


def _train(cfg: ExperimentConfig, hooks: _Hooks, tracking_uri: str | None, run_id: str | None,
           fail_at_step: int | None = None) -> dict:
    rank, world = hooks.rank, hooks.world
    device = hooks.device() if cfg.device != "cpu" else torch.device("cpu")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    train_set, val_set = build_datasets(cfg)
    detector = build_model(cfg, train_set.num_classes).to(device)
    check_num_classes(train_set, train_set.num_classes)
    identity = run_identity(cfg, detector)
    model = hooks.wrap(detector)
    optimizer = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad],
                                  lr=cfg.schedule.lr, weight_decay=cfg.schedule.weight_decay)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_epoch = max(len(sampler) // cfg.schedule.batch_size, 1)
    total = cfg.schedule.iterations or cfg.schedule.epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, per_epoch))
    start = 0
    resume_from = hooks.checkpoint_dir()
    if resume_from is not None:
        start = load_checkpoint(resume_from, detector, optimizer, scheduler, identity)
        print(f"[rank {rank}] resuming from step {start}", flush=True)

    tracker = Tracker(tracking_uri, run_id) if rank == 0 and tracking_uri else None
    use_amp = cfg.schedule.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    metrics: dict[str, float] = {}
    step = start
    started = time.perf_counter()
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        indices = list(sampler)[offset * cfg.schedule.batch_size:per_epoch * cfg.schedule.batch_size]
        batches = [indices[i:i + cfg.schedule.batch_size] for i in range(0, len(indices), cfg.schedule.batch_size)]
        loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate_fn,
                            num_workers=cfg.data.loader_workers)
        detector.train()
        for images, targets in loader:
            tick = time.perf_counter()
            images, targets = move_batch(images, targets, device)
            losses = training_step(model, optimizer, images, targets, clip_norm=cfg.schedule.clip_grad_norm,
                                   scaler=scaler, autocast_device="cuda" if use_amp else None)
            scheduler.step()
            step += 1
            if fail_at_step is not None and step == fail_at_step and resume_from is None:
                raise RuntimeError(f"injected failure at step {step}")
            seconds = time.perf_counter() - tick
            metrics = {**{f"train/{k}": v for k, v in losses.items()}, "lr": scheduler.get_last_lr()[0],
                       "seconds_per_iteration": seconds, "epoch": epoch, "step": step, "world_size": world}
            if device.type == "cuda":
                metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if tracker:
                tracker.log_metrics(metrics, step)
            if rank == 0:
                eta = (time.perf_counter() - started) / (step - start) * (total - step)
                print(f"iter {step}/{total}  loss {losses['loss']:.4f}  {seconds:.2f} s/iter  eta {eta:.0f} s", flush=True)
            last = step == total
            evaluate_now = last or (cfg.evaluation.period and step % cfg.evaluation.period == 0)
            checkpoint_now = last or (cfg.checkpoint.period and step % cfg.checkpoint.period == 0)
            if evaluate_now and rank == 0:
                results = evaluate(detector, val_set, device)
                metrics.update({f"val/{k}": v for k, v in results.items()})
                if tracker:
                    tracker.log_metrics({f"val/{k}": v for k, v in results.items()}, step)
            if checkpoint_now or evaluate_now:
                with tempfile.TemporaryDirectory() as tmp:
                    directory = None
                    if checkpoint_now and rank == 0:
                        directory = save_checkpoint(Path(tmp) / "checkpoint", detector, optimizer, scheduler, step,
                                                    identity)
                    hooks.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))
                                  and math.isfinite(v)}, directory)
            if step >= total:
                break
    if rank == 0 and hooks.save_final_checkpoint:
        save_checkpoint(cfg.run_dir / "checkpoint", detector, optimizer, scheduler, step, identity)
    return metrics
