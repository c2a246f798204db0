"""PixArt-alpha: Diffusion Transformers for text-to-image synthesis (models, diffusion, data, utilities)."""
from .dpm_solver import DPMS
from .iddpm import IDDPM
from .sa_sampler import SASolverSampler

__all__ = ["DPMS", "IDDPM", "SASolverSampler"]
