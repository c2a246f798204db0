"""Respacing: run a diffusion on a subset of its timesteps ("100", "ddim50", "10,10,10")."""
from typing import Iterable, Set, Union

import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Iterable[int]]) -> Set[int]:
    """The original timesteps kept by a respacing.

    "ddimN": every k-th step from 0, with the stride k that gives exactly N steps (DDIM's spacing).
    "N" or "N1,N2,...": the timesteps are cut into equal sections (earlier sections take the remainder)
    and each section keeps its count of evenly spaced steps, both ends included.
    An int or a list of ints means the same as the comma-separated string.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"timestep respacing {section_counts!r}: no integer stride gives exactly "
                             f"{wanted} of {num_timesteps} steps")
        try:
            section_counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep respacing {section_counts!r} is not 'ddimN' or comma-separated "
                             "step counts") from None
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    section_counts = list(section_counts)

    base_size, extra = divmod(num_timesteps, len(section_counts))
    kept, start = set(), 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"timestep respacing: section {i} has {size} steps, cannot keep {count}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        # Accumulate the fractional position (rather than multiply) so the kept steps are exactly the
        # ones the released models were sampled with.
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return kept


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion on the kept timesteps `use_timesteps` of the schedule `betas`.

    The betas are recomputed so that every kept step has the original abar_t; step i of the spaced
    process feeds the model its original timestep `timestep_map[i]`.
    """

    def __init__(self, use_timesteps: Iterable[int], betas, **kwargs):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        kept = sorted(set(use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= len(betas):
            raise ValueError(f"use_timesteps must lie in [0, {len(betas)}), got {kept[:3]}...{kept[-3:]}")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.original_num_steps = len(betas)
        super().__init__(1.0 - alphas_cumprod / previous, timestep_map=kept, **kwargs)
