"""`DPMS`: DPM-Solver++ sampling of a PixArt model with classifier-free guidance (SPEC section 6)."""
from .model.dpm_solver import DPMSolver, NoiseScheduleVP, model_wrapper
from .model.gaussian_diffusion import get_named_beta_schedule


def DPMS(model, condition, uncondition, cfg_scale, model_kwargs=None, noise_schedule="linear",
         diffusion_steps=1000, algorithm_type="dpmsolver++"):
    """A `DPMSolver` for `model(x, timestep, y, **model_kwargs) -> eps` (PixArt: `forward_with_dpmsolver`).

    condition: caption features (B, 1, L, C); uncondition: the null caption (`y_embedding`, given once or
    per sample); cfg_scale: guidance scale s, eps = eps_uncond + s (eps_cond - eps_uncond) on all
    channels; model_kwargs: e.g. `mask` (the prompt's mask, used for both halves) and `data_info`.
    Usage: `DPMS(model.forward_with_dpmsolver, y, null_y, 4.5, dict(mask=mask)).sample(z, steps=20)`;
    `sample` defaults to 2nd-order multistep on a time-uniform grid, deterministic given z.
    """
    schedule = NoiseScheduleVP(betas=get_named_beta_schedule(noise_schedule, diffusion_steps))
    model_fn = model_wrapper(model, schedule, condition=condition, uncondition=uncondition,
                             guidance_scale=cfg_scale, model_kwargs=model_kwargs)
    return DPMSolver(model_fn, schedule, algorithm_type=algorithm_type)
