"""Batch samplers: one bucket per batch, every record once per epoch across ranks, determinism, resume."""
import pytest

from diffusion.data.datasets import AspectRatioBatchSampler, DistributedBatchSampler
from diffusion.data.datasets.batch_sampler import global_batch_count

KEYS = ['1.0'] * 23 + ['0.5'] * 11 + ['2.0'] * 6  # 40 records in three buckets


def sampler(rank=0, world=1, **kwargs):
    return AspectRatioBatchSampler(KEYS, batch_size=kwargs.pop('batch_size', 4), num_replicas=world, rank=rank,
                                   seed=kwargs.pop('seed', 3), **kwargs)


def test_every_batch_holds_one_bucket():
    for batch in sampler():
        assert len(batch) == 4 and len({KEYS[i] for i in batch}) == 1


def test_ranks_share_an_epoch_without_overlap_and_take_equal_steps():
    world = 3
    per_rank = [list(sampler(rank, world)) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen))  # no record twice in an epoch
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)


def test_without_drop_last_every_record_is_seen():
    seen = {i for rank in range(2) for batch in sampler(rank, 2, drop_last=False) for i in batch}
    assert seen == set(range(len(KEYS)))


def test_epochs_are_deterministic_from_seed_and_epoch():
    a, b = sampler(), sampler()
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    assert list(sampler(seed=3)) != list(sampler(seed=4))


def test_resume_mid_epoch_matches_uninterrupted_run():
    full = sampler(1, 2)
    full.set_epoch(2)
    uninterrupted = list(full)
    resumed = sampler(1, 2)
    resumed.set_epoch(2, start_batch=1)
    assert len(resumed) == len(uninterrupted) - 1
    assert list(resumed) == uninterrupted[1:]


def test_start_batch_beyond_the_epoch_is_rejected():
    s = sampler()
    with pytest.raises(ValueError, match='start_batch'):
        s.set_epoch(0, start_batch=len(s) + 1)


def test_single_resolution_sampler_covers_the_dataset():
    batches = list(DistributedBatchSampler(10, batch_size=5, num_replicas=1, rank=0, seed=0))
    assert sorted(i for batch in batches for i in batch) == list(range(10))


def test_too_few_records_for_one_batch_is_an_error():
    with pytest.raises(ValueError, match='no global batch'):
        DistributedBatchSampler(3, batch_size=4, num_replicas=1, rank=0)


@pytest.mark.parametrize('world, accumulation', [(2, 1), (1, 2), (2, 2)])
def test_the_effective_batch_not_its_split_defines_each_steps_records(world, accumulation):
    """N ranks x batch b x A accumulation steps see, step for step, what one process with batch N*A*b sees."""
    whole = list(sampler(batch_size=8, seed=5))
    split = [AspectRatioBatchSampler(KEYS, batch_size=8 // (world * accumulation), num_replicas=world, rank=r,
                                     seed=5, accumulation=accumulation) for r in range(world)]
    per_rank = [list(s) for s in split]
    assert all(len(batches) == len(whole) * accumulation for batches in per_rank)
    for step, batch in enumerate(whole):
        micro = [b for batches in per_rank for b in batches[step * accumulation:(step + 1) * accumulation]]
        assert sorted(i for b in micro for i in b) == sorted(batch)


@pytest.mark.parametrize('drop_last', [True, False])
def test_global_batch_count_is_the_samplers_steps_per_epoch(drop_last):
    """The start-up check that a dataset fills a step counts with the sampler's own rule."""
    s = sampler(world=2, batch_size=3, accumulation=2, drop_last=drop_last)
    assert global_batch_count([23, 11, 6], 3 * 2 * 2, drop_last) * 2 == len(s)
    assert global_batch_count([23, 11, 6], 24) == 0  # no bucket holds 24 records
