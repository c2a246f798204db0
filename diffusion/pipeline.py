"""Text-to-image sampling with a PixArt model: load the parts, parse prompts, sample, decode.

Used by scripts/inference.py (batch CLI), scripts/interface.py (Gradio), the quickstart and the training
validation grids, so every entry point samples the same way:
- each image's starting noise comes from its own seed, so an image does not depend on the batch it is in;
- guidance uses the null caption `y_embedding` with the prompt's mask, or a negative prompt with its own;
- prompts may end in `--ar h:w`, `--aspect_ratio h:w` (nearest bucket) or `--hw H:W` (pixels), as in the
  paper's demo;
- a prompt (or negative prompt) longer than the model's caption length is refused, never cut silently
  (`check_prompt_length`, with the tokenizer alone, before any model loads).
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion.data.aspect_ratios import aspect_ratio_table, closest_bucket, table_names
from diffusion.model.builder import build_controlnet, build_model, build_model_from_config, is_multi_scale
from diffusion.model.nets.pixart_controlnet import ControlPixArtHalf, controlnet_copy_count
from diffusion.model.guidance import cfg_inputs, guided_model
from diffusion.model.t5 import CaptionTokenizer, T5Embedder
from diffusion.model_zoo import fetch_conventional, resolve_model_argument
from diffusion.release import (
    RELEASED_T5_DIR,
    RELEASED_VAE_DIR,
    SD_VAE_SCALE_FACTOR,
    VAE_DOWNSAMPLE,
    released_lewei_scale,
    released_model_name,
)
from diffusion.sampling import SAMPLERS as SAMPLER_REGISTRY, get_sampler
from diffusion.utils.checkpoint import CheckpointError, load_state_dict_into, read_checkpoint, state_dict_of
from diffusion.utils.diffusers_interop import (
    NULL_CAPTION_FILE,
    NULL_CAPTION_KEY,
    build_pixart,
    describe_diffusers_transformer,
    load_diffusers_transformer,
    pipeline_part,
)

SAMPLERS = tuple(SAMPLER_REGISTRY)
DEFAULT_STEPS = {name: spec.default_steps for name, spec in SAMPLER_REGISTRY.items()}
# The fewest steps each sampler takes: the registry's DPM-Solver++ and SA-Solver are order-2 multistep solvers.
MIN_STEPS = {name: spec.min_steps for name, spec in SAMPLER_REGISTRY.items()}
_SIZE_FLAG = re.compile(r"\s--(ar|aspect_ratio|hw)\s+(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)\s*$")
_ANY_SIZE_FLAG = re.compile(r"\s--(ar|aspect_ratio|hw)\b")


class PromptError(ValueError):
    """A prompt that cannot be sampled (empty, too long, malformed size flag, a size the model cannot take)."""


@dataclass
class PromptJob:
    prompt: str        # the prompt without its size flag
    height: int        # pixels
    width: int
    seed: int


def parse_prompt(text, model_image_size, multi_scale):
    """(prompt, height, width) from a prompt that may end in `--ar h:w`, `--aspect_ratio h:w` or `--hw H:W`.

    Multi-scale models snap ratios to the nearest bucket of the `ASPECT_RATIO_<size>_TEST` table (a size without
    one refuses `--ar`); `--hw` sizes must be multiples of 16 (VAE factor x patch). Single-scale models only take
    their own size."""
    text = text.strip()
    size = (model_image_size, model_image_size)
    match = _SIZE_FLAG.search(" " + text)
    if match:
        text = (" " + text)[:match.start()].strip()
        kind, a, b = match.group(1), float(match.group(2)), float(match.group(3))
        if a <= 0 or b <= 0:
            raise PromptError(f"--{kind} {match.group(2)}:{match.group(3)} must be two positive numbers")
        if kind == "hw":
            size = (int(a), int(b))
            if size[0] % 16 or size[1] % 16:
                raise PromptError(f"--hw {size[0]}:{size[1]}: height and width must be multiples of 16")
        elif f"ASPECT_RATIO_{model_image_size}_TEST" in table_names():
            _, bucket = closest_bucket(a, b, aspect_ratio_table(f"ASPECT_RATIO_{model_image_size}_TEST"))
            size = tuple(int(v) for v in bucket)
        elif a != b:  # no bucket table for this size: only the model's own square size is known
            sizes = sorted(int(n.split("_")[2]) for n in table_names() if n.endswith("_TEST"))
            fix = ("give the size in pixels with --hw H:W instead" if multi_scale else
                   f"it is single-scale too and samples {model_image_size}x{model_image_size} only: remove the flag")
            raise PromptError(f"--{kind} {match.group(2)}:{match.group(3)}: this model's size, {model_image_size} px, "
                              f"has no aspect-ratio buckets (tables exist for {', '.join(map(str, sizes))} px); {fix}")
    elif _ANY_SIZE_FLAG.search(" " + text):
        raise PromptError(f"malformed size flag in {text!r}; expected '--ar h:w', '--aspect_ratio h:w' or '--hw H:W'")
    if not text:
        raise PromptError("the prompt is empty")
    if not multi_scale and size != (model_image_size, model_image_size):
        raise PromptError(f"this single-scale model samples {model_image_size}x{model_image_size} only; remove the "
                          f"size flag from {text!r} or use a multi-scale (MS) model")
    return text, size[0], size[1]


def resolve_t5_dir(path):
    """A T5 encoder folder; accepts the reference's parent folder holding `t5-v1_1-xxl/` too."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "t5-v1_1-xxl" / "config.json").is_file():
        return path / "t5-v1_1-xxl"
    return path


def _model_for_file(path, config, image_size):
    """The (unloaded) model a checkpoint file is read into: described by `config` or a released `image_size`."""
    if config is not None:
        return build_model_from_config(config, grad_checkpointing=False)
    if image_size is not None:
        return build_model(released_model_name(image_size), input_size=image_size // VAE_DOWNSAMPLE,
                           lewei_scale=released_lewei_scale(image_size))
    raise ValueError(f"{path} is a checkpoint file: give a config or a released image size to describe its model")


def describe_transformer(model_path, config=None, image_size=None):
    """The model `load_transformer` would build for these arguments, on the meta device and without reading the
    weights: its size (`input_size`, multi-scale or not) and caption length (`model_max_length`) are known
    before anything loads. A missing `model_path` or a broken diffusers folder fails here."""
    path = Path(model_path)
    if path.is_dir():
        return describe_diffusers_transformer(path, lcm_without_null_caption=True)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with torch.device("meta"):
        return _model_for_file(path, config, image_size)


def load_transformer(model_path, config=None, image_size=None, use_ema=True):
    """A PixArt/PixArtMS in eval mode with weights from `model_path`: one of our checkpoints (EMA weights when
    it has them and `use_ema`), a released `.pth`, a `.safetensors` file (diffusers' names too), or a diffusers
    transformer folder. The architecture comes from the folder, or from `config` (a loaded config), or from
    `image_size` (the released XL/2 models: MS at 1024). A ControlNet checkpoint (the released
    PixArt-XL-2-*-ControlNet.pth layout, told by its `controlnet.*` keys) gives the ControlNet over that model. A
    distilled LCM pipeline folder (PixArt-LCM-XL-2-1024-MS) needs no null caption file: it gets a zero one, which
    guided sampling refuses."""
    path = Path(model_path)
    copies = 0
    if path.is_dir():
        arch, state_dict = load_diffusers_transformer(path, lcm_without_null_caption=True)
        model = build_pixart(arch)
    else:
        model = _model_for_file(path, config, image_size)
        checkpoint = read_checkpoint(path)  # read once: released XL files are 2.4 GB
        from diffusion.train.lora import holds_adapter
        if holds_adapter(checkpoint):
            raise CheckpointError(f"{path} is a LoRA training checkpoint: it holds an adapter, not a model; give the "
                                  "base model as the model path and this checkpoint as a LoRA adapter (--lora)")
        state_dict = state_dict_of(checkpoint, path, use_ema=use_ema and "state_dict_ema" in checkpoint)
        copies = controlnet_copy_count(state_dict)
        if copies:
            model = build_controlnet(model, copy_blocks_num=copies)
        if NULL_CAPTION_KEY not in state_dict and "base_model." + NULL_CAPTION_KEY not in state_dict:
            raise CheckpointError(
                f"{path} has no null caption ({NULL_CAPTION_KEY}), which guidance needs; diffusers files carry none: "
                f"put its {NULL_CAPTION_FILE} beside it, or convert it with tools/convert_pixart_to_diffusers.py "
                "--reverse (--null-caption-from or --random-null-caption)")
    if copies:
        model.load_weights(state_dict, source=str(path))
    else:
        load_state_dict_into(model, state_dict, source=str(path))
    return model.eval().requires_grad_(False)


def is_distilled(model_path, loras=()):
    """Whether a model samples best with the `lcm` sampler (4 steps, no guidance): a distilled LCM pipeline folder
    (PixArt-LCM-XL-2-1024-MS), an LCM training checkpoint, or an LCM-LoRA training checkpoint among `loras` (paths).
    A peft adapter folder does not say what it was trained for: choose the sampler yourself for PixArt-LCM-LoRA."""
    from diffusion.train.lcm import is_distilled_checkpoint
    from diffusion.utils.diffusers_interop import is_lcm_pipeline
    path = Path(model_path)
    if path.is_dir():
        return is_lcm_pipeline(path)
    return any(is_distilled_checkpoint(p) for p in [path, *map(Path, loras)] if p.is_file())


def pair_lora_scales(paths, scales):
    """(path, scale) per adapter path (--lora / --lora_scale): one scale per path in the same order, or none (1)."""
    if scales and len(scales) != len(paths):
        raise ValueError(f"{len(scales)} --lora_scale for {len(paths)} --lora: give one scale per adapter, in the "
                         "same order, or none (scale 1)")
    return list(zip(paths, scales or [1.0] * len(paths)))


def load_loras(model, loras, merge=False):
    """Add LoRA adapters to a transformer and return {adapter name: path}. `loras`: (path, scale) pairs, a path
    being a peft adapter folder (diffusers' module names: ours, PixArt-LCM-LoRA, ...) or a LoRA training checkpoint
    (its EMA adapter). All act together, each at its scale; `merge` folds them into the weights (as fast as no
    adapter; they can then no longer be switched, and {} is returned). On a ControlNet the adapters go into its
    `base_model`, the PixArt they were trained on; the ControlNet copies keep their own weights (as a diffusers
    ControlNet beside a LoRA'd transformer)."""
    from diffusion.model.lora import add_adapter, merge_adapters, use_adapters
    from diffusion.train.lora import adapter_from_checkpoint
    from diffusion.utils.lora_interop import load_adapter
    model = model.base_model if isinstance(model, ControlPixArtHalf) else model
    names, scales = {}, {}
    for path, scale in loras:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"LoRA adapter {path}: no such folder or checkpoint")
        if not math.isfinite(scale):
            raise ValueError(f"LoRA scale of {path} is {scale}; expected a finite number")
        name = f"lora{len(names)}"  # peft names adapters by module-dict keys: no dots, so not the path
        if path.is_dir():
            load_adapter(model, path, name)
        else:
            weights, spec = adapter_from_checkpoint(path)
            add_adapter(model, spec, name, weights, source=str(path))
        names[name], scales[name] = str(path), float(scale)
    if names:
        use_adapters(model, scales)
        if merge:
            merge_adapters(model)
            return {}
    return names


class Pipeline:
    """Text to image with a loaded transformer, VAE and (until freed) T5 encoder: `sample(features, ...)`.
    `adapters`: name -> path of the LoRA adapters the transformer holds unmerged (`use_adapters` switches them)."""

    def __init__(self, model, vae, text_encoder=None, scale_factor=SD_VAE_SCALE_FACTOR, device="cpu",
                 dtype=torch.float32, adapters=None):
        self.model = model.to(device=device, dtype=dtype)
        self.adapters = dict(adapters or {})
        self.vae = vae.to(device).eval()
        self.text_encoder = text_encoder
        self.scale_factor = scale_factor
        self.device = torch.device(device)
        self.dtype = dtype
        self.image_size = model.input_size * VAE_DOWNSAMPLE
        self.multi_scale = is_multi_scale(model)

    def to(self, device):
        """Move the transformer and the VAE (not T5) to `device`: load on the CPU, encode the prompts, free T5,
        then move, and T5 and the transformer never share the GPU."""
        self.model.to(device)
        self.vae.to(device)
        self.device = torch.device(device)
        return self

    def encode(self, prompts):
        """T5 features and masks of prompts, moved to the model's device."""
        if self.text_encoder is None:
            raise ValueError("this Pipeline has no text encoder (it was freed); pass caption features instead")
        features, mask = self.text_encoder.get_text_embeddings(list(prompts))
        return features.to(self.device, self.dtype), mask.to(self.device)

    def use_adapters(self, scales):
        """Sample with exactly the adapters in `scales` (name -> scale; {} for the plain model) from now on."""
        from diffusion.model.lora import use_adapters
        use_adapters(self.model, scales)

    def free_text_encoder(self):
        """Drop T5 (4.3B parameters for XL) once every prompt is encoded, before sampling."""
        self.text_encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def sample(self, features, mask, height, width, seeds, sampler="dpm-solver", steps=None, cfg_scale=4.5,
               negative=None, cfg_compat="fixed", progress=None, extra_inputs=None):
        """Images (B, 3, H, W) in [0, 1] for caption features (B, L, C) of one size.

        negative: optional (features (1|B, L, C), mask (1|B, L)) used as the unconditional caption instead of
        the null caption; cfg_compat="official": the reference's `forward_with_cfg` guidance for IDDPM (SPEC
        section 9); progress: callable(step, total) or None; extra_inputs: further model inputs by name, given
        to both halves of a guided batch: tensors of batch B (one per image) or 1 (shared by every image, e.g.
        one ControlNet control latent `c` for all prompts), other values as they are (`conditioning_scale`)."""
        spec = get_sampler(sampler)
        steps = spec.default_steps if steps is None else int(steps)
        check_steps(sampler, steps)
        B = features.shape[0]
        latent_hw = (height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE)
        noise = torch.stack([torch.randn(self.model.in_channels, *latent_hw,
                                         generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        noise = noise.to(self.device, self.dtype)
        data_info = {"img_hw": torch.tensor([[float(height), float(width)]] * B, device=self.device),
                     "aspect_ratio": torch.tensor([[height / width]] * B, device=self.device)}
        cond = dict(y=features, mask=mask.to(self.device), data_info=data_info,
                    **per_image_inputs(extra_inputs or {}, B, self.device))
        scale = cfg_scale if spec.guided else 1.0
        # The released scripts guide only IDDPM through forward_with_cfg, so only there is the compat mode theirs.
        guided_channels, keep_mask = self.model.cfg_compat_options(cfg_compat if sampler == "iddpm" else "fixed")
        inputs = dict(cond)
        if scale != 1.0:
            if negative is not None:
                uncond_y, uncond_mask = (t.expand(B, *t.shape[1:]).to(self.device) for t in negative)
            else:
                null = self.model.y_embedder.y_embedding
                if not bool(null.any()):
                    raise ValueError(f"{sampler} guided at {cfg_scale:g} needs a null caption, and this model has none "
                                     "(a distilled LCM pipeline folder): sample it with the lcm sampler, with guidance "
                                     "1, or with a negative prompt")
                uncond_y, uncond_mask = null[None].expand(B, -1, -1), cond["mask"]
            inputs = cfg_inputs(cond, dict(cond, y=uncond_y.to(self.dtype), mask=uncond_mask), B)
        # The caption projection and every block's keys and values, once for all steps.
        captions = self.model.encode_captions(inputs.pop("y"), inputs.pop("mask") if keep_mask else None)
        inputs.pop("mask", None)
        model_fn = guided_model(self.model, dict(inputs, y=captions), scale, guided_channels)
        model_fn = _StepCounter(progress, steps).wrap(model_fn)
        latents = spec.fn(model_fn, noise, steps, generator=[int(s) for s in seeds])
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scale_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)


def per_image_inputs(inputs, batch_size, device):
    """Extra model inputs with every tensor on `device` at the batch `batch_size`: a tensor of batch 1 is shared by
    every image (expanded); any other batch is an error naming the input. Non-tensors pass unchanged."""
    out = {}
    for name, value in inputs.items():
        if torch.is_tensor(value):
            if value.ndim == 0 or value.shape[0] not in (1, batch_size):
                raise ValueError(f"extra input {name!r} is {tuple(value.shape)}; expected batch {batch_size} (one per "
                                 "image) or 1 (shared by every image)")
            value = value.to(device).expand(batch_size, *value.shape[1:])
        out[name] = value
    return out


class _StepCounter:
    """Counts model evaluations to report sampler progress (one guided evaluation per step for most samplers)."""

    def __init__(self, progress, total):
        self.progress, self.total, self.calls = progress, total, 0

    def wrap(self, fn):
        if self.progress is None:
            return fn

        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls += 1
            self.progress(min(self.calls, self.total), self.total)
            return out
        return counted


def check_steps(sampler, steps):
    """Raise ValueError when `sampler` (a name or a SamplerSpec) cannot take `steps` sampling steps (see
    MIN_STEPS)."""
    fewest = get_sampler(sampler).min_steps
    if steps < fewest:
        raise ValueError(f"{sampler} takes at least {fewest} steps, got {steps}")


def check_prompt_length(tokenizer, prompt, what="the prompt"):
    """Raise PromptError when `prompt` needs more tokens than the model reads, which T5 would cut silently.

    `tokenizer`: a T5Embedder, or a CaptionTokenizer (the tokenizer alone: prompts are checked before any
    model loads); the limit is its `model_max_length`, the model's caption length (120 for the released models).
    `what` names the prompt in the message (e.g. '--prompt 2', 'prompts.txt:7', 'the negative prompt')."""
    count, limit = tokenizer.token_count(prompt), tokenizer.model_max_length
    if count > limit:
        shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
        raise PromptError(f"{what} ({shown!r}) has {count} tokens; the model reads at most {limit}: shorten it "
                          "(the rest would be cut without notice)")


def t5_folder(t5_path=None, config=None, model_path=None):
    """The T5 folder `load_pipeline` reads: `t5_path`, else the diffusers pipeline folder `model_path` when it holds
    a text encoder and tokenizer, else the config's `t5_pretrained`, else the released one (fetched when missing)."""
    if t5_path is None and pipeline_part(model_path, "text_encoder") and pipeline_part(model_path, "tokenizer"):
        return Path(model_path)
    path = t5_path or (config.t5_pretrained if config is not None else RELEASED_T5_DIR)
    return resolve_t5_dir(fetch_conventional(path))


def load_tokenizer(t5_path, config, model, model_path=None):
    """The CaptionTokenizer of the T5 `load_pipeline` would use with `model` (a described or loaded model, read from
    `model_path`): checks prompts' lengths without loading any weights."""
    return CaptionTokenizer(t5_folder(t5_path, config, model_path), model_max_length=model.model_max_length)


def vae_folder(vae_path=None, config=None, model_path=None):
    """The VAE folder `load_pipeline` reads: `vae_path`, else the `vae/` of the diffusers pipeline folder
    `model_path`, else the config's `vae_pretrained`, else the released one."""
    return vae_path or pipeline_part(model_path, "vae") or (config.vae_pretrained if config is not None
                                                           else RELEASED_VAE_DIR)


def load_vae(path, device="cpu", dtype=None):
    """A diffusers AutoencoderKL in eval mode from a local folder such as sd-vae-ft-ema, or the `vae/` of a diffusers
    pipeline folder (in `dtype`, default the saved one). The released folder is fetched when it is missing from its
    conventional place."""
    from diffusers import AutoencoderKL
    path = pipeline_part(path, "vae") or Path(fetch_conventional(path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {path} has no config.json: expected a diffusers AutoencoderKL folder "
                                "such as sd-vae-ft-ema")
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def load_pipeline(model_path, config=None, image_size=None, t5_path=None, vae_path=None, device="cpu",
                  dtype=torch.float32, t5_device=None, use_ema=True, loras=(), merge_loras=False):
    """A Pipeline holding all a prompt needs: the transformer at `model_path` (read as `load_transformer` reads
    it, described by the folder, `config` or a released `image_size`), its VAE and its T5 encoder as
    `pipe.text_encoder` (`pipe.free_text_encoder()` drops T5 once the prompts are encoded). `model_path` may be a
    named model (diffusion.model_zoo: downloaded when missing, its image size known).

    The encoder folders are `t5_path` and `vae_path`, else those of a diffusers pipeline folder `model_path`
    (text_encoder/ + tokenizer/, vae/), else the config's `t5_pretrained` and `vae_pretrained`, else the released
    layout's (RELEASED_T5_DIR, RELEASED_VAE_DIR; downloaded when missing); a T5 path may be the folder holding
    t5-v1_1-xxl/. The latent scale factor is the config's `scale_factor`, else the `scaling_factor` of a pipeline
    folder's VAE, else sd-vae-ft-ema's. T5 reads as many tokens as the transformer's null caption has, on
    `t5_device` (default `device`; 'cpu' leaves the GPU to the transformer). The transformer runs in `dtype` on
    `device`. `loras`, `merge_loras`: LoRA adapters added in fp32 before the transformer moves (`load_loras`)."""
    model_path, image_size = resolve_model_argument(model_path, image_size)
    model = load_transformer(model_path, config=config, image_size=image_size, use_ema=use_ema)
    adapters = load_loras(model, loras, merge=merge_loras)
    t5_dir = t5_folder(t5_path, config, model_path)
    vae_dir = vae_folder(vae_path, config, model_path)
    text_encoder = T5Embedder(t5_dir, device=t5_device or device, model_max_length=model.model_max_length)
    if text_encoder.hidden_size != model.caption_channels:
        raise ValueError(f"T5 folder {t5_dir} gives {text_encoder.hidden_size}-wide caption features; the model "
                         f"{model_path} reads caption_channels={model.caption_channels}")
    vae = load_vae(vae_dir, device)
    if config is not None:
        scale_factor = config.scale_factor
    elif vae_path is None and pipeline_part(model_path, "vae"):
        scale_factor = vae.config.scaling_factor  # what diffusers' PixArtAlphaPipeline decodes that folder with
    else:
        scale_factor = SD_VAE_SCALE_FACTOR
    return Pipeline(model, vae, text_encoder=text_encoder, scale_factor=scale_factor, device=device, dtype=dtype,
                    adapters=adapters)


__all__ = ["SAMPLERS", "DEFAULT_STEPS", "MIN_STEPS", "PromptError", "PromptJob", "parse_prompt", "resolve_t5_dir",
           "describe_transformer", "load_transformer", "is_distilled", "pair_lora_scales", "load_loras", "Pipeline",
           "check_steps", "check_prompt_length", "t5_folder", "load_tokenizer", "vae_folder", "load_vae",
           "load_pipeline", "CheckpointError"]
