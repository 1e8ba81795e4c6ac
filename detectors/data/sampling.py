"""Splitting each training step's images across ranks whose batch sizes differ.

Every step draws one global batch of ``sum(batch_sizes)`` images from a shuffled epoch; rank r
takes the ``batch_sizes[r]`` images after those of the ranks before it. All ranks therefore do
the same number of steps per epoch, however unequal their GPUs, and together see each image at
most once per epoch. With gradients averaged over ranks (DDP), weighting rank r's loss by
``rank_loss_weight`` makes one step the step of a single process on the union of the batches.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from detectors.errors import UserInputError


class ProportionalBatchSampler(Sampler[list[int]]):
    """This rank's batches of one epoch; ``set_epoch`` reshuffles identically on every rank."""

    def __init__(self, num_samples: int, batch_sizes: Sequence[int], rank: int, seed: int = 0, shuffle: bool = True):
        if not batch_sizes or min(batch_sizes) < 1:
            raise UserInputError(f"batch sizes must be positive, got {list(batch_sizes)}")
        if sum(batch_sizes) > num_samples:
            raise UserInputError(f"the dataset has {num_samples} training images, fewer than one step's "
                                 f"{sum(batch_sizes)} (batch sizes {list(batch_sizes)})")
        self.num_samples = num_samples
        self.batch_sizes = list(batch_sizes)
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // sum(self.batch_sizes)

    def batches(self) -> list[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = sum(self.batch_sizes)
        start = sum(self.batch_sizes[:self.rank])
        size = self.batch_sizes[self.rank]
        return [order[step * total + start:step * total + start + size] for step in range(len(self))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())


def rank_loss_weight(batch_sizes: Sequence[int], rank: int) -> float:
    """The factor on rank ``rank``'s per-sample-mean loss that turns DDP's mean over ranks into
    the mean over all samples: ``world * b_r / sum(b)`` (1 when the batches are equal)."""
    return len(batch_sizes) * batch_sizes[rank] / sum(batch_sizes)
