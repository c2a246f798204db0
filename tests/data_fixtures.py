"""Tiny datasets, encoders, training configs and helpers shared by the tests (tests/test_data_*.py, test_toy_recipe.py,
the training tests)."""
import json
import zlib

import numpy as np
import torch
from PIL import Image

from diffusion.data import paths
from diffusion.data.datasets import InternalData, InternalDataMS
from diffusion.data.extract import FeatureExtractor

MAX_LENGTH, CHANNELS = 6, 8
# A tiny PixArt training run, what the training tests share; each test sets what it is about on top.
TINY_TRAINING = dict(model='PixArt', model_kwargs=dict(depth=2, hidden_size=96, num_heads=4, patch_size=2),
                     image_size=64, scale_factor=1.0, mixed_precision='no', train_batch_size=4, num_workers=0,
                     optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.0, eps=1e-8), auto_lr=None,
                     lr_schedule_args=dict(num_warmup_steps=0), ema_rate=0.9, log_interval=1, save_model_epochs=0,
                     seed=7)
# (height, width) of the test images: square, wide, tall and nearly square
SIZES = [(64, 64), (48, 96), (96, 48), (64, 64), (72, 64), (48, 96)]


def write_image(path, height, width, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def make_dataset(root, sizes=SIZES, json_name='data_info.json', subdir='set'):
    """A dataset folder with random images of `sizes` and an annotation json; returns the folder."""
    items = []
    for i, (h, w) in enumerate(sizes):
        rel = f'{subdir}/img{i}.png'
        write_image(paths.image_path(root, rel), h, w, seed=i)
        items.append({'path': rel, 'prompt': f'caption number {i}', 'height': h, 'width': w, 'ratio': h / w})
    annotation = paths.annotation_path(root, json_name)
    annotation.parent.mkdir(parents=True, exist_ok=True)
    annotation.write_text(json.dumps(items))
    return root


class HashTextEncoder:
    """A stand-in text encoder: features seeded by each prompt's text, mask = its word count + 1 (EOS)."""

    def __init__(self, max_length=MAX_LENGTH, channels=CHANNELS):
        self.max_length, self.channels = max_length, channels
        self.calls = 0

    def __call__(self, prompts):
        self.calls += 1
        features, masks = [], []
        for prompt in prompts:
            gen = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            features.append(torch.randn(self.max_length, self.channels, generator=gen))
            mask = torch.zeros(self.max_length, dtype=torch.long)
            mask[:min(len(prompt.split()) + 1, self.max_length)] = 1
            masks.append(mask)
        return torch.stack(features), torch.stack(masks)


def tiny_vae(seed=0):
    """A random AutoencoderKL with the pipeline's /8 downsampling and 4 latent channels."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                         norm_num_groups=4, sample_size=64).eval()


def extractor(root, text_encoder=None, vae=None, json_names=('data_info.json',), image_size=64, buckets=None,
              **kwargs):
    """A FeatureExtractor of the InternalData at `root` (InternalDataMS on the table named `buckets`), and its
    records."""
    options = dict(image_list_json=list(json_names), resolution=image_size, max_length=MAX_LENGTH,
                   caption_channels=CHANNELS)
    dataset = InternalDataMS(root, aspect_ratio_type=buckets, **options) if buckets else InternalData(root, **options)
    return FeatureExtractor(dataset, text_encoder=text_encoder, vae=vae, batch_size=4, progress=False,
                            **kwargs), dataset.records


def write_training_config(path, base, extra="", **values):
    """A config file at `path` inheriting `base`, setting TINY_TRAINING updated with `values` (Python literals),
    then the config text `extra`; returns the path."""
    lines = [f"_base_ = [{str(base)!r}]"] + [f"{key} = {value!r}" for key, value in {**TINY_TRAINING, **values}.items()]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path
