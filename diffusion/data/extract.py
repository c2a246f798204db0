"""Offline feature extraction: T5 caption features (.npz) and VAE posterior features (.npy) of a dataset,
written where the dataset reads them. The dataset (`diffusion.data.datasets`) describes its own layout: its
records, each record's caption, target size and transformed image, and its feature paths.

- Resumable: a record whose feature file exists is skipped (writes are atomic, so an existing file is
  complete; `verify_existing=True` also opens it and redoes it if it is damaged).
- Shardable: `shard_indices(n, start, end, rank, world_size)` splits records between processes or machines,
  each record in exactly one shard.
- Multi-scale: an InternalDataMS resizes each image to cover its closest bucket and center-crops it, so
  aspect ratios are never distorted (SPEC section 9 point 6), and batches hold one bucket size each.
- ControlNet: a dataset with `control_condition` ('canny', 'hed') also gets its condition features, the VAE
  posterior of the record's edge map (`diffusion.data.conditions.make_condition` of the transformed image), where
  it reads them (`paths.condition_feature_path`); 'hed' needs the HED network (`diffusion.model.hed.load_hed`).
- A record that fails (corrupt image, missing caption, ...) is reported, not fatal: the summary lists it.
- A file that cannot be written (disk full, read-only folder) stops the run with a FeatureWriteError naming
  it; no partial file is left under a final name, and the files written before it are complete.
"""
import json
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from diffusion.data.conditions import make_condition
from diffusion.data.errors import DataError
from diffusion.data.feature_io import load_caption_feature, load_vae_feature, save_caption_feature, save_vae_feature
from diffusion.data.latents import posterior_feature
from diffusion.release import VAE_DOWNSAMPLE
from diffusion.utils.fileio import atomic_write_text


class FeatureWriteError(DataError):
    """A feature (or failure-list) file that cannot be written: the run stops, naming the file and why."""

    def __init__(self, path, error, written):
        reason = error.strerror or str(error)
        super().__init__(f'cannot write {path}: {reason}; the {written} feature file(s) written before it are '
                         'complete and kept (a rerun skips them)')
        self.path = str(path)


def _write(summary, kind, save, path, *args, **kwargs):
    """`save(path, *args, **kwargs)` (an atomic write) counted as a `kind` feature; an OSError becomes a
    FeatureWriteError."""
    try:
        save(path, *args, **kwargs)
    except OSError as err:
        raise FeatureWriteError(path, err, summary.written()) from err
    summary.counts[kind].written += 1


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
    """What a run did, per feature kind ('t5', 'vae', 'condition'), and the failed records."""
    counts: dict = field(default_factory=lambda: {'t5': FeatureCounts(), 'vae': FeatureCounts(),
                                                  'condition': FeatureCounts()})
    failures: list = field(default_factory=list)  # dicts: index, source, image, feature, error
    failures_file: str = None

    def fail(self, kind, index, record, error):
        self.counts[kind].failed += 1
        self.failures.append({'index': index, 'source': record.source, 'image': record.path, 'feature': kind,
                              'error': str(error)})

    def written(self):
        return sum(c.written for c in self.counts.values())

    def text(self):
        lines = [f'{kind}: {c.written} written, {c.skipped} already present, {c.failed} failed'
                 for kind, c in self.counts.items() if c.written or c.skipped or c.failed]
        if self.failures:
            lines.append(f'{len(self.failures)} failure(s) listed in {self.failures_file}')
        return '\n'.join(lines or ['nothing to do'])


class FeatureExtractor:
    """Writes the feature files of `dataset`, an InternalData, InternalDataMS or SAM (`diffusion.data.datasets`),
    which gives the records, their captions, target sizes and images, the feature paths and the caption length
    and width that existing files are checked against.

    `text_encoder`: a callable list[str] -> (features (B, L, C), mask (B, L)), e.g. a T5Embedder, or None to
    skip T5 features. `vae`: a diffusers AutoencoderKL, or None to skip VAE features. With a `vae`, a dataset
    whose `control_condition` is set also gets its condition features (`skip_condition=True`: not), for 'hed' by
    `hed`, the loaded HED network.
    """

    def __init__(self, dataset, text_encoder=None, vae=None, batch_size=32, num_workers=0, feature_dtype=np.float32,
                 verify_existing=False, progress=True, hed=None, skip_condition=False):
        self.condition = None if skip_condition or vae is None else getattr(dataset, 'control_condition', None)
        if self.condition == 'hed' and hed is None:
            raise ValueError("condition features 'hed' need the HED network (a local ControlNetHED checkpoint, "
                             "diffusion.model.hed.load_hed)")
        self.hed = hed
        self.dataset = dataset
        self.records = dataset.records
        self.text_encoder = text_encoder
        self.vae = vae
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.feature_dtype = feature_dtype
        self.verify_existing = verify_existing
        self.progress = progress

    # ------------------------------------------------------------ checks
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
            self._run_images(indices, summary, 'vae', self.dataset.vae_feature_path, lambda image: image)
        if self.condition is not None:
            self._run_images(indices, summary, 'condition', self.dataset.condition_feature_path,
                             self._condition_image)
        try:
            if summary.failures:
                atomic_write_text(failures_file, ''.join(json.dumps(f) + '\n' for f in summary.failures))
            elif failures_file.exists():
                failures_file.unlink()
        except OSError as err:
            raise FeatureWriteError(failures_file, err, summary.written()) from err
        return summary

    def _bar(self, total, desc):
        return tqdm(total=total, desc=desc, unit='rec', disable=not self.progress, dynamic_ncols=True)

    def _postfix(self, bar, counts):
        bar.set_postfix(written=counts.written, present=counts.skipped, failed=counts.failed, refresh=False)

    def _run_t5(self, indices, summary):
        counts = summary.counts['t5']
        check = lambda p: load_caption_feature(p, self.dataset.max_length, self.dataset.caption_channels)  # noqa: E731
        with self._bar(len(indices), 'T5 features') as bar:
            for start in range(0, len(indices), self.batch_size):
                batch, prompts = [], []
                for index in indices[start:start + self.batch_size]:
                    record = self.records[index]
                    if self._done(self.dataset.caption_feature_path(record), check):
                        counts.skipped += 1
                        continue
                    try:
                        prompts.append(self.dataset.prompt(record))
                        batch.append(index)
                    except DataError as err:
                        summary.fail('t5', index, record, err)
                if batch:
                    features, masks = self.text_encoder(prompts)
                    features = features.float().cpu().numpy()
                    masks = masks.cpu().numpy()
                    for row, index in enumerate(batch):
                        path = self.dataset.caption_feature_path(self.records[index])
                        _write(summary, 't5', save_caption_feature, path, features[row:row + 1],
                               masks[row:row + 1], dtype=self.feature_dtype)
                bar.update(min(self.batch_size, len(indices) - start))
                self._postfix(bar, counts)

    def _condition_image(self, image):
        """The condition image (3, h, w) in [-1, 1] of a transformed image (3, h, w) in [-1, 1]."""
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        return make_condition(Image.fromarray(pixels), *image.shape[-2:], self.condition, self.hed)[0]

    def _run_images(self, indices, summary, kind, path_of, prepare):
        """VAE features of `prepare(transformed image)` for each record, written to `path_of(record)`."""
        counts = summary.counts[kind]
        todo = []
        for index in indices:
            h, w = self.dataset.target_size(index)
            expected = (2 * self.vae.config.latent_channels, h // VAE_DOWNSAMPLE, w // VAE_DOWNSAMPLE)
            if self._done(path_of(self.records[index]), lambda p: load_vae_feature(p, expected)):
                counts.skipped += 1
            else:
                todo.append(index)
        items = _ImageItems(self.dataset, todo)
        loader = DataLoader(items, batch_size=None, num_workers=self.num_workers)
        pending = {}  # target (h, w) -> [(index, image tensor)]: each batch holds one size
        with self._bar(len(indices), 'VAE features' if kind == 'vae' else f'{self.condition} features') as bar:
            bar.update(counts.skipped)
            for index, image, error in loader:
                if error is not None:
                    summary.fail(kind, index, self.records[index], error)
                    bar.update(1)
                    continue
                group = pending.setdefault(tuple(image.shape[-2:]), [])
                group.append((index, prepare(image)))
                if len(group) == self.batch_size:
                    self._encode(pending.pop(tuple(image.shape[-2:])), summary, kind, path_of)
                    bar.update(self.batch_size)
                self._postfix(bar, counts)
            for group in pending.values():
                self._encode(group, summary, kind, path_of)
                bar.update(len(group))
            self._postfix(bar, counts)

    def _encode(self, group, summary, kind, path_of):
        features = posterior_feature(self.vae, torch.stack([image for _, image in group])).float().cpu().numpy()
        for (index, _), feature in zip(group, features):
            _write(summary, kind, save_vae_feature, path_of(self.records[index]), feature, dtype=self.feature_dtype)


class _ImageItems(Dataset):
    """(index, transformed image, None) or (index, None, error message) per record, for a DataLoader
    (holds only what worker processes need, not the encoders)."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        try:
            image, _ = self.dataset.transformed_image(index)
        except DataError as err:
            return index, None, str(err)
        return index, image, None
