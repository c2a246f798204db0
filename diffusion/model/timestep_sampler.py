"""How training picks the diffusion step of each sample."""
import torch


def sample_timesteps(batch_size: int, num_timesteps: int, device=None, generator=None) -> torch.Tensor:
    """Step indices drawn uniformly from [0, num_timesteps), as a long tensor of shape (batch_size,).

    Pass a generator seeded per rank so that ranks do not draw the same steps (the reference seeds every
    rank alike). A CPU generator is used on the CPU and the result moved to `device`.
    """
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=draw_device)
    return t.to(device)
