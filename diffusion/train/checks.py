"""Start-up checks: a config that cannot train fails in the first second with a named error, not after
minutes of data loading or on step 1000.

load_config has checked every key, type and range already (diffusion/utils/config.py); these are what a training
run needs beyond a valid config: this machine's devices, the code's registries, features it can read, and a
dataset that fills at least one optimizer step.
"""
import importlib.util

import torch

from diffusion.data import paths
from diffusion.data.datasets.batch_sampler import bucket_sizes, global_batch_count
from diffusion.data.errors import DataError
from diffusion.data.transforms import TRANSFORMS
from diffusion.model.builder import MODELS, is_multi_scale
from diffusion.release import XL_2_SHAPE
from diffusion.utils.config import ConfigError


def _require(condition, key, value, expected):
    if not condition:
        raise ConfigError(f"config key {key!r} is {value!r}; expected {expected}")


def check_training_config(cfg):
    """What a training run needs beyond a valid config, checked before anything is built."""
    _require(cfg.mixed_precision != "fp16" or torch.cuda.is_available(), "mixed_precision", cfg.mixed_precision,
             "'bf16' or 'no' on a machine without CUDA (fp16 loss scaling needs a GPU)")
    _require(not cfg.use_fsdp or torch.cuda.is_available(), "use_fsdp", cfg.use_fsdp,
             "False on a machine without CUDA (FSDP here runs on GPUs)")
    _require(cfg.optimizer.type != "CAME" or importlib.util.find_spec("came_pytorch") is not None, "optimizer.type",
             cfg.optimizer.type, "'AdamW', or install came-pytorch for CAME")
    _require(not cfg.multi_scale or is_multi_scale(cfg.model), "multi_scale", cfg.multi_scale,
             f"False for the single-scale model {cfg.model!r} (multi-scale training needs a PixArtMS model)")
    _require(not cfg.multi_scale or cfg.aspect_ratio_type, "aspect_ratio_type", cfg.aspect_ratio_type,
             "a bucket table such as 'ASPECT_RATIO_512' when multi_scale=True")
    _require(not cfg.multi_scale or cfg.data.type == "InternalDataMS" or cfg.get("dreambooth"), "data.type",
             cfg.data.type, "'InternalDataMS' when multi_scale=True (the dataset that yields aspect-ratio buckets; "
             "DreamBooth buckets its own images)")
    _, preset_shape = MODELS[cfg.model]
    for key, fixed in preset_shape.items():
        value = cfg.model_kwargs.get(key, fixed)
        _require(value == fixed, f"model_kwargs.{key}", value,
                 f"{fixed}: {cfg.model} fixes it (model 'PixArt' or 'PixArtMS' takes any shape)")
    transform = cfg.data.get("transform", "default_train")
    _require(transform in TRANSFORMS, "data.transform", transform, f"one of {sorted(TRANSFORMS)}")
    _require(cfg.data.get("load_t5_feat", True), "data.load_t5_feat", cfg.data.get("load_t5_feat"),
             "True for training: it reads the T5 features tools/extract_features.py writes")
    depth = cfg.model_kwargs.get("depth", XL_2_SHAPE["depth"])
    _require(not cfg.controlnet or cfg.copy_blocks_num <= depth - 1, "copy_blocks_num", cfg.copy_blocks_num,
             f"at most {depth - 1} for a {depth}-block model (ControlNet copy j feeds base block j+1)")
    _require(not cfg.validation_prompts or cfg.t5_pretrained, "t5_pretrained", cfg.t5_pretrained,
             "a T5 folder to encode validation_prompts")


def _dataset_name(dataset, cfg):
    """The dataset's class, folder and annotation files, for errors."""
    folder = getattr(dataset, "dataset_dir", cfg.data_root)
    lists = cfg.data.get(getattr(dataset, "annotation_list_key", None) or "", ())
    files = ", ".join(str(paths.annotation_path(folder, name)) for name in ([lists] if isinstance(lists, str)
                                                                             else lists))
    return f"the {type(dataset).__name__} dataset {folder}" + (f" ({files})" if files else "")


def check_dataset_fills_a_step(dataset, cfg, world_size):
    """Records for at least one optimizer step: an epoch drops each bucket's incomplete last global batch of
    train_batch_size x world_size x gradient_accumulation_steps records, so a smaller dataset would train on
    nothing. Call it once the dataset is built, before its batch sampler."""
    if len(dataset) == 0:
        raise DataError(f"{_dataset_name(dataset, cfg)} has no records: nothing to train on")
    sizes = bucket_sizes(dataset)
    step = cfg.train_batch_size * world_size * cfg.gradient_accumulation_steps
    if global_batch_count(sizes, step) == 0:
        buckets = f" in {len(sizes)} aspect-ratio buckets (the largest holds {sizes[0]})" if len(sizes) > 1 else ""
        raise DataError(f"{_dataset_name(dataset, cfg)} has {len(dataset)} records{buckets}, fewer than one "
                        f"optimizer step of {step} (train_batch_size {cfg.train_batch_size} x {world_size} rank(s) x "
                        f"{cfg.gradient_accumulation_steps} accumulation step(s)); an epoch drops incomplete "
                        "batches, so it would have no step: lower train_batch_size or add records")


def check_batch_fits_model(dataset, model, cfg):
    """Read record 0 now, so a broken dataset fails at start-up rather than at some step, and check that its
    channels fit the model (the dataset itself checks feature shapes against image_size and the caption
    settings)."""
    if len(dataset) == 0:
        raise DataError(f"{_dataset_name(dataset, cfg)} has no records: nothing to train on")
    x = dataset[0][0]
    channels = 2 * model.in_channels if cfg.data.get("load_vae_feat", True) else 3
    if x.shape[0] != channels:
        raise ConfigError(f"record 0 of {_dataset_name(dataset, cfg)} has {x.shape[0]} channels; the model needs "
                          f"{channels} ({'VAE mean+std' if channels != 3 else 'RGB'})")
