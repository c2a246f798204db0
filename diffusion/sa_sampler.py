"""`SASolverSampler`: SA-Solver sampling of a PixArt model with classifier-free guidance (SPEC section 6)."""
import torch

from .model.diffusion_utils import make_generator, randn
from .model.dpm_solver import NoiseScheduleVP, guided_callable
from .model.gaussian_diffusion import get_named_beta_schedule
from .sampling import sample_sa_solver


class SASolverSampler:
    """SA-Solver with the released defaults: data prediction, a time-uniform grid, predictor and
    corrector of order 2, PEC mode, and stochasticity tau(t) = eta for 0.2 <= t <= 0.8, else 0.
    `sample`'s eta defaults to 0, as the official facade's (a deterministic ODE sampler); the official
    scripts, and our pipeline, pass eta=1.

    model: `model(x, timestep, y, **model_kwargs) -> eps` (PixArt: `forward_with_dpmsolver`).
    device: where x_T is drawn when not given (default: the conditioning's device, else the CPU).
    """

    def __init__(self, model, device=None, noise_schedule="linear", diffusion_steps=1000):
        self.model = model
        self.device = device
        self.noise_schedule = NoiseScheduleVP(betas=get_named_beta_schedule(noise_schedule, diffusion_steps))

    def sample(self, S, batch_size, shape, conditioning=None, unconditional_conditioning=None,
               unconditional_guidance_scale=1.0, eta=0.0, model_kwargs=None, x_T=None, generator=None,
               predictor_order=2, corrector_order=2, progress=True):
        """Draw `batch_size` latents of `shape` (C, H, W) in S steps; returns (samples, None).

        The second element keeps the reference's (samples, intermediates) return, so `sample(...)[0]`
        keeps working. `generator` (seed, generator or one per sample) draws x_T and the step noise.
        """
        generator = make_generator(generator)
        if x_T is None:
            device = self.device
            if device is None:
                device = conditioning.device if isinstance(conditioning, torch.Tensor) else "cpu"
            x_T = randn((batch_size, *shape), generator, device, torch.float32)
        elif tuple(x_T.shape) != (batch_size, *shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {(batch_size, *shape)}")
        model_fn = guided_callable(self.model, conditioning, unconditional_conditioning,
                                   unconditional_guidance_scale, model_kwargs)
        samples = sample_sa_solver(model_fn, x_T, S, generator, progress, eta=eta, predictor_order=predictor_order,
                                   corrector_order=corrector_order, schedule=self.noise_schedule)
        return samples, None
