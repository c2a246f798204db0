"""Gaussian diffusion in discrete time (DDPM, Ho et al. 2020; improved DDPM, Nichol & Dhariwal 2021):
noise schedules, the forward process and its posterior, the training loss, and ancestral / DDIM sampling."""
import math

import torch
from tqdm.auto import tqdm

from .diffusion_utils import discretized_gaussian_log_likelihood, make_generator, mean_flat, normal_kl, randn

MEAN_TYPES = ("epsilon", "x0")
VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


def get_named_beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """Betas (float64) of a named schedule: "linear" (1e-4 to 0.02, scaled by 1000/T) or "squaredcos_cap_v2"."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                 for i in range(num_timesteps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"noise_schedule {name!r} is unknown; expected 'linear' or 'squaredcos_cap_v2'")


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) and its reverse.

    mean_type: what the model's mean output predicts, "epsilon" or "x0".
    var_type: "learned_range" (the model outputs v in [-1, 1] interpolating log beta_t and log beta~_t),
        "fixed_small" (the posterior variance beta~_t) or "fixed_large" (beta_t).
    loss_type: "mse" (+ the variational bound when the variance is learned), "rescaled_mse", "kl", "rescaled_kl".
    pred_sigma: whether the model output carries variance channels after the C mean channels (default:
        exactly when the variance is learned); with a fixed variance they are ignored.
    snr: the reference's `snr_loss` option: for original timesteps <= 249 the MSE is measured on x0
        instead of eps.
    min_snr_gamma: min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
        Weighting Strategy"): the mean's MSE is weighted by min(SNR_t, gamma) / SNR_t for eps prediction,
        min(SNR_t, gamma) for x0 prediction (SNR_t = abar_t / (1 - abar_t)), so the low-noise steps no longer
        dominate the gradient; None (default) leaves the loss unweighted. The variational bound is not weighted.
    timestep_map: the original timestep of each step, passed to the model (see `respace.SpacedDiffusion`).
    exact_decoder_nll: the decoder NLL at t = 0 with the exact normal CDF instead of the reference's tanh
        approximation (the default, with which the released models were trained).
    """

    def __init__(self, betas, *, mean_type="epsilon", var_type="learned_range", loss_type="mse",
                 pred_sigma=None, snr=False, min_snr_gamma=None, timestep_map=None, exact_decoder_nll=False):
        if mean_type not in MEAN_TYPES:
            raise ValueError(f"mean_type {mean_type!r} is unknown; expected one of {MEAN_TYPES}")
        if var_type not in VAR_TYPES:
            raise ValueError(f"var_type {var_type!r} is unknown; expected one of {VAR_TYPES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r} is unknown; expected one of {LOSS_TYPES}")
        pred_sigma = var_type == "learned_range" if pred_sigma is None else pred_sigma
        if var_type == "learned_range" and not pred_sigma:
            raise ValueError("var_type 'learned_range' needs a model that predicts sigma (pred_sigma=True)")
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be a positive number or None, got {min_snr_gamma!r}")
        if min_snr_gamma is not None and snr:
            raise ValueError("min_snr_gamma and snr (the reference's snr_loss) both reweight the MSE; choose one")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.pred_sigma, self.snr, self.min_snr_gamma = pred_sigma, snr, min_snr_gamma
        self.exact_decoder_nll = exact_decoder_nll

        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D sequence of values in (0, 1]")
        self.num_timesteps = len(betas)
        self.timestep_map = (torch.arange(self.num_timesteps) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.long))

        # Every table is float64 on the CPU; `_gather` moves the few needed entries to the data.
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * (1.0 - betas).sqrt()
                                     / (1.0 - self.alphas_cumprod))

    # ----------------------------------------------------------------------------------------------
    # Forward process and posterior
    # ----------------------------------------------------------------------------------------------

    @staticmethod
    def _gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, ..., 1) to broadcast against `like`; float64 data keeps float64, else float32."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        values = table[t.detach().to("cpu", torch.long)].to(device=like.device, dtype=dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps the model was trained on, for step indices t."""
        return self.timestep_map.to(t.device)[t]

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._gather(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = self._gather(torch.log(1.0 - self.alphas_cumprod), t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) (with the given standard normal `noise`, if any)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        mean = (self._gather(self.posterior_mean_coef1, t, x_t) * x_start
                + self._gather(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = self._gather(self.posterior_variance, t, x_t)
        log_variance = self._gather(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # ----------------------------------------------------------------------------------------------
    # Reverse process
    # ----------------------------------------------------------------------------------------------

    def _split_output(self, output, x):
        """(mean part, variance values or None) of a raw model output."""
        channels = x.shape[1]
        expected = 2 * channels if self.pred_sigma else channels
        if output.shape[1] != expected or output.shape[2:] != x.shape[2:]:
            raise ValueError(f"model output has shape {tuple(output.shape)}, expected {expected} channels "
                             f"and spatial shape {tuple(x.shape[2:])} (pred_sigma={self.pred_sigma})")
        if self.pred_sigma:
            return output[:, :channels], output[:, channels:]
        return output, None

    def _p_from_output(self, output, x, t, clip_denoised=False, denoised_fn=None):
        """p(x_{t-1} | x_t) from a raw model output: dict of mean, variance, log_variance, pred_xstart."""
        mean_out, var_values = self._split_output(output, x)
        if self.var_type == "learned_range":
            min_log = self._gather(self.posterior_log_variance_clipped, t, x)
            max_log = self._gather(torch.log(self.betas), t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.var_type == "fixed_large":
                # beta_t, except at t = 0 where the posterior variance is used to get a better decoder NLL.
                table = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            else:
                table = self.posterior_variance
            variance = self._gather(table, t, x).expand_as(x)
            log_table = torch.log(table) if self.var_type == "fixed_large" else self.posterior_log_variance_clipped
            log_variance = self._gather(log_table, t, x).expand_as(x)

        pred_xstart = mean_out if self.mean_type == "x0" else self._predict_xstart_from_eps(x, t, mean_out)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run `model(x, original_timesteps, **model_kwargs)` and return p(x_{t-1} | x_t) (see `_p_from_output`)."""
        output = model(x, self._model_timesteps(t), **(model_kwargs or {}))
        return self._p_from_output(output, x, t, clip_denoised, denoised_fn)

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, generator=None):
        """One ancestral step x_t -> x_{t-1}; no noise is added at t = 0. Returns dict(sample, pred_xstart)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = randn(x.shape, generator, x.device, x.dtype)
        keep_noise = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + keep_noise * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample.to(x.dtype), "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0,
                    generator=None):
        """One DDIM step (Song et al. 2021); eta=0 is deterministic, eta=1 matches DDPM's posterior variance."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._gather(self.alphas_cumprod, t, x)
        abar_prev = self._gather(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        mean = out["pred_xstart"] * abar_prev.sqrt() + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        sample = mean
        if eta > 0:
            keep_noise = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            sample = mean + keep_noise * sigma * randn(x.shape, generator, x.device, x.dtype)
        return {"sample": sample.to(x.dtype), "pred_xstart": out["pred_xstart"]}

    def _sample_loop(self, step_fn, shape, noise, device, progress, generator):
        """Run `step_fn(x, t, generator)` from t = T-1 down to 0, starting from `noise` or fresh noise."""
        generator = make_generator(generator)
        if noise is not None:
            x = noise
        else:
            x = randn(shape, generator, device if device is not None else "cpu", torch.float32)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, leave=False):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x = step_fn(x, t, generator)["sample"]
        return x

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, generator=None):
        """Ancestral sampling of a batch of `shape`; `generator` is a seed, a generator or one per sample."""
        def step(x, t, gen):
            return self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, gen)
        return self._sample_loop(step, shape, noise, device, progress, generator)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0, generator=None):
        """DDIM sampling of a batch of `shape` (use a "ddimN" respacing for N steps)."""
        def step(x, t, gen):
            return self.ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta, gen)
        return self._sample_loop(step, shape, noise, device, progress, generator)

    # ----------------------------------------------------------------------------------------------
    # Training loss
    # ----------------------------------------------------------------------------------------------

    def _vb_terms_bpd(self, output, x_start, x_t, t):
        """Per-sample variational-bound term in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the
        decoder NLL -log p(x_0 | x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_from_output(output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"], exact_cdf=self.exact_decoder_nll)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample loss terms for step indices t: dict with "loss", plus "mse" and (learned variance) "vb".

        With a learned variance, loss = mse + vb where vb sees the predicted mean detached, so the
        variational bound trains only the variance (improved DDPM's hybrid loss).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self._model_timesteps(t), **(model_kwargs or {}))
        terms = {}

        if self.loss_type in ("kl", "rescaled_kl"):
            terms["loss"] = self._vb_terms_bpd(output, x_start, x_t, t)
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        mean_out, var_values = self._split_output(output, x_t)
        if self.var_type == "learned_range":
            frozen = torch.cat([mean_out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == "rescaled_mse":
                # Keeps the bound's weight independent of the number of steps (1000 was the original).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target, prediction = (noise, mean_out) if self.mean_type == "epsilon" else (x_start, mean_out)
        if self.snr:
            if self.mean_type == "epsilon":
                pred_eps, pred_x0 = mean_out, self._predict_xstart_from_eps(x_t, t, mean_out)
            else:
                pred_eps, pred_x0 = self._predict_eps_from_xstart(x_t, t, mean_out), mean_out
            # The reference compares the step index with 249; we use the original timestep so that a
            # respaced training schedule keeps the same split.
            high_noise = (self._model_timesteps(t) > 249).view(-1, *([1] * (x_t.ndim - 1)))
            target = torch.where(high_noise, noise, x_start)
            prediction = torch.where(high_noise, pred_eps, pred_x0)
        terms["mse"] = mean_flat((target - prediction) ** 2)
        if self.min_snr_gamma is not None:
            abar = self.alphas_cumprod[t.cpu()]
            signal_to_noise = abar / (1.0 - abar)
            weight = signal_to_noise.clamp(max=self.min_snr_gamma)
            if self.mean_type == "epsilon":
                weight = weight / signal_to_noise
            terms["mse"] = terms["mse"] * weight.to(device=terms["mse"].device, dtype=terms["mse"].dtype)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
