"""InternalData (json annotations, one resolution) and InternalDataMS (aspect-ratio buckets).

An item is `(x, caption_feature, attention_mask, data_info)`:
- `x`: the stored VAE feature (8, h/8, w/8), posterior mean then std, unscaled and NOT sampled (the training
  step samples it with its own generator, `diffusion.data.latents.sample_latent`), or, with
  `load_vae_feat=False`, the transformed image (3, h, w) in [-1, 1];
- `caption_feature` (1, L, C) float32 and `attention_mask` (1, L) int64, from the T5 feature file or, with
  `load_t5_feat=False`, from `text_encoder([prompt])`;
- `data_info`: `img_hw` float32 [h, w] of the original image, `aspect_ratio` float32 [ratio] (the bucket's
  for InternalDataMS, the image's own h/w otherwise) and `index`, the record's index; with `control_condition`
  (ControlNet training) also `condition`, the record's condition feature (8, h/8, w/8), mean then std of the
  VAE-encoded edge map, unscaled and not sampled, like `x`.
The default DataLoader collation batches items. An item depends on its index only: no random flips and no
resampling. A missing or corrupt file raises `BadRecordError` naming the record and the file (SPEC section 9
point 5: the reference swallowed every error and silently took another image). Because an item depends on its
index only, `cache_items=True` may keep every loaded item in memory, so that later epochs read no files (see
`InternalData`).

A dataset also describes its layout to the feature extractor (`diffusion.data.extract`): its records, each
record's target size, caption, transformed image and feature paths.
"""
import torch
from torch.utils.data import Dataset

from diffusion.data import paths
from diffusion.data.aspect_ratios import aspect_ratio_table, closest_bucket
from diffusion.data.errors import BadRecordError, DataError, DataFileError
from diffusion.data.feature_io import load_caption_feature, load_image, load_vae_feature
from diffusion.data.records import load_dataset_records
from diffusion.data.transforms import get_transform
from diffusion.release import T5_TOKENS, VAE_DOWNSAMPLE

VAE_FEATURE_CHANNELS = 8  # posterior mean and std of a 4-channel latent


class InternalData(Dataset):
    """Images listed in `partition/<image_list_json>` files of the dataset folder `data_root/root`, all at
    `resolution` x `resolution` (see the module docstring for the item format, `diffusion.data.paths` for
    where each file lives).

    `cache_items=True` keeps each item in memory once loaded (bad records are not kept: they fail again on
    every read). For small feature datasets read for many epochs: the toy recipe's 4000 items take 70 MB,
    and reading their two feature files was 30% of a toy training step. Off by default: a real T5 feature
    is 1-2 MB, so a million images would not fit; with DataLoader workers every worker keeps its own copy."""

    annotation_kind = 'json'  # which record loader reads the annotation files (SAM: 'txt')
    annotation_list_key = 'image_list_json'  # the constructor argument (and data.* key) naming them

    def __init__(self, root, image_list_json=('data_info.json',), transform='default_train', resolution=256,
                 load_vae_feat=True, load_t5_feat=True, max_length=T5_TOKENS, caption_channels=None,
                 text_encoder=None, data_root='', cache_items=False, control_condition=None):
        resolution = int(resolution)
        if resolution <= 0 or resolution % VAE_DOWNSAMPLE:
            raise ValueError(f'resolution must be a positive multiple of {VAE_DOWNSAMPLE}, got {resolution}')
        if not load_t5_feat and text_encoder is None:
            raise ValueError('load_t5_feat=False needs a text_encoder (e.g. a T5Embedder) to encode the captions; '
                             'otherwise extract the features with tools/extract_features.py')
        self.dataset_dir = paths.dataset_dir(data_root, root)
        self.resolution = resolution
        self.transform = get_transform(transform)
        self.load_vae_feat = load_vae_feat
        self.load_t5_feat = load_t5_feat
        self.max_length = max_length
        self.caption_channels = caption_channels
        self.text_encoder = text_encoder
        self.control_condition = control_condition  # 'canny' / 'hed': read its features; None: no condition
        self.records = load_dataset_records(self.dataset_dir, image_list_json, self.annotation_kind)
        self.cached_items = {} if cache_items else None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        if not 0 <= index < len(self.records):
            raise IndexError(f'record index {index} out of range for {len(self.records)} records')
        if self.cached_items is not None and index in self.cached_items:
            x, caption_feature, attention_mask, data_info = self.cached_items[index]
            return x, caption_feature, attention_mask, dict(data_info)  # a caller may edit its dict
        try:
            item = self.load_item(index)
        except DataError as err:
            raise BadRecordError(index, self.records[index].source, str(err)) from err
        if self.cached_items is not None:
            self.cached_items[index] = item
            item = (*item[:3], dict(item[3]))
        return item

    # ------------------------------------------------------------ per-record choices (InternalDataMS, SAM)
    def target_size(self, index):
        """(h, w) in pixels of the record's training image."""
        return self.resolution, self.resolution

    def data_aspect_ratio(self, index, height, width):
        """The aspect ratio passed in data_info: the image's own h/w here."""
        return height / width

    def vae_feature_path(self, record):
        return paths.vae_feature_path(self.dataset_dir, record.path, self.resolution)

    def caption_feature_path(self, record):
        return paths.caption_feature_path(self.dataset_dir, record.path)

    def condition_feature_path(self, record):
        return paths.condition_feature_path(self.dataset_dir, record.path, self.control_condition, self.resolution)

    def original_size(self, record):
        """(h, w) of the original image, from the annotation."""
        return record.height, record.width

    def prompt(self, record):
        return record.prompt

    # ------------------------------------------------------------ loading
    def load_item(self, index):
        record = self.records[index]
        height, width = self.target_size(index)
        if self.load_vae_feat:
            x = load_vae_feature(self.vae_feature_path(record),
                                 (VAE_FEATURE_CHANNELS, height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE))
            orig_h, orig_w = self.original_size(record)
        else:
            x, (orig_h, orig_w) = self.transformed_image(index)
        caption_feature, attention_mask = self.load_caption(record)
        data_info = {
            'img_hw': torch.tensor([orig_h, orig_w], dtype=torch.float32),
            'aspect_ratio': torch.tensor([self.data_aspect_ratio(index, orig_h, orig_w)], dtype=torch.float32),
            'index': index,
        }
        if self.control_condition is not None:
            data_info['condition'] = load_vae_feature(
                self.condition_feature_path(record),
                (VAE_FEATURE_CHANNELS, height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE))
        return x, caption_feature, attention_mask, data_info

    def transformed_image(self, index):
        """The record's image transformed to its target size, (3, h, w) in [-1, 1], and the image's (h, w)."""
        record = self.records[index]
        image_file = paths.image_path(self.dataset_dir, record.path)
        image = load_image(image_file)
        if record.height is not None and (image.height, image.width) != (record.height, record.width):
            raise DataFileError(image_file, f'image is {image.height}x{image.width} (h x w) but the annotation '
                                            f'says {record.height}x{record.width}')
        return self.transform(image, *self.target_size(index)), (image.height, image.width)

    def load_caption(self, record):
        if self.load_t5_feat:
            return load_caption_feature(self.caption_feature_path(record), self.max_length, self.caption_channels)
        feature, mask = self.text_encoder([self.prompt(record)])
        return feature.detach().float().cpu(), mask.detach().long().cpu()


class InternalDataMS(InternalData):
    """InternalData on aspect-ratio buckets: each record goes to the bucket of `aspect_ratio_type` (default
    `ASPECT_RATIO_<resolution>`) closest to its annotated h/w, is resized to cover the bucket and center-cropped
    (or its features are read from the multi-scale feature folder), and `data_info['aspect_ratio']` is the
    bucket's ratio. `bucket_keys[i]` is record i's bucket, for `AspectRatioBatchSampler`."""

    def __init__(self, root, aspect_ratio_type=None, **kwargs):
        super().__init__(root, **kwargs)
        self.aspect_ratio_type = aspect_ratio_type or f'ASPECT_RATIO_{self.resolution}'
        self.buckets = aspect_ratio_table(self.aspect_ratio_type)
        self.bucket_keys = [closest_bucket(r.height, r.width, self.buckets)[0] for r in self.records]

    def target_size(self, index):
        return self.buckets[self.bucket_keys[index]]

    def data_aspect_ratio(self, index, height, width):
        return float(self.bucket_keys[index])

    def vae_feature_path(self, record):
        return paths.vae_feature_path(self.dataset_dir, record.path, self.resolution, multi_scale=True)

    def condition_feature_path(self, record):
        return paths.condition_feature_path(self.dataset_dir, record.path, self.control_condition, self.resolution,
                                            multi_scale=True)
