"""Build a network by its registered name, from a config or directly (`build_model('PixArt_XL_2', ...)`)."""
import difflib
from collections.abc import Mapping

# VAE latents are 1/8 of the image side (SD-VAE; the toy VAE follows the same convention).
VAE_DOWNSAMPLE = 8


class Registry:
    """Name -> constructor. Filled by the `@MODELS.register` decorators in `diffusion.model.nets`."""

    def __init__(self, kind):
        self.kind = kind
        self._entries = {}

    def register(self, fn):
        if fn.__name__ in self._entries:
            raise KeyError(f"{self.kind} {fn.__name__!r} is registered twice")
        self._entries[fn.__name__] = fn
        return fn

    def get(self, name):
        import diffusion.model.nets  # noqa: F401  (registers the networks)
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._entries))})")
        return self._entries[name]

    def names(self):
        import diffusion.model.nets  # noqa: F401
        return sorted(self._entries)


MODELS = Registry("model")


def build_model(cfg, use_grad_checkpoint=False, use_fp32_attention=False, gc_step=1, **kwargs):
    """Build a registered model. `cfg` is a name ('PixArt_XL_2') or a mapping with `type` and constructor
    arguments; `kwargs` are further constructor arguments (input_size, lewei_scale, ...)."""
    if isinstance(cfg, str):
        name, cfg_kwargs = cfg, {}
    elif isinstance(cfg, Mapping) and "type" in cfg:
        cfg_kwargs = {k: v for k, v in cfg.items() if k != "type"}
        name = cfg["type"]
    else:
        raise TypeError(f"model config must be a registered name or a mapping with 'type', got {cfg!r}")
    overlap = set(cfg_kwargs) & set(kwargs)
    if overlap:
        raise TypeError(f"model arguments {sorted(overlap)} are given twice")
    return MODELS.get(name)(grad_checkpointing=use_grad_checkpoint, fp32_attention=use_fp32_attention,
                            gc_step=gc_step, **cfg_kwargs, **kwargs)


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
