"""VAE posterior features: what the extractor stores and how a training step turns them into latents.

A feature is the posterior's mean and standard deviation concatenated on the channel axis, unscaled: (8, h, w)
for a 4-channel VAE (SPEC section 7). The latent is (mean + std * noise) * scale_factor (SPEC section 5).
"""
import torch


def posterior_feature(vae, images):
    """Encode images (B, 3, H, W) in [-1, 1] with a diffusers AutoencoderKL: (B, 2C, H/8, W/8) mean and std."""
    with torch.no_grad():
        posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1)


def sample_latent(vae_feature, scale_factor, generator=None, noise=None, sample_posterior=True):
    """Latents from stored features (..., 2C, h, w): (mean + std * noise) * scale_factor. The noise is `noise`
    when given (a tensor of the latent's shape), else drawn from `generator` on the feature's device, so a
    resumed run can draw the same noise. With `sample_posterior=False` the mean alone, scaled."""
    if vae_feature.ndim < 3 or vae_feature.shape[-3] % 2:
        raise ValueError(f'expected VAE features (..., 2C, h, w) holding mean then std, '
                         f'got shape {tuple(vae_feature.shape)}')
    mean, std = vae_feature.float().chunk(2, dim=-3)
    if not sample_posterior:
        return mean * scale_factor
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    elif noise.shape != mean.shape:
        raise ValueError(f'noise has shape {tuple(noise.shape)}, the latents {tuple(mean.shape)}')
    return (mean + std * noise.to(mean)) * scale_factor
