"""Start-up checks: a config that cannot train fails in the first second with a named error, not after
minutes of data loading or on step 1000."""
import torch

from diffusion.model.builder import is_multi_scale
from diffusion.release import VAE_DOWNSAMPLE
from diffusion.train.optim import LR_SCHEDULES, OPTIMIZERS
from diffusion.utils.config import ConfigError

MIXED_PRECISION = ("no", "fp16", "bf16")


def _require(condition, key, value, expected):
    if not condition:
        raise ConfigError(f"config key {key!r} is {value!r}; expected {expected}")


def check_training_config(cfg):
    """Values that no training run can work with, checked before anything is built."""
    _require(cfg.train_batch_size >= 1, "train_batch_size", cfg.train_batch_size, "at least 1")
    _require(cfg.num_epochs >= 1, "num_epochs", cfg.num_epochs, "at least 1")
    _require(cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", cfg.max_steps, "None or at least 1")
    _require(cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
             cfg.gradient_accumulation_steps, "at least 1")
    _require(cfg.log_interval >= 1, "log_interval", cfg.log_interval, "at least 1")
    _require(cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps", cfg.max_nonfinite_steps, "at least 1")
    _require(0.0 <= cfg.ema_rate < 1.0, "ema_rate", cfg.ema_rate, "in [0, 1)")
    _require(cfg.mixed_precision in MIXED_PRECISION, "mixed_precision", cfg.mixed_precision,
             f"one of {MIXED_PRECISION}")
    _require(cfg.mixed_precision != "fp16" or torch.cuda.is_available(), "mixed_precision", cfg.mixed_precision,
             "'bf16' or 'no' on a machine without CUDA (fp16 loss scaling needs a GPU)")
    _require(not cfg.use_fsdp or torch.cuda.is_available(), "use_fsdp", cfg.use_fsdp,
             "False on a machine without CUDA (FSDP here runs on GPUs)")
    _require(cfg.optimizer.get("type") in OPTIMIZERS, "optimizer.type", cfg.optimizer.get("type"),
             f"one of {OPTIMIZERS}")
    _require(cfg.optimizer.get("lr", 0) > 0, "optimizer.lr", cfg.optimizer.get("lr"), "a positive number")
    _require(cfg.lr_schedule in LR_SCHEDULES, "lr_schedule", cfg.lr_schedule, f"one of {LR_SCHEDULES}")
    _require(cfg.train_sampling_steps >= 2, "train_sampling_steps", cfg.train_sampling_steps, "at least 2")
    patch = dict(cfg.model_kwargs).get("patch_size", 2)
    _require(cfg.image_size % (VAE_DOWNSAMPLE * patch) == 0, "image_size", cfg.image_size,
             f"a multiple of {VAE_DOWNSAMPLE * patch} (VAE factor {VAE_DOWNSAMPLE} x patch size {patch})")
    _require(not cfg.multi_scale or is_multi_scale(cfg.model), "multi_scale", cfg.multi_scale,
             f"False for the single-scale model {cfg.model!r} (multi-scale training needs a PixArtMS model)")
    _require(not cfg.multi_scale or cfg.aspect_ratio_type, "aspect_ratio_type", cfg.aspect_ratio_type,
             "a bucket table such as 'ASPECT_RATIO_512' when multi_scale=True")
    resume = cfg.resume_from
    _require(not resume.get("load_ema") and resume.get("resume_optimizer", True) and
             resume.get("resume_lr_scheduler", True), "resume_from", dict(resume),
             "load_ema=False, resume_optimizer=True, resume_lr_scheduler=True: a resume restores the whole "
             "training state; start from chosen weights with load_from / --load-from instead")
    _require(not cfg.validation_prompts or cfg.t5_pretrained, "t5_pretrained", cfg.t5_pretrained,
             "a T5 folder to encode validation_prompts")


def check_batch_fits_model(dataset, model, cfg):
    """Read record 0 now, so a broken dataset fails at start-up rather than at some step, and check that its
    channels fit the model (the dataset itself checks feature shapes against image_size and the caption
    settings)."""
    if len(dataset) == 0:
        raise ConfigError(f"the dataset {cfg.data.get('type')} under {cfg.data_root!r} has no records")
    x = dataset[0][0]
    channels = 2 * model.in_channels if cfg.data.get("load_vae_feat", True) else 3
    if x.shape[0] != channels:
        raise ConfigError(f"record 0 of {cfg.data.get('type')} under {cfg.data_root!r} has {x.shape[0]} channels; "
                          f"the model needs {channels} ({'VAE mean+std' if channels != 3 else 'RGB'})")
