"""The samplers as small functions over one model interface, in a registry by name.

Every sampler is `sample_x(model_fn, noise, steps, generator=None, progress=False) -> latents`, where
`model_fn(x, timestep) -> output` takes latents (B, C, H, W) and the model's discrete timesteps (B,) and
returns (B, C or 2C, H, W): eps, then the variance values when the model learned them. Guidance, captions,
micro-conditions and any extra model input are bound into `model_fn` beforehand (`guided_model`), so no
sampler knows about them. `generator`: a seed, a generator, or one per sample (each sample's draws then
come from its own generator). The official entry points (`DPMS`, `SASolverSampler`, `IDDPM`, `LCMScheduler`)
run the same solvers.
"""
from dataclasses import dataclass
from typing import Callable

from .iddpm import IDDPM
from .lcm_scheduler import LCMScheduler
from .model.dpm_solver import DPMSolver, NoiseScheduleVP, continuous_time_model
from .model.gaussian_diffusion import get_named_beta_schedule
from .model.sa_solver import SASolver


@dataclass(frozen=True)
class SamplerSpec:
    fn: Callable
    default_steps: int
    guided: bool  # False: the model is distilled to need no guidance (LCM); a guidance scale is not used
    min_steps: int = 1  # the order-2 multistep solvers need two


SAMPLERS = {}


def register(name, default_steps, guided=True, min_steps=1):
    def add(fn):
        if name in SAMPLERS:
            raise KeyError(f"sampler {name!r} is registered twice")
        SAMPLERS[name] = SamplerSpec(fn, default_steps, guided, min_steps)
        return fn
    return add


def get_sampler(name):
    """The SamplerSpec registered as `name` (a SamplerSpec, e.g. `diffusers_scheduler_sampler`'s, is itself)."""
    if isinstance(name, SamplerSpec):
        return name
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def linear_schedule(num_timesteps=1000):
    """The continuous-time view of PixArt's linear beta schedule (1e-4 to 0.02 over 1000 steps)."""
    return NoiseScheduleVP(betas=get_named_beta_schedule("linear", num_timesteps))


@register("dpm-solver", default_steps=20, min_steps=2)
def sample_dpm_solver(model_fn, noise, steps, generator=None, progress=False, order=2):
    """DPM-Solver++ multistep of `order` on a time-uniform grid, as the released scripts; deterministic."""
    schedule = linear_schedule()
    solver = DPMSolver(continuous_time_model(model_fn, schedule), schedule, algorithm_type="dpmsolver++")
    return solver.sample(noise, steps=steps, order=order, skip_type="time_uniform", method="multistep",
                         progress=progress)


@register("sa-solver", default_steps=25, min_steps=2)
def sample_sa_solver(model_fn, noise, steps, generator=None, progress=False, eta=1.0, predictor_order=2,
                     corrector_order=2, schedule=None):
    """SA-Solver with the released settings: predictor and corrector of order 2, PEC, a time-uniform grid and
    stochasticity tau(t) = eta on 0.2 <= t <= 0.8 (the official scripts pass eta = 1)."""
    schedule = schedule or linear_schedule()

    def tau(t):
        return eta if 0.2 <= t <= 0.8 else 0.0

    return SASolver(continuous_time_model(model_fn, schedule), schedule).sample(
        noise, steps=steps, tau=tau, predictor_order=predictor_order, corrector_order=corrector_order, skip_type="time", pc_mode="PEC",
        generator=generator, progress=progress)


@register("iddpm", default_steps=100)
def sample_iddpm(model_fn, noise, steps, generator=None, progress=False):
    """Ancestral sampling with the learned variance on `steps` respaced timesteps, unclipped."""
    return IDDPM(str(steps)).p_sample_loop(model_fn, tuple(noise.shape), noise, clip_denoised=False,
                                          device=noise.device, progress=progress, generator=generator)


@register("lcm", default_steps=4, guided=False)
def sample_lcm(model_fn, noise, steps, generator=None, progress=False):
    """Latent-consistency multi-step sampling (PixArt-LCM: guidance distilled into the model)."""
    return LCMScheduler().sample(model_fn, noise, steps, generator=generator, progress=progress)


def diffusers_scheduler_sampler(scheduler, default_steps=20):
    """A SamplerSpec (give it where a sampler name goes) that integrates with a diffusers scheduler, step for step as
    diffusers' PixArtAlphaPipeline does: `scheduler.set_timesteps(steps)`, the noise times `init_noise_sigma`, then
    for every timestep `scale_model_input`, the (guided) model at that integer timestep, its eps half (the learned
    variance dropped) and `scheduler.step`. With the scheduler of an exported pipeline folder
    (`DPMSolverMultistepScheduler.from_pretrained(folder / 'scheduler')`) ours and diffusers' pipeline give the
    same image. A scheduler that draws noise (DDPM, SDE variants) draws it from per-image generators of the
    images' seeds, not from diffusers' generator stream."""
    import inspect

    import torch

    takes_generator = "generator" in inspect.signature(scheduler.step).parameters

    def sample(model_fn, noise, steps, generator=None, progress=False):
        scheduler.set_timesteps(steps, device=noise.device)
        x = noise * scheduler.init_noise_sigma
        extra = {}
        if takes_generator and generator is not None:
            seeds = generator if isinstance(generator, (list, tuple)) else [generator] * len(noise)
            extra["generator"] = [torch.Generator(noise.device).manual_seed(int(s)) for s in seeds]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        for t in scheduler.timesteps:
            out = model_fn(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
            x = scheduler.step(out[:, :noise.shape[1]], t, x, return_dict=False, **extra)[0]
        return x

    return SamplerSpec(sample, default_steps, guided=True)
