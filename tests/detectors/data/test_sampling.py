"""Each step's images split across ranks in proportion to their batch sizes."""
import pytest

from detectors.data.sampling import ProportionalBatchSampler, rank_loss_weight
from detectors.errors import UserInputError


@pytest.mark.parametrize("batch_sizes", [[2, 2], [1, 3], [4, 1, 2]])
def test_ranks_take_disjoint_shares_of_every_step_and_do_the_same_number_of_steps(batch_sizes):
    samplers = [ProportionalBatchSampler(30, batch_sizes, rank, seed=5) for rank in range(len(batch_sizes))]
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        per_rank = [sampler.batches() for sampler in samplers]
        assert {len(batches) for batches in per_rank} == {30 // sum(batch_sizes)}
        for rank, batches in enumerate(per_rank):
            assert all(len(batch) == batch_sizes[rank] for batch in batches)
        everything = [i for batches in per_rank for batch in batches for i in batch]
        assert len(everything) == len(set(everything)) == (30 // sum(batch_sizes)) * sum(batch_sizes)
    assert samplers[0].batches() != ProportionalBatchSampler(30, batch_sizes, 0, seed=5).batches()  # reshuffled


def test_loss_weights_turn_the_mean_over_ranks_into_the_mean_over_samples():
    sizes = [1, 3]
    weights = [rank_loss_weight(sizes, rank) for rank in range(2)]
    assert weights == [0.5, 1.5]
    per_sample = [[2.0], [4.0, 6.0, 8.0]]
    rank_means = [sum(s) / len(s) for s in per_sample]
    assert sum(w * m for w, m in zip(weights, rank_means)) / 2 == pytest.approx(20 / 4)
    assert rank_loss_weight([2, 2], 1) == 1.0


def test_a_step_larger_than_the_dataset_is_refused():
    with pytest.raises(UserInputError, match="8 training images, fewer than one step's 9"):
        ProportionalBatchSampler(8, [4, 5], 0)
