"""Multi-step sampling for latent consistency models (LCM, Luo et al. 2023) distilled from PixArt."""
from typing import List, NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from .model.consistency import boundary_scalings, ddim_timesteps
from .model.diffusion_utils import make_generator, randn


class LCMStepOutput(NamedTuple):
    """The next sample (re-noised to the next timestep) and this step's denoised estimate."""
    prev_sample: torch.Tensor
    denoised: torch.Tensor


def lcm_timesteps(num_inference_steps: int, original_inference_steps: int = 50,
                  num_train_timesteps: int = 1000) -> List[int]:
    """Every k-th timestep, from the top, of the DDIM grid the model was distilled on.

    For 4 of 50 steps: 999, 759, 519, 279. (Newer diffusers spreads the indices over the whole grid
    instead, 999, 759, 499, 259; the released PixArt-LCM sampler uses the spacing here.)
    """
    if not 1 <= num_inference_steps <= original_inference_steps <= num_train_timesteps:
        raise ValueError(f"need 1 <= num_inference_steps ({num_inference_steps}) <= original_inference_steps "
                         f"({original_inference_steps}) <= num_train_timesteps ({num_train_timesteps})")
    grid = ddim_timesteps(original_inference_steps, num_train_timesteps).tolist()  # the distillation's grid
    skip = original_inference_steps // num_inference_steps
    return grid[::-1][::skip][:num_inference_steps]


class LCMScheduler:
    """LCM multi-step sampling: at each timestep the model's eps gives x0, the consistency boundary
    condition mixes it with the input (c_skip x + c_out x0), and all but the last estimate are
    re-noised to the next timestep. The released PixArt-LCM uses linear betas 1e-4 to 0.02 and no guidance.
    """

    def __init__(self, num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 original_inference_steps=50, timestep_scaling=10.0, prediction_type="epsilon"):
        if beta_schedule != "linear":
            raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; PixArt-LCM uses 'linear'")
        if prediction_type != "epsilon":
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; PixArt predicts 'epsilon'")
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_train_timesteps = num_train_timesteps
        self.original_inference_steps = original_inference_steps
        self.timestep_scaling = timestep_scaling
        self.timesteps = None

    def set_timesteps(self, num_inference_steps: int, lcm_origin_steps: Optional[int] = None):
        """Choose the sampling timesteps (see `lcm_timesteps`); they are stored in `self.timesteps`."""
        origin = self.original_inference_steps if lcm_origin_steps is None else lcm_origin_steps
        self.timesteps = torch.tensor(lcm_timesteps(num_inference_steps, origin, self.num_train_timesteps))

    def boundary_scalings(self, timestep: int):
        """(c_skip, c_out) of the consistency parameterisation, with sigma_data = 0.5 (the distillation's)."""
        return boundary_scalings(timestep, timestep_scaling=self.timestep_scaling)

    def step(self, model_output, timeindex: int, timestep: int, sample, generator=None, return_dict=True):
        """Step `timeindex` (at `timestep`) of the timesteps set by `set_timesteps`.

        Returns `LCMStepOutput(prev_sample, denoised)`, or a plain tuple with return_dict=False; after the
        last step prev_sample is the denoised estimate itself.
        """
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps before step")
        timestep = int(timestep)
        abar = float(self.alphas_cumprod[timestep])
        x0 = (sample - (1 - abar) ** 0.5 * model_output) / abar ** 0.5
        c_skip, c_out = self.boundary_scalings(timestep)
        denoised = c_out * x0 + c_skip * sample
        if timeindex + 1 < len(self.timesteps):
            abar_next = float(self.alphas_cumprod[int(self.timesteps[timeindex + 1])])
            noise = randn(sample.shape, generator, sample.device, sample.dtype)
            prev_sample = abar_next ** 0.5 * denoised + (1 - abar_next) ** 0.5 * noise
        else:
            prev_sample = denoised
        return LCMStepOutput(prev_sample, denoised) if return_dict else (prev_sample, denoised)

    def sample(self, model_fn, latents: torch.Tensor, num_inference_steps: int = 4, model_kwargs=None,
               generator=None, progress=True) -> torch.Tensor:
        """Run `model_fn(x, timestep, **model_kwargs)` from `latents` in `num_inference_steps` steps.

        Only the first C output channels (eps) are used, so a learned-sigma model's raw forward works.
        `generator`: seed, generator or one per sample, for the re-noising.
        """
        self.set_timesteps(num_inference_steps)
        generator = make_generator(generator)
        x = latents
        with torch.no_grad():
            for i, t in enumerate(tqdm(self.timesteps.tolist(), disable=not progress, leave=False)):
                timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
                eps = model_fn(x, timestep, **(model_kwargs or {}))[:, :x.shape[1]]
                x = self.step(eps, i, t, x, generator).prev_sample
        return x
