"""Distributed, resumable batch samplers. Every batch holds records of one bucket (one aspect ratio).

An epoch is a pure function of (seed, epoch): the record order is shuffled, each bucket's records are cut in
that order into global batches of `batch_size * world_size * accumulation` records (one optimizer step), the
global batches are shuffled together, and each rank takes its `accumulation` micro-batches of `batch_size`
records from each. So N processes with batch b and A accumulation steps see, step for step, exactly the
records one process with batch N*A*b sees (the effective batch, not how it is split, defines the data
order), and every rank takes the same number of steps. `set_epoch(epoch,
start_batch=k)` skips this rank's first k batches: a run resumed at step k of an epoch sees exactly the
batches it would have seen. Each rank's epoch is a whole number of optimizer steps (`accumulation`
micro-batches each). Use as `DataLoader(dataset, batch_sampler=sampler)`.
"""
import math

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


def _distributed_defaults(num_replicas, rank):
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f'need num_replicas >= 1 and 0 <= rank < num_replicas, got rank {rank} of {num_replicas}')
    return num_replicas, rank


class AspectRatioBatchSampler(Sampler):
    """Batches of `batch_size` indices that share a bucket key (`bucket_keys[i]` is record i's key, e.g.
    `InternalDataMS.bucket_keys`), for rank `rank` of `num_replicas` (default: from torch.distributed, else
    one process). `drop_last` drops each bucket's incomplete last global batch; without it that batch is
    completed by repeating the bucket's first records of the epoch."""

    def __init__(self, bucket_keys, batch_size, num_replicas=None, rank=None, shuffle=True, seed=0,
                 drop_last=True, start_batch=0, accumulation=1):
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        if accumulation < 1:
            raise ValueError(f'accumulation must be >= 1, got {accumulation}')
        if seed < 0:
            raise ValueError(f'seed must be >= 0, got {seed}')
        self.num_replicas, self.rank = _distributed_defaults(num_replicas, rank)
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.global_batch_size = batch_size * self.num_replicas * accumulation
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        keys = np.asarray(list(bucket_keys))
        if keys.size == 0:
            raise ValueError('cannot sample batches from an empty dataset')
        self.bucket_names, self.bucket_codes = np.unique(keys, return_inverse=True)
        counts = np.bincount(self.bucket_codes, minlength=len(self.bucket_names))
        # this rank's micro-batches
        self.batches_per_epoch = global_batch_count(counts, self.global_batch_size, drop_last) * accumulation
        if self.batches_per_epoch == 0:
            raise ValueError(f'{keys.size} records in buckets of sizes {sorted(counts.tolist(), reverse=True)[:10]} '
                             f'give no global batch of {batch_size} x {self.num_replicas} rank(s) x '
                             f'{accumulation} accumulation step(s); lower the batch size or pass drop_last=False')
        self.epoch = 0
        self.start_batch = 0
        self.set_epoch(0, start_batch)

    def set_epoch(self, epoch, start_batch=0):
        """Sample epoch `epoch`, starting at this rank's batch `start_batch` (0 = the whole epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f'start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}')
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batches(self, epoch):
        """The global batches of `epoch` (lists of `batch_size * num_replicas * accumulation` record indices,
        one optimizer step each), in order."""
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(len(self.bucket_codes)) if self.shuffle else np.arange(len(self.bucket_codes))
        # a stable sort by bucket keeps the shuffled order inside each bucket
        by_bucket = order[np.argsort(self.bucket_codes[order], kind='stable')]
        bounds = np.cumsum(np.bincount(self.bucket_codes, minlength=len(self.bucket_names)))[:-1]
        size = self.global_batch_size
        batches = []
        for members in np.split(by_bucket, bounds):
            for start in range(0, len(members), size):
                batch = members[start:start + size].tolist()
                if len(batch) < size:
                    if self.drop_last:
                        continue
                    batch = (batch + members.tolist() * math.ceil(size / len(members)))[:size]
                batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def rank_batches(self, epoch):
        """This rank's micro-batches of `epoch`, all of them: its `accumulation` slices of every global batch
        (micro-batch m of rank r is slice m * num_replicas + r)."""
        b, world = self.batch_size, self.num_replicas
        return [batch[(m * world + self.rank) * b:(m * world + self.rank + 1) * b]
                for batch in self.global_batches(epoch) for m in range(self.accumulation)]

    def __iter__(self):
        yield from self.rank_batches(self.epoch)[self.start_batch:]

    def __len__(self):
        return self.batches_per_epoch - self.start_batch


class DistributedBatchSampler(AspectRatioBatchSampler):
    """The same sampler for a single-resolution dataset of `num_samples` records: one bucket."""

    def __init__(self, num_samples, batch_size, **kwargs):
        super().__init__(np.zeros(num_samples, dtype=np.int64), batch_size, **kwargs)


def bucket_sizes(dataset):
    """The number of records in each bucket of `dataset` (one bucket unless it has `bucket_keys`), largest first."""
    keys = getattr(dataset, 'bucket_keys', None)
    if keys is None:
        return [len(dataset)] if len(dataset) else []
    _, counts = np.unique(np.asarray(list(keys)), return_counts=True)
    return sorted(counts.tolist(), reverse=True)


def global_batch_count(bucket_sizes, global_batch_size, drop_last=True):
    """Global batches (optimizer steps) in an epoch of buckets of these sizes: `drop_last` drops each bucket's
    incomplete last batch, otherwise it is completed."""
    counts = np.asarray(bucket_sizes, dtype=np.int64)
    per_bucket = counts // global_batch_size if drop_last else -(-counts // global_batch_size)
    return int(per_bucket.sum())


def build_batch_sampler(dataset, batch_size, **kwargs):
    """The batch sampler for `dataset`: bucketed by `dataset.bucket_keys` where it has them (InternalDataMS),
    else one bucket. `kwargs` as AspectRatioBatchSampler's."""
    keys = getattr(dataset, 'bucket_keys', None)
    if keys is None:
        return DistributedBatchSampler(len(dataset), batch_size, **kwargs)
    return AspectRatioBatchSampler(keys, batch_size, **kwargs)
