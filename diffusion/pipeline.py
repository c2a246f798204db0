"""Text-to-image sampling with a PixArt model: load the parts, parse prompts, sample, decode.

Used by scripts/inference.py (batch CLI), scripts/interface.py (Gradio), the quickstart and the training
validation grids, so every entry point samples the same way:
- each image's starting noise comes from its own seed, so an image does not depend on the batch it is in;
- guidance uses the null caption `y_embedding` with the prompt's mask, or a negative prompt with its own;
- prompts may end in `--ar h:w`, `--aspect_ratio h:w` (nearest bucket) or `--hw H:W` (pixels), as in the
  paper's demo.
"""
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion import DPMS, IDDPM, SASolverSampler
from diffusion.data.aspect_ratios import aspect_ratio_table, closest_bucket
from diffusion.lcm_scheduler import LCMScheduler
from diffusion.model.builder import VAE_DOWNSAMPLE, build_model, build_model_from_config
from diffusion.model.nets import PixArtMS
from diffusion.utils.checkpoint import CheckpointError, load_state_dict_into, read_checkpoint, state_dict_of

SAMPLERS = ("dpm-solver", "sa-solver", "iddpm", "lcm")
DEFAULT_STEPS = {"dpm-solver": 20, "sa-solver": 25, "iddpm": 100, "lcm": 4}
RELEASED_LEWEI_SCALE = {256: 1.0, 512: 1.0, 1024: 2.0}
_SIZE_FLAG = re.compile(r"\s--(ar|aspect_ratio|hw)\s+(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)\s*$")
_ANY_SIZE_FLAG = re.compile(r"\s--(ar|aspect_ratio|hw)\b")


class PromptError(ValueError):
    """A prompt that cannot be sampled (empty, malformed size flag, a size the model cannot take)."""


@dataclass
class PromptJob:
    prompt: str        # the prompt without its size flag
    height: int        # pixels
    width: int
    seed: int


def parse_prompt(text, model_image_size, multi_scale):
    """(prompt, height, width) from a prompt that may end in `--ar h:w`, `--aspect_ratio h:w` or `--hw H:W`.

    Multi-scale models snap ratios to the nearest bucket of the `ASPECT_RATIO_<size>_TEST` table; `--hw`
    sizes must be multiples of 16 (VAE factor x patch). Single-scale models only take their own size."""
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
        else:
            table = aspect_ratio_table(f"ASPECT_RATIO_{model_image_size}_TEST")
            _, bucket = closest_bucket(a, b, table)
            size = tuple(int(v) for v in bucket)
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


def load_transformer(model_path, config=None, image_size=None, use_ema=True):
    """A PixArt/PixArtMS in eval mode with weights from `model_path`: one of our checkpoints (EMA weights when
    it has them and `use_ema`), a released `.pth`, a `.safetensors` file, or a diffusers transformer folder.
    The architecture comes from the folder, or from `config` (a loaded config), or from `image_size` (the
    released XL/2 models: MS at 1024)."""
    path = Path(model_path)
    if path.is_dir():
        from diffusion.utils.diffusers_interop import build_pixart, load_diffusers_transformer
        arch, state_dict = load_diffusers_transformer(path)
        model = build_pixart(arch)
    else:
        if config is not None:
            model = build_model_from_config(config, grad_checkpointing=False)
        elif image_size is not None:
            if image_size not in RELEASED_LEWEI_SCALE:
                raise ValueError(f"image_size {image_size} is not a released model (256, 512, 1024); give --config")
            name = "PixArtMS_XL_2" if image_size == 1024 else "PixArt_XL_2"
            model = build_model(name, input_size=image_size // VAE_DOWNSAMPLE,
                                lewei_scale=RELEASED_LEWEI_SCALE[image_size])
        else:
            raise ValueError("give a config or an image size to describe the model of a checkpoint file")
        checkpoint = read_checkpoint(path)  # read once: released XL files are 2.4 GB
        state_dict = state_dict_of(checkpoint, path, use_ema=use_ema and "state_dict_ema" in checkpoint)
    load_state_dict_into(model, state_dict, source=str(path))
    return model.eval().requires_grad_(False)


class Sampler:
    """Samples images from prompts with a loaded transformer, T5 encoder and VAE."""

    def __init__(self, model, vae, text_encoder=None, scale_factor=0.18215, device="cpu", dtype=torch.float32):
        self.model = model.to(device=device, dtype=dtype)
        self.vae = vae.to(device).eval()
        self.text_encoder = text_encoder
        self.scale_factor = scale_factor
        self.device = torch.device(device)
        self.dtype = dtype
        self.image_size = model.input_size * VAE_DOWNSAMPLE
        self.multi_scale = isinstance(model, PixArtMS)

    def encode(self, prompts):
        """T5 features and masks of prompts, moved to the model's device."""
        if self.text_encoder is None:
            raise ValueError("this Sampler has no text encoder (it was freed); pass caption features instead")
        features, mask = self.text_encoder.get_text_embeddings(list(prompts))
        return features.to(self.device, self.dtype), mask.to(self.device)

    def free_text_encoder(self):
        """Drop T5 (4.3B parameters for XL) once every prompt is encoded, before sampling."""
        self.text_encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def sample(self, features, mask, height, width, seeds, sampler="dpm-solver", steps=None, cfg_scale=4.5,
               negative=None, cfg_compat="fixed", progress=None):
        """Images (B, 3, H, W) in [0, 1] for caption features (B, L, C) of one size.

        negative: optional (features (1|B, L, C), mask (1|B, L)) used as the unconditional caption instead of
        the null caption; progress: callable(step, total) or None."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        steps = steps or DEFAULT_STEPS[sampler]
        B = features.shape[0]
        latent_hw = (height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE)
        channels = self.model.in_channels
        noise = torch.stack([torch.randn(channels, *latent_hw, generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds]).to(self.device, self.dtype)
        data_info = {"img_hw": torch.tensor([[float(height), float(width)]] * B, device=self.device),
                     "aspect_ratio": torch.tensor([[height / width]] * B, device=self.device)}
        if negative is not None:
            uncond, uncond_mask = (t.expand(B, *t.shape[1:]) for t in negative)
            uncond = uncond.to(self.device, self.dtype)
        else:
            uncond = self.model.y_embedder.y_embedding[None].expand(B, -1, -1).to(self.dtype)
            uncond_mask = mask
        # guided solvers run one [uncond; cond] batch; at scale 1 they run the prompts alone, with their masks
        guided_mask = torch.cat([uncond_mask.to(self.device), mask]) if cfg_scale != 1.0 else mask
        model_kwargs = dict(data_info=data_info, mask=guided_mask)
        # Every step reuses the caption projection and the blocks' keys and values.
        with self.model.caption_cache():
            callback = _StepCounter(progress, steps)
            if sampler == "dpm-solver":
                solver = DPMS(callback.wrap(self.model.forward_with_dpmsolver), features, uncond, cfg_scale,
                              model_kwargs)
                latents = solver.sample(noise, steps=steps, order=2, skip_type="time_uniform", method="multistep",
                                        progress=False)
            elif sampler == "sa-solver":
                solver = SASolverSampler(callback.wrap(self.model.forward_with_dpmsolver), device=self.device)
                latents = solver.sample(steps, B, noise.shape[1:], conditioning=features,
                                        unconditional_conditioning=uncond, unconditional_guidance_scale=cfg_scale,
                                        eta=1.0,  # the official scripts' value; the facade's default is 0
                                        model_kwargs=model_kwargs, x_T=noise, generator=[int(s) for s in seeds],
                                        progress=False)[0]
            elif sampler == "iddpm":
                diffusion = IDDPM(str(steps))
                # forward_with_cfg takes [cond; uncond] captions and masks
                kwargs = dict(y=torch.cat([features, uncond]), cfg_scale=cfg_scale, cfg_compat=cfg_compat,
                              data_info={k: torch.cat([v, v]) for k, v in data_info.items()},
                              mask=torch.cat([mask, uncond_mask.to(self.device)]))
                latents = diffusion.p_sample_loop(
                    callback.wrap(self.model.forward_with_cfg), (2 * B, *noise.shape[1:]), torch.cat([noise, noise]),
                    clip_denoised=False, model_kwargs=kwargs, device=self.device, progress=False,
                    generator=[int(s) for s in seeds] * 2)[:B]
            else:
                scheduler = LCMScheduler()
                model_fn = callback.wrap(self.model)
                latents = scheduler.sample(model_fn, noise, steps,
                                           dict(y=features, mask=mask, data_info=data_info),
                                           generator=[int(s) for s in seeds], progress=False)
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scale_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)


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


def check_prompt_length(text_encoder, prompt):
    """Raise PromptError when a prompt has more tokens than the model reads (it would be cut silently)."""
    ids = text_encoder.tokenizer(prompt, add_special_tokens=True, truncation=False)["input_ids"]
    if len(ids) > text_encoder.model_max_length:
        raise PromptError(f"the prompt has {len(ids)} tokens; the model reads at most {text_encoder.model_max_length}")


def load_vae(path, device="cpu"):
    from diffusers import AutoencoderKL
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {path} has no config.json: expected a diffusers AutoencoderKL folder "
                                "such as sd-vae-ft-ema")
    return AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)


__all__ = ["SAMPLERS", "DEFAULT_STEPS", "PromptError", "PromptJob", "parse_prompt", "resolve_t5_dir",
           "load_transformer", "Sampler", "check_prompt_length", "load_vae", "CheckpointError"]
