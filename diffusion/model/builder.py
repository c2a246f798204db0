"""Build a network by its registered name, from a config or directly (`build_model('PixArt_XL_2', ...)`), wrap
one in a ControlNet (`build_controlnet`), and tell multi-scale models from single-scale ones."""
from collections.abc import Mapping

import torch

from diffusion.model.nets import ControlPixArtHalf, ControlPixArtMSHalf, PixArt, PixArtMS
from diffusion.release import VAE_DOWNSAMPLE, XL_2_SHAPE
from diffusion.utils.names import lookup

# The names a config's `model` may take: the network class and the shape that name fixes. The presets fix
# the released XL/2 shape; the bare class names take any shape (from model_kwargs).
MODELS = {
    "PixArt": (PixArt, {}),
    "PixArtMS": (PixArtMS, {}),
    "PixArt_XL_2": (PixArt, XL_2_SHAPE),  # the released 256 and 512 px models
    "PixArtMS_XL_2": (PixArtMS, XL_2_SHAPE),  # the released 1024 px multi-scale model
}


def _name_and_arguments(cfg):
    """A config's `model` entry as (name, constructor arguments): a name, or a mapping with `type`."""
    if isinstance(cfg, str):
        return cfg, {}
    if isinstance(cfg, Mapping) and "type" in cfg:
        return cfg["type"], {k: v for k, v in cfg.items() if k != "type"}
    raise TypeError(f"model config must be a registered name or a mapping with 'type', got {cfg!r}")


def build_model(cfg, use_grad_checkpoint=False, use_fp32_attention=False, gc_step=1, **kwargs):
    """Build a registered model. `cfg` is a name ('PixArt_XL_2') or a mapping with `type` and constructor
    arguments; `kwargs` are further constructor arguments (input_size, lewei_scale, ...). A preset's shape
    may be restated only with the preset's values."""
    name, cfg_kwargs = _name_and_arguments(cfg)
    overlap = set(cfg_kwargs) & set(kwargs)
    if overlap:
        raise TypeError(f"model arguments {sorted(overlap)} are given twice")
    cls, shape = lookup(MODELS, name, "model")
    kwargs = {**cfg_kwargs, **kwargs}
    for key, value in shape.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{name} fixes {key}={value}, got {key}={kwargs[key]}; build {cls.__name__!r} "
                             f"with model_kwargs for other shapes")
    return cls(grad_checkpointing=use_grad_checkpoint, fp32_attention=use_fp32_attention, gc_step=gc_step,
               **{**kwargs, **shape})


# The released ControlNets copy 13 of the 28 base blocks (PIXART-delta).
DEFAULT_COPY_BLOCKS_NUM = 13


def build_controlnet(base_model, copy_blocks_num=DEFAULT_COPY_BLOCKS_NUM):
    """The ControlNet over `base_model`: ControlPixArtMSHalf for a PixArtMS, else ControlPixArtHalf."""
    cls = ControlPixArtMSHalf if isinstance(base_model, PixArtMS) else ControlPixArtHalf
    return cls(base_model, copy_blocks_num=copy_blocks_num)


def is_multi_scale(model):
    """Whether `model` is multi-scale: a PixArtMS, which takes the image-size and aspect-ratio micro-conditions
    (SPEC section 4). `model` is a network (a ControlNet: its base), a registered name or a config's `model` entry,
    or a PixArt or ControlNet state dict (which then holds the `csize_embedder` weights)."""
    if isinstance(model, ControlPixArtHalf):
        model = model.base_model
    if isinstance(model, torch.nn.Module):
        return isinstance(model, PixArtMS)
    if isinstance(model, Mapping) and "type" not in model:
        return any(key.startswith(("csize_embedder.", "base_model.csize_embedder.")) for key in model)
    cls, _ = lookup(MODELS, _name_and_arguments(model)[0], "model")
    return issubclass(cls, PixArtMS)


def model_kwargs_from_config(cfg):
    """Constructor arguments that a training/inference config implies (everything but the preset's shape)."""
    image_size = cfg.image_size
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"image_size {image_size} is not divisible by the VAE factor {VAE_DOWNSAMPLE}")
    kwargs = dict(
        input_size=image_size // VAE_DOWNSAMPLE,
        lewei_scale=cfg.lewei_scale,
        model_max_length=cfg.model_max_length,
        class_dropout_prob=cfg.class_dropout_prob,
        caption_channels=cfg.caption_channels,
        pred_sigma=cfg.pred_sigma,
        learn_sigma=cfg.learn_sigma and cfg.pred_sigma,
        window_block_indexes=list(cfg.window_block_indexes),
        window_size=cfg.window_size,
        use_rel_pos=cfg.use_rel_pos,
        compile=cfg.get("compile", False),
    )
    extra = dict(cfg.model_kwargs)
    clash = set(extra) & set(kwargs)
    if clash:
        raise ValueError(f"model_kwargs repeats {sorted(clash)}, which have their own config keys; set those instead")
    kwargs.update(extra)
    return kwargs


def build_model_from_config(cfg, **overrides):
    """The model a config describes: `cfg.model` preset, config-derived arguments, then `overrides`."""
    kwargs = model_kwargs_from_config(cfg)
    kwargs.update(overrides)
    return build_model(cfg.model, use_grad_checkpoint=kwargs.pop("grad_checkpointing", cfg.grad_checkpointing),
                       use_fp32_attention=kwargs.pop("fp32_attention", cfg.fp32_attention),
                       gc_step=kwargs.pop("gc_step", cfg.gc_step), **kwargs)
