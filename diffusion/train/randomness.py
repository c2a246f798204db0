"""Per-sample random draws for a training step, derived from (seed, epoch, record index).

Each sample's timestep, diffusion noise, latent-posterior noise and caption-dropout decision depend only on
its record and epoch, never on which rank or batch it lands in. So a run on N processes with batch b draws
exactly what one process with batch N*b draws, ranks never repeat each other's noise (the reference seeds
every rank alike), and a resumed run continues with the same draws.
"""
import hashlib
from dataclasses import dataclass

import torch


def sample_seed(seed, epoch, index):
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class StepDraws:
    timesteps: torch.Tensor        # (B,) long
    noise: torch.Tensor            # (B, C, h, w) diffusion noise
    posterior_noise: torch.Tensor  # (B, C, h, w) noise for sampling the VAE posterior
    drop: torch.Tensor             # (B,) long, 1 = replace the caption by the null caption


def draw_for_samples(indices, epoch, seed, latent_shape, num_timesteps, drop_prob, device):
    """Draw every sample's randomness on the CPU from its own generator, then move it to `device`."""
    timesteps, noise, posterior, drop = [], [], [], []
    for index in torch.as_tensor(indices).tolist():
        gen = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
        timesteps.append(torch.randint(0, num_timesteps, (), generator=gen))
        drop.append((torch.rand((), generator=gen) < drop_prob).long())
        noise.append(torch.randn(latent_shape, generator=gen))
        posterior.append(torch.randn(latent_shape, generator=gen))
    return StepDraws(torch.stack(timesteps).to(device), torch.stack(noise).to(device),
                     torch.stack(posterior).to(device), torch.stack(drop).to(device))
