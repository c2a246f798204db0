"""Small pieces shared by the diffusion code: Gaussian KL and likelihood, seeded noise, and the exact
noise predictor for Gaussian data that the sampler tests and `tools/sampler_accuracy.py` use as a model."""
import math
from typing import Sequence, Union

import torch

GeneratorLike = Union[None, int, torch.Generator, Sequence[Union[int, torch.Generator]]]


# --------------------------------------------------------------------------------------------------
# Gaussian log-likelihoods
# --------------------------------------------------------------------------------------------------

def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_standard_normal_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log P(lower < Z < upper) for a standard normal Z, accurate in both tails."""
    # Work in the tail where both bounds are negative so that the CDFs are small and do not cancel.
    flip = lower > 0
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The reference's normal CDF: the tanh approximation 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                                        bin_half_width: float = 1.0 / 255, exact_cdf: bool = False) -> torch.Tensor:
    """Elementwise log-probability of data in [-1, 1] quantised to 256 levels under N(means, exp(log_scales)^2).

    The first and last bins extend to -inf and +inf. By default this is the reference's computation, with which
    the released models were trained: the tanh approximation of the normal CDF, each probability clamped at 1e-12
    before the log (so badly placed means get no gradient). `exact_cdf=True` uses the exact CDF in log space
    instead, accurate in both tails (up to 1e-3 relative away from the reference's value at t = 0).
    """
    inv_scale = torch.exp(-log_scales)
    upper = (x - means + bin_half_width) * inv_scale
    lower = (x - means - bin_half_width) * inv_scale
    if exact_cdf:
        log_below_upper = torch.special.log_ndtr(upper)   # whole mass below the first bin's upper edge
        log_above_lower = torch.special.log_ndtr(-lower)  # whole mass above the last bin's lower edge
        log_in_bin = _log_standard_normal_mass(lower, upper)
    else:
        cdf_upper, cdf_lower = approx_standard_normal_cdf(upper), approx_standard_normal_cdf(lower)
        log_below_upper = torch.log(cdf_upper.clamp(min=1e-12))
        log_above_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
        log_in_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_in_bin))


# --------------------------------------------------------------------------------------------------
# Seeded noise
# --------------------------------------------------------------------------------------------------

def make_generator(generator: GeneratorLike) -> Union[None, torch.Generator, list]:
    """Turn a seed, a generator, or a per-sample list of either into generator(s); None stays None.

    A bare seed gives a CPU generator, so the same seed draws the same noise on every device.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int):
        return torch.Generator("cpu").manual_seed(generator)
    if isinstance(generator, (list, tuple)):
        return [make_generator(g) for g in generator]
    raise TypeError(f"generator must be None, an int seed, a torch.Generator or a list of them, "
                    f"got {type(generator).__name__}")


def randn(shape: Sequence[int], generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn from `generator` (see `make_generator`).

    With a list of generators, sample i is drawn from generator i alone, so a sample does not depend on
    the batch it is part of. Half-precision noise is drawn in float32 and cast, so fp16 and fp32 runs
    from one seed start from the same numbers.
    """
    draw_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; "
                             "pass one generator per sample")
        parts = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=draw_dtype) for g in generator]
        noise = torch.stack(parts).to(device)
    elif generator is not None:
        noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=draw_dtype).to(device)
    else:
        noise = torch.randn(tuple(shape), device=device, dtype=draw_dtype)
    return noise.to(dtype)


# --------------------------------------------------------------------------------------------------
# A model whose exact answer is known: Gaussian data
# --------------------------------------------------------------------------------------------------

class GaussianDataDenoiser:
    """The exact noise predictor for data x0 ~ N(mean, std^2) (independent per channel) under a
    discrete schedule `alphas_cumprod`; a closed-form stand-in for a trained model.

    Called like a PixArt model, `model(x, timestep, *args, **kwargs)` with `x` of shape (B, C, ...), it
    returns eps(x_t, t) = sigma_t (x_t - alpha_t mean) / (alpha_t^2 std^2 + sigma_t^2). Fractional
    timesteps interpolate log(alpha) linearly between integer steps, the convention DPM-Solver uses.
    Because every marginal is Gaussian, the probability-flow ODE is solved exactly by `ode_solution`.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
        self.log_alpha = 0.5 * torch.log(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)

    def alpha_sigma(self, timestep) -> tuple:
        """alpha_t and sigma_t (float64) for integer or fractional timesteps in [0, N-1]."""
        t = torch.as_tensor(timestep, dtype=torch.float64).cpu()
        low = t.floor().clamp(0, len(self.log_alpha) - 2).long()
        frac = t - low
        log_alpha = (1 - frac) * self.log_alpha[low] + frac * self.log_alpha[low + 1]
        return log_alpha.exp(), torch.sqrt(-torch.expm1(2 * log_alpha))

    def _per_channel(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return values.to(x.device).view(1, -1, *([1] * (x.ndim - 2)))

    def _per_sample(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return values.expand(x.shape[0]).to(x.device).view(-1, *([1] * (x.ndim - 1)))

    def __call__(self, x: torch.Tensor, timestep, *args, **kwargs) -> torch.Tensor:
        alpha, sigma = (self._per_sample(v, x) for v in self.alpha_sigma(timestep))
        mean, std = self._per_channel(self.mean, x), self._per_channel(self.std, x)
        eps = sigma * (x.double() - alpha * mean) / (alpha ** 2 * std ** 2 + sigma ** 2)
        return eps.to(x.dtype)

    def learned_range_model(self, timestep_map):
        """A model for an ancestral sampler on the kept timesteps `timestep_map` with learned-range variance:
        it returns [eps, v] where v selects the exact variance of x_{t-1} given x_t, so each step draws
        from the true reverse kernel and the chain samples the data distribution exactly. Needs std <= 1
        (the exact variance then lies between the fixed small and large variances that v interpolates)."""
        kept = torch.as_tensor(sorted(timestep_map), dtype=torch.long)
        abar = torch.exp(2 * self.log_alpha[kept])
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        beta = 1 - abar / abar_prev
        posterior_variance = beta * (1 - abar_prev) / (1 - abar)
        log_small = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        log_large = torch.log(beta)
        x0_coef = beta * abar_prev.sqrt() / (1 - abar)  # weight of x0 in the posterior mean

        def model(x, timestep, *args, **kwargs):
            step = torch.searchsorted(kept, torch.as_tensor(timestep).cpu().long())
            alpha, sigma = (self._per_sample(v, x) for v in self.alpha_sigma(kept[step]))
            std = self._per_channel(self.std, x)
            x0_variance = std ** 2 * sigma ** 2 / (alpha ** 2 * std ** 2 + sigma ** 2)
            coef, small, large, post = (self._per_sample(table[step], x)
                                        for table in (x0_coef, log_small, log_large, posterior_variance))
            log_variance = torch.log(post + coef ** 2 * x0_variance)
            v = 2 * (log_variance - small) / (large - small) - 1
            v = torch.where(self._per_sample(step, x) == 0, -torch.ones_like(v), v)  # no noise at the last step
            return torch.cat([self(x, timestep), v.expand_as(x).to(x.dtype)], dim=1)

        return model

    def ode_solution(self, x_from: torch.Tensor, timestep_from, timestep_to) -> torch.Tensor:
        """Exact probability-flow ODE transport of x between two timesteps (keeps each channel's z-score)."""
        mean, std = self._per_channel(self.mean, x_from), self._per_channel(self.std, x_from)
        a0, s0 = (self._per_sample(v, x_from) for v in self.alpha_sigma(timestep_from))
        a1, s1 = (self._per_sample(v, x_from) for v in self.alpha_sigma(timestep_to))
        z = (x_from.double() - a0 * mean) / torch.sqrt(a0 ** 2 * std ** 2 + s0 ** 2)
        return (a1 * mean + torch.sqrt(a1 ** 2 * std ** 2 + s1 ** 2) * z).to(x_from.dtype)
