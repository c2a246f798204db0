"""Offline feature extraction: T5 caption features (.npz) and VAE posterior features (.npy) of a dataset,
written where `diffusion.data.paths` says the datasets read them.

- Resumable: a record whose feature file exists is skipped (writes are atomic, so an existing file is
  complete; `verify_existing=True` also opens it and redoes it if it is damaged).
- Shardable: `shard_indices(n, start, end, rank, world_size)` splits records between processes or machines,
  each record in exactly one shard.
- Multi-scale: with a bucket table each image is resized to cover its closest bucket and center-cropped, so
  aspect ratios are never distorted (SPEC section 9 point 6), and batches hold one bucket size each.
- A record that fails (corrupt image, missing caption, ...) is reported, not fatal: the summary lists it.
"""
import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from diffusion.data import paths
from diffusion.data.aspect_ratios import closest_bucket
from diffusion.data.errors import DataError, DataFileError
from diffusion.utils.fileio import atomic_write_text
from diffusion.data.feature_io import (
    load_caption_feature,
    load_image,
    load_vae_feature,
    save_caption_feature,
    save_vae_feature,
)
from diffusion.data.latents import posterior_feature
from diffusion.data.transforms import get_transform
from diffusion.model.builder import VAE_DOWNSAMPLE


def target_size(height, width, image_size, bucket_table=None):
    """The (h, w) an image of height x width is cropped to: image_size square, or its closest bucket."""
    if bucket_table is None:
        return image_size, image_size
    return closest_bucket(height, width, bucket_table)[1]


def shard_indices(num_records, start=0, end=None, rank=0, world_size=1):
    """Record indices of shard `rank` of `world_size` within [start, end): every world_size-th record."""
    end = num_records if end is None else end
    if not 0 <= start <= end <= num_records:
        raise ValueError(f'need 0 <= start <= end <= {num_records} records, got start={start}, end={end}')
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f'need world_size >= 1 and 0 <= rank < world_size, got rank {rank} of {world_size}')
    return list(range(start + rank, end, world_size))


@dataclass
class FeatureCounts:
    written: int = 0
    skipped: int = 0  # already there
    failed: int = 0


@dataclass
class ExtractionSummary:
    """What a run did, per feature kind ('t5', 'vae'), and the failed records."""
    counts: dict = field(default_factory=lambda: {'t5': FeatureCounts(), 'vae': FeatureCounts()})
    failures: list = field(default_factory=list)  # dicts: index, source, image, feature, error
    failures_file: str = None

    def fail(self, kind, index, record, error):
        self.counts[kind].failed += 1
        self.failures.append({'index': index, 'source': record.source, 'image': record.path, 'feature': kind,
                              'error': str(error)})

    def text(self):
        lines = [f'{kind}: {c.written} written, {c.skipped} already present, {c.failed} failed'
                 for kind, c in self.counts.items() if c.written or c.skipped or c.failed]
        if self.failures:
            lines.append(f'{len(self.failures)} failure(s) listed in {self.failures_file}')
        return '\n'.join(lines or ['nothing to do'])


class FeatureExtractor:
    """Writes the feature files of `records` (from `diffusion.data.records`) of the dataset folder `dataset`.

    `text_encoder`: a callable list[str] -> (features (B, L, C), mask (B, L)), e.g. a T5Embedder, or None to
    skip T5 features; `prompt_of(record)` gives a record's caption (default `record.prompt`; SAM reads
    caption files). `vae`: a diffusers AutoencoderKL, or None to skip VAE features. `image_size`: the
    resolution; with `bucket_table` (a table of `diffusion.data.aspect_ratios`) features go to the buckets.
    """

    def __init__(self, dataset, records, text_encoder=None, vae=None, image_size=256, bucket_table=None,
                 max_length=None, caption_channels=None, transform='default_train', batch_size=32, num_workers=0,
                 feature_dtype=np.float32, verify_existing=False, prompt_of=None, progress=True):
        if image_size % VAE_DOWNSAMPLE:
            raise ValueError(f'image_size {image_size} is not divisible by {VAE_DOWNSAMPLE}')
        self.dataset = dataset
        self.records = records
        self.text_encoder = text_encoder
        self.vae = vae
        self.image_size = image_size
        self.bucket_table = bucket_table
        self.max_length = max_length
        self.caption_channels = caption_channels
        self.transform = get_transform(transform)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.feature_dtype = feature_dtype
        self.verify_existing = verify_existing
        self.prompt_of = prompt_of or (lambda record: record.prompt)
        self.progress = progress

    # ------------------------------------------------------------ paths and checks
    def caption_path(self, record):
        return paths.caption_feature_path(self.dataset, record.path)

    def vae_path(self, record):
        return paths.vae_feature_path(self.dataset, record.path, self.image_size,
                                      multi_scale=self.bucket_table is not None)

    def _done(self, path, check):
        """True if the feature file exists (and, when verifying, reads back correctly)."""
        if not path.exists():
            return False
        if not self.verify_existing:
            return True
        try:
            check(path)
            return True
        except DataError:
            return False


    # ------------------------------------------------------------ running
    def run(self, indices, failures_file):
        """Extract the features of the records at `indices`; list failures in `failures_file` (removed when
        there are none, so a stale list never outlives its problems). Returns an ExtractionSummary."""
        summary = ExtractionSummary(failures_file=str(failures_file))
        if self.text_encoder is not None:
            self._run_t5(indices, summary)
        if self.vae is not None:
            self._run_vae(indices, summary)
        if summary.failures:
            atomic_write_text(failures_file, ''.join(json.dumps(f) + '\n' for f in summary.failures))
        elif failures_file.exists():
            failures_file.unlink()
        return summary

    def _bar(self, total, desc):
        return tqdm(total=total, desc=desc, unit='rec', disable=not self.progress, dynamic_ncols=True)

    def _postfix(self, bar, counts):
        bar.set_postfix(written=counts.written, present=counts.skipped, failed=counts.failed, refresh=False)

    def _run_t5(self, indices, summary):
        counts = summary.counts['t5']
        check = lambda p: load_caption_feature(p, self.max_length, self.caption_channels)  # noqa: E731
        with self._bar(len(indices), 'T5 features') as bar:
            for start in range(0, len(indices), self.batch_size):
                batch, prompts = [], []
                for index in indices[start:start + self.batch_size]:
                    record = self.records[index]
                    if self._done(self.caption_path(record), check):
                        counts.skipped += 1
                        continue
                    try:
                        prompts.append(self.prompt_of(record))
                        batch.append(index)
                    except DataError as err:
                        summary.fail('t5', index, record, err)
                if batch:
                    features, masks = self.text_encoder(prompts)
                    features = features.float().cpu().numpy()
                    masks = masks.cpu().numpy()
                    for row, index in enumerate(batch):
                        save_caption_feature(self.caption_path(self.records[index]), features[row:row + 1],
                                             masks[row:row + 1], dtype=self.feature_dtype)
                        counts.written += 1
                bar.update(min(self.batch_size, len(indices) - start))
                self._postfix(bar, counts)

    def _run_vae(self, indices, summary):
        counts = summary.counts['vae']
        todo = []
        for index in indices:
            record = self.records[index]
            expected = None
            if record.height is not None:
                h, w = target_size(record.height, record.width, self.image_size, self.bucket_table)
                expected = (2 * self.vae.config.latent_channels, h // VAE_DOWNSAMPLE, w // VAE_DOWNSAMPLE)
            if self._done(self.vae_path(record), lambda p: load_vae_feature(p, expected)):
                counts.skipped += 1
            else:
                todo.append(index)
        items = _ImageItems(self.dataset, self.records, todo, self.transform, self.image_size, self.bucket_table)
        loader = DataLoader(items, batch_size=None, num_workers=self.num_workers)
        pending = {}  # target (h, w) -> [(index, image tensor)]: each batch holds one size
        with self._bar(len(indices), 'VAE features') as bar:
            bar.update(counts.skipped)
            for index, image, error in loader:
                if error is not None:
                    summary.fail('vae', index, self.records[index], error)
                    bar.update(1)
                    continue
                group = pending.setdefault(tuple(image.shape[-2:]), [])
                group.append((index, image))
                if len(group) == self.batch_size:
                    self._encode(pending.pop(tuple(image.shape[-2:])), counts)
                    bar.update(self.batch_size)
                self._postfix(bar, counts)
            for group in pending.values():
                self._encode(group, counts)
                bar.update(len(group))
            self._postfix(bar, counts)

    def _encode(self, group, counts):
        features = posterior_feature(self.vae, torch.stack([image for _, image in group])).float().cpu().numpy()
        for (index, _), feature in zip(group, features):
            save_vae_feature(self.vae_path(self.records[index]), feature, dtype=self.feature_dtype)
            counts.written += 1


class _ImageItems(Dataset):
    """(index, transformed image, None) or (index, None, error message) per record, for a DataLoader
    (holds only what worker processes need, not the encoders)."""

    def __init__(self, dataset, records, indices, transform, image_size, bucket_table):
        self.dataset = dataset
        self.records = records
        self.indices = indices
        self.transform = transform
        self.image_size = image_size
        self.bucket_table = bucket_table

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        record = self.records[index]
        image_file = paths.image_path(self.dataset, record.path)
        try:
            image = load_image(image_file)
            if record.height is not None and (image.height, image.width) != (record.height, record.width):
                raise DataFileError(image_file, f'image is {image.height}x{image.width} (h x w) but the annotation '
                                                f'says {record.height}x{record.width}')
        except DataError as err:
            return index, None, str(err)
        height, width = target_size(image.height, image.width, self.image_size, self.bucket_table)
        return index, self.transform(image, height, width), None
