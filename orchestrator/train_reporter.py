"""After each step of the training loop: its figures, evaluation and the run's summary where due, and
the reports to Ray Train, bundled to its poll interval, with checkpoints that carry the reports since the
previous one (``StepReporter``, in the manner of detectron2's hooks)."""
from __future__ import annotations

import collections
import math
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from detectors.training import evaluation_shard
from orchestrator.checkpointing import save_checkpoint
from orchestrator.config import ExperimentConfig

if TYPE_CHECKING:
    from orchestrator.train_loop import _Hooks, _Run

# Ray Train (2.x) takes one report per worker each time its controller polls (every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s unless set): a worker reporting more often waits in
# ``ray.train.report``, so faster steps would each take that long. They are therefore reported in
# bundles of a little more than one poll interval (every step's figures still reach MLflow).
POLL_INTERVAL_VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
MAX_STEPS_PER_REPORT = 100


def report_seconds() -> float:
    return 1.25 * float(os.environ.get(POLL_INTERVAL_VARIABLE, 2.0))


def steps_per_report(step_seconds: float) -> int:
    """How many steps of this duration one report may cover (at least one)."""
    return max(1, min(MAX_STEPS_PER_REPORT, math.ceil(report_seconds() / max(step_seconds, 1e-3))))


class StepReporter:
    """The training loop's hook: ``after_step`` once a step, ``after_train`` once at the end."""

    def __init__(self, run: _Run, hooks: _Hooks):
        self.run, self.hooks = run, hooks
        self.metrics: dict[str, float] = {}
        self.seen: dict[int, set[int]] = {}  # epoch -> images this rank trained on
        self.step_seconds: list[float] = []
        # the reports since the last checkpoint, which carries them (the last thousand: the driver lags by a few)
        self.unsaved: collections.deque[dict] = collections.deque(maxlen=1000)
        self.unreported: list[dict] = []  # steps' figures that travel with the next report
        self.report_every = 1  # steps per report: set from the second step's time, the same on every rank
        self.tick = time.perf_counter()

    def after_step(self, step: int, epoch: int, batch: list[int], losses: dict[str, float]) -> None:
        run, cfg, hooks = self.run, self.run.cfg, self.hooks
        self.seen.setdefault(epoch, set()).update(batch)
        # wall time since the previous step ended: data loading, reporting and all
        seconds, self.tick = time.perf_counter() - self.tick, time.perf_counter()
        self.step_seconds.append(seconds)
        self.metrics = self._step_metrics(step, epoch, losses, seconds)
        last = step == run.total
        evaluate_now = last or (cfg.evaluation.period and step % cfg.evaluation.period == 0)
        checkpoint_now = last or (cfg.checkpoint.period and step % cfg.checkpoint.period == 0)
        if last:
            self.metrics.update(_run_summary(self.step_seconds, hooks.gather(self.seen),
                                             hooks.gather(peak_memory_mb(run.device))))
        if evaluate_now:
            self.metrics.update(_evaluate(cfg, run.detector, run.val_set, run.device, hooks))
        report = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float, list))}
        scalars = {k: v for k, v in report.items() if isinstance(v, (int, float))}
        self.unsaved.append(scalars)
        if step == run.start + 2:  # the first step's time is warm-up; every rank must agree on the cadence
            self.report_every = max(hooks.gather(steps_per_report(seconds)))
        if not (last or evaluate_now or checkpoint_now or step <= run.start + 2
                or (step - run.start) % self.report_every == 0):
            self.unreported.append(scalars)
            return
        if self.unreported:
            report["steps"], self.unreported = self.unreported, []
        self._report(step, report, checkpoint_now)
        if evaluate_now or checkpoint_now:  # they are not iteration time; a step's own report is
            self.tick = time.perf_counter()

    def after_train(self, step: int) -> None:
        """Outside Ray the run's last state is a checkpoint in its directory; under Ray the last report has it."""
        run = self.run
        if self.hooks.rank == 0 and self.hooks.save_final_checkpoint:
            save_checkpoint(run.cfg.run_dir / "checkpoint", run.detector, run.optimizer, run.scheduler, step,
                            run.identity)

    def _step_metrics(self, step: int, epoch: int, losses: dict[str, float], seconds: float) -> dict[str, Any]:
        run = self.run
        metrics = {**{f"train/{k}": v for k, v in losses.items()}, "lr": run.scheduler.get_last_lr()[0],
                   "seconds_per_iteration": seconds, "epoch": epoch, "step": step, "iterations": run.total,
                   "world_size": self.hooks.world, "images_per_step": sum(run.batch_sizes)}
        metrics["peak_memory_mb"] = peak_memory_mb(run.device)
        if step == run.start + 1:  # per-kind sizes are known only now; the driver logs them once
            metrics["batch_sizes"] = run.batch_sizes
            if any(run.switched_by_rank):
                metrics["switched_hyperparameters"] = run.switched_by_rank
        return metrics

    def _report(self, step: int, report: dict[str, Any], checkpoint_now: bool) -> None:
        run = self.run
        with tempfile.TemporaryDirectory() as tmp:
            directory = None
            if checkpoint_now and self.hooks.rank == 0:
                directory = save_checkpoint(Path(tmp) / "checkpoint", run.detector, run.optimizer, run.scheduler,
                                            step, run.identity, history=list(self.unsaved))
            self.hooks.report(report, directory)
        if checkpoint_now:
            self.unsaved.clear()


def _evaluate(cfg: ExperimentConfig, model, val_set, device: torch.device, hooks: _Hooks) -> dict[str, float]:
    """Every rank predicts its shard; rank 0 merges their states and scores the split once (COCO AP,
    or the confusion matrix's mIoU)."""
    hooks.share_buffers(model)
    shard = evaluation_shard(len(val_set), hooks.rank, hooks.world)
    started = time.perf_counter()
    shown = None
    if hooks.rank == 0 and hooks.progress is not None:
        from orchestrator.console import evaluation_progress
        shown = evaluation_progress(hooks.progress, len(shard))
    states = hooks.gather((len(shard), cfg.task.predict_shard(cfg, model, val_set, device, shard, on_batch=shown)))
    metrics = {f"eval_images_rank{rank}": count for rank, (count, _) in enumerate(states)}
    if hooks.rank == 0:
        metrics.update({f"val/{k}": v for k, v in cfg.task.score(val_set, [state for _, state in states]).items()})
        metrics["eval_seconds"] = time.perf_counter() - started
    return metrics


def peak_memory_mb(device: torch.device) -> float:
    """This worker's peak: CUDA memory allocated on a GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def _run_summary(step_seconds: list[float], seen_by_rank: list[dict[int, set[int]]],
                 peak_mb_by_rank: list[float]) -> dict[str, float]:
    """Steady-state speed (the median skips warm-up), each worker's peak memory, how the ranks shared the data."""
    summary = {"run/median_seconds_per_iteration": statistics.median(step_seconds[1:] or step_seconds),
               **{f"run/peak_memory_mb_rank{rank}": mb for rank, mb in enumerate(peak_mb_by_rank)}}
    shared = 0
    for epoch in set().union(*seen_by_rank):
        per_rank = [seen.get(epoch, set()) for seen in seen_by_rank]
        shared += sum(len(a & b) for i, a in enumerate(per_rank) for b in per_rank[i + 1:])
    for rank, seen in enumerate(seen_by_rank):
        summary[f"run/images_rank{rank}"] = sum(len(images) for images in seen.values())
    summary["run/images_seen_by_two_ranks"] = shared
    return summary
