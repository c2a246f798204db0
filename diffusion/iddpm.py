"""`IDDPM`: the factory for the Gaussian diffusion used to train and sample PixArt (SPEC section 5)."""
from .model.gaussian_diffusion import get_named_beta_schedule
from .model.respace import SpacedDiffusion, space_timesteps


def IDDPM(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False, predict_xstart=False,
          learn_sigma=True, pred_sigma=True, rescale_learned_sigmas=False, diffusion_steps=1000, snr=False,
          min_snr_gamma=None, exact_decoder_nll=False):
    """A `SpacedDiffusion` over `diffusion_steps` steps, respaced by `timestep_respacing` ("" or None: all).

    pred_sigma: the model outputs variance channels after eps (PixArt: 4 + 4).
    learn_sigma: use them (learned-range variance, trained by the variational bound); otherwise the
        variance is fixed to beta_t, or to the posterior variance with `sigma_small`.
    predict_xstart: the mean channels predict x0 instead of eps.
    use_kl / rescale_learned_sigmas: loss "rescaled_kl" / "rescaled_mse" instead of "mse".
    snr: the reference's `snr_loss` (x0-space MSE for timesteps <= 249).
    min_snr_gamma: min-SNR-gamma weighting of the MSE (see `GaussianDiffusion`); None: unweighted.
    exact_decoder_nll: the t = 0 term with the exact normal CDF, not the reference's tanh approximation.
    Training:  `IDDPM(str(1000)).training_losses(model, x0, t, model_kwargs)["loss"].mean()`.
    Sampling:  `IDDPM(str(100)).p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False, ...)`.
    """
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if learn_sigma and pred_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        get_named_beta_schedule(noise_schedule, diffusion_steps),
        mean_type="x0" if predict_xstart else "epsilon",
        var_type=var_type,
        loss_type=loss_type,
        pred_sigma=pred_sigma,
        snr=snr,
        min_snr_gamma=min_snr_gamma,
        exact_decoder_nll=exact_decoder_nll,
    )
