"""Gaussian diffusion: schedules, forward process, posterior, respacing and training losses, each checked
against an independent closed form (SPEC section 5)."""
import math

import pytest
import torch
from torch.distributions import Normal

from diffusion import IDDPM
from diffusion.model.diffusion_utils import discretized_gaussian_log_likelihood, normal_kl
from diffusion.model.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from diffusion.model.respace import SpacedDiffusion, space_timesteps

BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)   # SPEC section 5, written out
ABAR = torch.cumprod(1 - BETAS, 0)


def batch(*values):
    return torch.tensor(values, dtype=torch.long)


# ---------------------------------------------------------------- schedules

def test_linear_schedule_runs_from_1e4_to_0_02_over_1000_steps_and_scales_with_T():
    assert torch.allclose(get_named_beta_schedule("linear", 1000), BETAS)
    short = get_named_beta_schedule("linear", 100)
    assert short[0].item() == pytest.approx(1e-3) and short[-1].item() == pytest.approx(0.2)


def test_cosine_schedule_follows_its_alpha_bar_until_the_cap():
    betas = get_named_beta_schedule("squaredcos_cap_v2", 1000)
    alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = torch.cumprod(1 - betas, 0)
    for t in (0, 10, 500, 900):
        assert abar[t].item() == pytest.approx(alpha_bar((t + 1) / 1000) / alpha_bar(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)


def test_unknown_schedule_is_rejected_by_name():
    with pytest.raises(ValueError, match="quadratic"):
        get_named_beta_schedule("quadratic", 1000)


# ---------------------------------------------------------------- forward process and posterior

def test_q_sample_and_q_mean_variance_match_the_closed_form():
    diffusion = IDDPM("")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    t = batch(0, 1, 500, 999)
    abar = ABAR[t].view(-1, 1, 1, 1)
    assert torch.allclose(diffusion.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    mean, variance, log_variance = diffusion.q_mean_variance(x0, t)
    assert torch.allclose(mean, abar.sqrt() * x0)
    assert torch.allclose(variance.flatten(), 1 - ABAR[t]) and torch.allclose(log_variance.exp(), variance)


def test_posterior_is_the_gaussian_conditional_of_x_t_minus_1_given_x_t_and_x0():
    diffusion = IDDPM("")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 1, 1, generator=gen, dtype=torch.float64)
    x_t = torch.randn(3, 2, 1, 1, generator=gen, dtype=torch.float64)
    t = batch(1, 400, 999)
    # Bayes: prior x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}), likelihood x_t ~ N(sqrt(1-beta_t) x_{t-1}, beta_t).
    abar_prev, beta = ABAR[t - 1].view(-1, 1, 1, 1), BETAS[t].view(-1, 1, 1, 1)
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    expected_mean = (abar_prev.sqrt() * x0 / (1 - abar_prev) + (1 - beta).sqrt() * x_t / beta) / precision
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    assert torch.allclose(mean, expected_mean) and torch.allclose(variance, 1 / precision)
    assert torch.allclose(log_variance, torch.log(1 / precision))


def test_posterior_at_t0_returns_x0_and_clips_its_log_variance_to_that_of_t1():
    diffusion = IDDPM("")
    x0, x_t = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), torch.full((1, 1, 1, 1), -2.0, dtype=torch.float64)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, x_t, batch(0))
    assert mean.item() == pytest.approx(0.3) and variance.item() == 0.0
    assert log_variance.item() == pytest.approx(math.log(BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])))


# ---------------------------------------------------------------- variance parameterisations

def test_learned_range_interpolates_log_variance_between_posterior_and_beta():
    diffusion = GaussianDiffusion(BETAS, var_type="learned_range")
    x = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    t = batch(5, 5, 5)
    v = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).view(3, 1, 1, 1)
    out = diffusion._p_from_output(torch.cat([torch.zeros_like(x), v], 1), x, t)
    small = math.log(BETAS[5] * (1 - ABAR[4]) / (1 - ABAR[5]))
    large = math.log(BETAS[5])
    assert out["log_variance"].flatten().tolist() == pytest.approx([small, (small + large) / 2, large])


@pytest.mark.parametrize("var_type, expected", [
    ("fixed_small", lambda t: BETAS[t] * (1 - ABAR[t - 1]) / (1 - ABAR[t])),
    ("fixed_large", lambda t: BETAS[t]),
])
def test_fixed_variances_ignore_the_model_variance_channels(var_type, expected):
    diffusion = GaussianDiffusion(BETAS, var_type=var_type, pred_sigma=True)
    x = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    output = torch.cat([torch.zeros_like(x), torch.full_like(x, 0.7)], 1)
    out = diffusion._p_from_output(output, x, batch(10, 600))
    assert out["variance"].flatten().tolist() == pytest.approx([expected(10).item(), expected(600).item()])


def test_x0_prediction_gives_the_posterior_mean_of_the_predicted_x0():
    diffusion = IDDPM("", predict_xstart=True, learn_sigma=False, pred_sigma=False)
    x_t = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    x0 = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    t = batch(3, 700)
    out = diffusion.p_mean_variance(lambda x, timestep: x0, x_t, t, clip_denoised=False)
    assert torch.allclose(out["pred_xstart"], x0)
    assert torch.allclose(out["mean"], diffusion.q_posterior_mean_variance(x0, x_t, t)[0])


def test_model_output_with_the_wrong_channel_count_is_rejected():
    diffusion = IDDPM("10")
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="8 channels"):
        diffusion.p_mean_variance(lambda x, t: x, x, batch(0))


# ---------------------------------------------------------------- respacing

def test_respacing_strings_keep_the_documented_original_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    hundred = sorted(space_timesteps(1000, "100"))
    assert len(hundred) == 100 and hundred[:3] == [0, 10, 20] and hundred[-1] == 999
    sections = sorted(space_timesteps(1000, "10,10,10"))
    assert len(sections) == 30 and sections[:3] == [0, 37, 74]
    assert sections[9:11] == [333, 334] and sections[-1] == 999  # the first section takes the extra step
    assert space_timesteps(1000, [1000]) == set(range(1000))


@pytest.mark.parametrize("bad", ["ddim999", "abc", "0", "2000"])
def test_impossible_respacings_are_rejected(bad):
    with pytest.raises(ValueError, match="respacing"):
        space_timesteps(1000, bad)


def test_spaced_diffusion_keeps_alpha_bar_and_feeds_the_model_original_timesteps():
    diffusion = IDDPM("ddim5", learn_sigma=False, pred_sigma=False)
    assert diffusion.num_timesteps == 5
    assert torch.allclose(diffusion.alphas_cumprod, ABAR[[0, 200, 400, 600, 800]])
    seen = []

    def model(x, timestep):
        seen.append(timestep.tolist())
        return torch.zeros_like(x)

    diffusion.p_sample_loop(model, (2, 1, 1, 1), generator=0)
    assert seen == [[800, 800], [600, 600], [400, 400], [200, 200], [0, 0]]


# ---------------------------------------------------------------- training loss

def toy_model(x, timestep):
    """A fixed smooth function with eps channels first and variance values in (-1, 1) after them."""
    scale = timestep.double().view(-1, 1, 1, 1) / 1000
    return torch.cat([0.8 * x + 0.3 * scale, torch.tanh(x - scale)], dim=1)


def reference_cdf(z):
    """The official code's normal CDF (SPEC section 9): 0.5 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))."""
    return 0.5 * (1 + torch.tanh((2 / math.pi) ** 0.5 * (z + 0.044715 * z ** 3)))


def expected_terms(x0, t, noise, exact_cdf=False, model=None):
    """mse, vb (bits) and loss computed from SPEC section 5 with torch.distributions; the decoder NLL at t = 0
    with the reference's CDF and its 1e-12 clamps, or with the exact CDF."""
    model = model or toy_model
    abar = ABAR[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = model(x_t, t)
    eps, v = out[:, :2], out[:, 2:]
    mse = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
    abar_prev = torch.where(t > 0, ABAR[(t - 1).clamp(min=0)], torch.ones(len(t), dtype=torch.float64))
    abar_prev = abar_prev.view(-1, 1, 1, 1)
    beta = BETAS[t].view(-1, 1, 1, 1)
    posterior_var = beta * (1 - abar_prev) / (1 - abar)
    clipped = torch.where(t > 0, posterior_var.flatten(), (BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])).expand(len(t)))
    log_var = (v + 1) / 2 * beta.log() + (1 - v) / 2 * clipped.log().view(-1, 1, 1, 1)
    x0_pred = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def posterior_mean(x_start):
        return (beta * abar_prev.sqrt() * x_start + (1 - abar_prev) * (1 - beta).sqrt() * x_t) / (1 - abar)

    # the bound trains the variance only: the model's mean enters detached (SPEC section 5)
    predicted = Normal(posterior_mean(x0_pred).detach(), torch.exp(0.5 * log_var))
    true = Normal(posterior_mean(x0), clipped.sqrt().view(-1, 1, 1, 1))
    kl = torch.distributions.kl_divergence(true, predicted).mean(dim=(1, 2, 3)) / math.log(2)
    if exact_cdf:
        upper, lower = predicted.cdf(x0 + 1 / 255), predicted.cdf(x0 - 1 / 255)
        prob = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))
    else:
        scale = predicted.stddev
        upper = reference_cdf((x0 - predicted.mean + 1 / 255) / scale)
        lower = reference_cdf((x0 - predicted.mean - 1 / 255) / scale)
        prob = torch.where(x0 < -0.999, upper.clamp(min=1e-12),
                           torch.where(x0 > 0.999, (1 - lower).clamp(min=1e-12), (upper - lower).clamp(min=1e-12)))
    nll = -prob.log().mean(dim=(1, 2, 3)) / math.log(2)
    vb = torch.where(t == 0, nll, kl)
    return mse, vb, mse + vb


def loss_inputs():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 2, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0, 0], x0[0, 1, 0, 0] = -1.0, 1.0  # both open-ended edge bins
    noise = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    return x0, batch(0, 1, 500, 999), noise


@pytest.mark.parametrize("exact", [False, True], ids=["reference-cdf", "exact-cdf"])
def test_training_losses_match_mse_plus_vb_in_bits_with_the_decoder_nll_at_t0(exact):
    x0, t, noise = loss_inputs()
    terms = IDDPM("", exact_decoder_nll=exact).training_losses(toy_model, x0, t, noise=noise)
    mse, vb, loss = expected_terms(x0, t, noise, exact_cdf=exact)
    assert torch.allclose(terms["mse"], mse, rtol=1e-9)
    assert torch.allclose(terms["vb"], vb, rtol=1e-9)
    assert torch.allclose(terms["loss"], loss, rtol=1e-9)
    assert terms["vb"][0] > 1.0  # the decoder NLL, not a KL of nearly equal Gaussians


def test_the_default_decoder_nll_is_the_references_approximation_and_differs_from_the_exact_one():
    x0, t, noise = loss_inputs()
    reference = IDDPM("").training_losses(toy_model, x0, t, noise=noise)["vb"]
    exact = IDDPM("", exact_decoder_nll=True).training_losses(toy_model, x0, t, noise=noise)["vb"]
    assert torch.equal(reference[1:], exact[1:])  # only t = 0 has the decoder term
    assert 1e-6 < abs(reference[0] - exact[0]) / exact[0] < 1e-2


def test_loss_gradients_equal_the_references_at_t_0_1_500_999():
    x0, t, noise = loss_inputs()
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()

    def model(x, timestep):  # a model with parameters, eps and variance channels depending on them
        scale = timestep.double().view(-1, 1, 1, 1) / 1000
        return torch.cat([weight[:2].view(1, 2, 1, 1) * x + 0.3 * scale,
                          torch.tanh(weight[2:].view(1, 2, 1, 1) * x - scale)], dim=1)

    for index in range(len(t)):
        one = slice(index, index + 1)
        ours = IDDPM("").training_losses(model, x0[one], t[one], noise=noise[one])["loss"].sum()
        grad_ours, = torch.autograd.grad(ours, weight)
        _, _, expected = expected_terms(x0[one], t[one], noise[one], model=model)
        grad_expected, = torch.autograd.grad(expected.sum(), weight)
        assert ours.item() == pytest.approx(expected.item(), rel=1e-9)
        assert torch.allclose(grad_ours, grad_expected, rtol=1e-6, atol=1e-12), int(t[index])


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    x0 = torch.rand(2, 2, 2, 2, dtype=torch.float64) * 2 - 1
    raw = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    terms = IDDPM("").training_losses(lambda x, timestep: raw * 1.0, x0, batch(3, 800))
    grad_vb, = torch.autograd.grad(terms["vb"].sum(), raw, retain_graph=True)
    grad_mse, = torch.autograd.grad(terms["mse"].sum(), raw)
    assert not grad_vb[:, :2].any() and grad_vb[:, 2:].abs().sum() > 0
    assert not grad_mse[:, 2:].any() and grad_mse[:, :2].abs().sum() > 0


def test_fixed_variance_loss_is_the_mse_alone_and_kl_loss_is_the_rescaled_bound():
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 2, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 2, 2, 2, generator=gen, dtype=torch.float64)
    t = batch(0, 300)
    fixed = IDDPM("", learn_sigma=False, pred_sigma=False).training_losses(
        lambda x, timestep: toy_model(x, timestep)[:, :2], x0, t, noise=noise)
    assert set(fixed) == {"mse", "loss"} and torch.equal(fixed["loss"], fixed["mse"])
    kl = IDDPM("", use_kl=True).training_losses(toy_model, x0, t, noise=noise)
    assert torch.allclose(kl["loss"], expected_terms(x0, t, noise)[1] * 1000, rtol=1e-7)


def test_snr_option_measures_x0_error_at_timesteps_up_to_249_and_eps_error_above():
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 2, 2, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 2, 2, 2, generator=gen, dtype=torch.float64)
    t = batch(249, 250)
    terms = IDDPM("", snr=True).training_losses(toy_model, x0, t, noise=noise)
    abar = ABAR[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    eps = toy_model(x_t, t)[:, :2]
    x0_pred = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert terms["mse"][0].item() == pytest.approx(((x0_pred[0] - x0[0]) ** 2).mean().item())
    assert terms["mse"][1].item() == pytest.approx(((eps[1] - noise[1]) ** 2).mean().item())


@pytest.mark.parametrize("predict_xstart", [False, True])
def test_min_snr_gamma_weights_the_mse_by_min_snr_gamma_over_snr(predict_xstart):
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    t = batch(10, 300, 900)  # SNR about 1e3, 2, 4e-4: the first is clipped at gamma, the others are not
    plain = IDDPM("", predict_xstart=predict_xstart).training_losses(toy_model, x0, t, noise=noise)
    weighted = IDDPM("", predict_xstart=predict_xstart, min_snr_gamma=5.0).training_losses(
        toy_model, x0, t, noise=noise)
    snr = ABAR[t] / (1 - ABAR[t])
    weight = snr.clamp(max=5.0) if predict_xstart else snr.clamp(max=5.0) / snr
    assert torch.allclose(weighted["mse"], plain["mse"] * weight, rtol=1e-9)
    assert torch.allclose(weighted["vb"], plain["vb"])  # the variance's bound is left alone
    assert torch.allclose(weighted["loss"], weighted["mse"] + weighted["vb"])
    if not predict_xstart:
        assert weight[0] < 0.02 and weight[1:].tolist() == [1.0, 1.0]


def test_min_snr_gamma_rejects_non_positive_values_and_the_reference_snr_loss():
    with pytest.raises(ValueError, match="min_snr_gamma must be a positive"):
        IDDPM("", min_snr_gamma=0.0)
    with pytest.raises(ValueError, match="choose one"):
        IDDPM("", snr=True, min_snr_gamma=5.0)


# ---------------------------------------------------------------- likelihood pieces

def test_discretized_log_likelihood_matches_normal_bin_masses_including_the_tails():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.2, 0.9, 1.0, 0.0], dtype=torch.float64)
    means = torch.tensor([-0.9, -0.4, 0.01, 0.15, 0.95, 0.99, 3.0], dtype=torch.float64)
    log_scales = torch.log(torch.tensor([0.1, 0.05, 0.2, 0.02, 0.3, 0.01, 0.1], dtype=torch.float64))
    dist = Normal(means, log_scales.exp())
    bins = dist.cdf(x + 1 / 255) - dist.cdf(x - 1 / 255)
    expected = torch.where(x < -0.999, dist.cdf(x + 1 / 255).log(),
                           torch.where(x > 0.999, (1 - dist.cdf(x - 1 / 255)).log(), bins.log()))
    got = discretized_gaussian_log_likelihood(x, means, log_scales, exact_cdf=True)
    assert torch.allclose(got[:6], expected[:6], rtol=1e-9)
    # 30 standard deviations off: finite and about -z^2/2, where the CDF difference underflows to 0.
    assert got[6].item() == pytest.approx(-0.5 * (3.0 / 0.1) ** 2, rel=0.01)


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([0.0, 2.0])
    lv1, lv2 = torch.tensor([-1.0, 0.5]), torch.tensor([0.2, -0.3])
    expected = torch.distributions.kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected)


# ---------------------------------------------------------------- factory and timestep sampling

def test_iddpm_factory_maps_its_flags_to_variance_mean_and_loss_types():
    default = IDDPM("")
    assert (default.num_timesteps, default.var_type, default.mean_type, default.loss_type) == \
        (1000, "learned_range", "epsilon", "mse")
    assert IDDPM("", learn_sigma=False).var_type == "fixed_large"
    assert IDDPM("", learn_sigma=False, sigma_small=True).var_type == "fixed_small"
    assert IDDPM("", pred_sigma=False).pred_sigma is False
    assert IDDPM("", rescale_learned_sigmas=True).loss_type == "rescaled_mse"
    assert IDDPM("", use_kl=True).loss_type == "rescaled_kl"
    assert isinstance(IDDPM("100"), SpacedDiffusion)
