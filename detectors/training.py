"""The plain PyTorch pieces of training and evaluating a detector, with no Ray and no MLflow.

The orchestrator's per-worker loop calls these inside Ray Train; tests and the Ray-overhead
benchmark call them directly in one process.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from detectors.data.coco import CocoDetection, collate_fn
from detectors.errors import UserInputError
from detectors.evaluation import CocoEvaluator


def move_batch(images: Sequence[torch.Tensor], targets: Sequence[dict], device: torch.device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def check_num_classes(dataset: CocoDetection, num_classes: int) -> None:
    """A dataset whose categories do not fit the detector's head is a user error, caught up front."""
    if dataset.num_classes > num_classes:
        raise UserInputError(f"{dataset.ann_file} has {dataset.num_classes} categories but the detector has "
                             f"num_classes={num_classes}: category id {dataset.cat_ids[num_classes]} is out of range")


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Sequence[torch.Tensor] | torch.Tensor,
                  targets: Sequence[dict] | torch.Tensor, clip_norm: float | None = None,
                  scaler: torch.amp.GradScaler | None = None, autocast_device: str | None = None,
                  loss_scale: float = 1.0) -> dict[str, float]:
    """Forward, backward, (clip), step. Returns the losses as floats, and their sum as ``loss``.

    ``loss_scale`` multiplies the loss before backward (used to weight ranks by their batch size
    under gradient averaging); the reported losses are unscaled.
    """
    with torch.autocast(autocast_device or "cpu", enabled=autocast_device is not None):
        # detectors take lists of images and targets; segmentation models batched tensors
        losses = model(*(x if torch.is_tensor(x) else list(x) for x in (images, targets)))
    total = sum(losses.values())
    if not torch.isfinite(total):
        raise FloatingPointError(f"loss is {total.item()}: {({k: v.item() for k, v in losses.items()})}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total * loss_scale).backward()
        scaler.unscale_(optimizer)
    else:
        (total * loss_scale).backward()
    if clip_norm:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return {"loss": total.item(), **{k: v.item() for k, v in losses.items()}}


@torch.no_grad()
def predict_for_eval(detector, images: Sequence[torch.Tensor], targets: Sequence[dict]) -> list[dict]:
    """Predictions in the original image frame, keyed by image id, ready for ``CocoEvaluator``."""
    sizes = [tuple(int(v) for v in target["orig_size"]) for target in targets]
    predictions = detector.predict(list(images), output_sizes=sizes)
    return [{**{k: v.cpu() for k, v in pred.items()}, "image_id": int(target["image_id"])}
            for target, pred in zip(targets, predictions)]


def evaluation_shard(num_images: int, rank: int, world: int) -> range:
    """The validation images rank ``rank`` of ``world`` predicts: every ``world``-th one, so the shards
    are disjoint, cover the split and differ by at most one image."""
    return range(rank, num_images, world)


def predict_dataset(detector, dataset: CocoDetection, device: torch.device | str = "cpu", batch_size: int = 2,
                    indices: Iterable[int] | None = None,
                    on_batch: Callable[[int], None] | None = None) -> CocoEvaluator:
    """An evaluator holding ``detector``'s predictions on ``dataset`` (or the ``indices`` of it);
    ``on_batch(images done)`` after each batch, for a progress display."""
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate_fn)
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    done = 0
    for images, targets in loader:
        images = [image.to(device) for image in images]
        evaluator.update(predict_for_eval(detector, images, targets))
        done += len(images)
        if on_batch is not None:
            on_batch(done)
    return evaluator


def evaluate(detector, dataset: CocoDetection, device: torch.device | str = "cpu", batch_size: int = 2,
             indices: Iterable[int] | None = None) -> dict[str, float]:
    """COCO box (and mask) AP of ``detector`` on ``dataset`` (or the ``indices`` of it)."""
    return predict_dataset(detector, dataset, device, batch_size, indices).evaluate()


def evaluate_shards(dataset: CocoDetection, states: Sequence[dict]) -> dict[str, float]:
    """COCO AP over the predictions of every shard (``CocoEvaluator.get_state()`` of each rank), once.

    The shards must cover the split: COCO scores only the images it was given predictions for, so a
    lost shard would silently score a smaller split.
    """
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    for state in states:
        evaluator.merge_state(state)
    missing = set(dataset.ids) - evaluator.image_ids
    if missing:
        raise ValueError(f"images {sorted(missing)[:5]} of {len(dataset.ids)} were predicted by no shard; "
                         f"the shards must cover the split")
    return evaluator.evaluate()
