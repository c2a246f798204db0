"""Samplers on Gaussian data, where the exact noise predictor, reverse kernel and ODE solution are known:
IDDPM, DDIM, DPM-Solver(++), SA-Solver and LCM reach the data distribution, converge at their order,
agree with diffusers where the algorithms coincide, and are reproducible from a seed (SPEC section 6)."""
import math

import pytest
import torch

from diffusion import DPMS, IDDPM, SASolverSampler
from diffusion.lcm_scheduler import LCMScheduler, lcm_timesteps
from diffusion.model.diffusion_utils import GaussianDataDenoiser
from diffusion.model.dpm_solver import DPMSolver, NoiseScheduleVP, model_wrapper, time_point
from diffusion.model.sa_solver import SASolver

MEAN = torch.tensor([0.5, -0.3], dtype=torch.float64)
STD = torch.tensor([0.5, 0.8], dtype=torch.float64)
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ABAR = torch.cumprod(1 - BETAS, 0)
TOY = GaussianDataDenoiser(ABAR, MEAN, STD)
SCHEDULE = NoiseScheduleVP(betas=BETAS)
TOY_FN = model_wrapper(TOY, SCHEDULE)


def gaussian_noise(samples, seed=0, dtype=torch.float64):
    return torch.randn(samples, 2, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_data_statistics(x, mean_tol, std_tol):
    """Worst-channel sample mean and std errors, in units of the data std, within tolerance."""
    x = x.double().flatten(1)
    mean_error = ((x.mean(0) - MEAN).abs() / STD).max().item()
    std_error = ((x.std(0) - STD).abs() / STD).max().item()
    assert mean_error < mean_tol and std_error < std_tol, (mean_error, std_error)


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def convergence_rate(sample_fn, steps):
    """Slope of log(error against the exact ODE solution) over log(steps)."""
    x_T = gaussian_noise(200)
    exact = TOY.ode_solution(x_T, 999, 0)
    errors = [rms(sample_fn(x_T, n), exact) for n in steps]
    return math.log(errors[0] / errors[-1]) / math.log(steps[-1] / steps[0])


# ---------------------------------------------------------------- IDDPM and DDIM

@pytest.mark.parametrize("respacing", ["100", "10"])
def test_iddpm_ancestral_sampling_with_exact_reverse_variance_draws_the_data_distribution(respacing):
    # With the exact eps and the exact reverse variance (through the learned-range channels) every step
    # draws from the true reverse kernel, so the samples are exact at any step count.
    diffusion = IDDPM(respacing)
    model = TOY.learned_range_model(diffusion.timestep_map.tolist())
    x = diffusion.p_sample_loop(model, (20000, 2, 1, 1), clip_denoised=False, generator=0)
    assert_data_statistics(x, mean_tol=0.03, std_tol=0.025)


def test_iddpm_with_fixed_small_variance_underestimates_the_spread_with_few_steps():
    # The counterpart of the test above: it fails when the variance is wrong.
    diffusion = IDDPM("10", learn_sigma=False, pred_sigma=False, sigma_small=True)
    x = diffusion.p_sample_loop(TOY, (20000, 2, 1, 1), clip_denoised=False, generator=0)
    assert (x.double().flatten(1).std(0) / STD).max() < 0.8


def test_ddim_is_first_order_dpm_solver_on_the_same_time_grid():
    x_T = gaussian_noise(64)
    ddim = IDDPM("ddim50", learn_sigma=False, pred_sigma=False).ddim_sample_loop(TOY, x_T.shape, noise=x_T,
                                                                               clip_denoised=False)
    # ddim50 visits 980, 960, ..., 0, i.e. continuous times 0.981 down to 0.001 in equal steps, and its
    # last step (to abar = 1) returns the x0 prediction at timestep 0: DPM-Solver's denoise_to_zero.
    for algorithm in ("dpmsolver++", "dpmsolver"):
        dpm = DPMSolver(TOY_FN, SCHEDULE, algorithm).sample(x_T, steps=49, t_start=0.981, order=1,
                                                            denoise_to_zero=True, progress=False)
        assert torch.allclose(ddim, dpm, atol=1e-10)


def test_ddim_with_many_steps_reaches_the_data_distribution():
    x_T = gaussian_noise(20000)
    x = IDDPM("ddim250", learn_sigma=False, pred_sigma=False).ddim_sample_loop(TOY, x_T.shape, noise=x_T,
                                                                             clip_denoised=False)
    assert_data_statistics(x, mean_tol=0.03, std_tol=0.025)


# ---------------------------------------------------------------- DPM-Solver(++)

@pytest.mark.parametrize("order, steps, skip_type", [(1, 200, "time_uniform"), (2, 20, "logSNR"),
                                                     (3, 20, "logSNR")])
def test_dpm_solver_pp_reaches_the_data_distribution(order, steps, skip_type):
    x_T = gaussian_noise(20000)
    x = DPMS(TOY, None, None, 1.0).sample(x_T, steps=steps, order=order, skip_type=skip_type, progress=False)
    assert_data_statistics(x, mean_tol=0.03, std_tol=0.035)


@pytest.mark.parametrize("algorithm, method, order, solver_type, steps", [
    ("dpmsolver++", "multistep", 1, "dpmsolver", (48, 96, 192)),
    ("dpmsolver++", "multistep", 2, "dpmsolver", (48, 96, 192)),
    ("dpmsolver++", "multistep", 3, "dpmsolver", (48, 96, 192)),
    ("dpmsolver", "multistep", 2, "taylor", (48, 96, 192)),
    ("dpmsolver", "multistep", 3, "dpmsolver", (48, 96, 192)),
    ("dpmsolver++", "singlestep", 2, "dpmsolver", (48, 96, 192)),
    ("dpmsolver++", "singlestep", 3, "dpmsolver", (50, 98, 194)),  # 3k + 2: no first-order final step
    ("dpmsolver", "singlestep", 3, "taylor", (50, 98, 194)),
])
def test_dpm_solver_error_shrinks_at_its_order(algorithm, method, order, solver_type, steps):
    # A grid uniform in sqrt(t) keeps every step small; the default time-uniform grid leaves the last
    # step wide in lambda (it shrinks only like log(steps)), which hides the order until very many steps.
    def sample(x_T, n):
        return DPMSolver(TOY_FN, SCHEDULE, algorithm).sample(
            x_T, steps=n, order=order, method=method, solver_type=solver_type, skip_type="time_quadratic",
            progress=False)
    assert convergence_rate(sample, steps) == pytest.approx(order, abs=0.35)


# diffusers builds its tables through numpy, which warns about torch's __array__.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps", [9, 27])
def test_dpm_solver_pp_2m_matches_diffusers_multistep_scheduler(steps):
    from diffusers import DPMSolverMultistepScheduler

    # Our grid is uniform in continuous time from t=1 to 1/1000, i.e. model times 999 (1 - i/steps);
    # diffusers rounds linspace(0, 999, steps + 1) to integers. For steps dividing 999 both grids are the
    # same integers, and "sigma_min" makes diffusers stop at timestep 0's noise level as we do. Both use
    # first order for the last step below 10 steps (diffusers below 15), so 9 and 27 steps compare
    # the final-step rule as well as the 2M update.
    scheduler = DPMSolverMultistepScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", solver_order=2,
                                            algorithm_type="dpmsolver++", solver_type="midpoint",
                                            lower_order_final=True, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == [999 - 999 // steps * i for i in range(steps)]
    x_T = gaussian_noise(64, dtype=torch.float32)
    theirs = x_T.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(TOY(theirs, t.float().expand(len(theirs))), t, theirs).prev_sample
    ours = DPMS(TOY, None, None, 1.0).sample(x_T, steps=steps, order=2, progress=False)
    assert torch.allclose(ours, theirs, atol=3e-5)


def test_dpm_solver_rejects_unknown_options_by_name():
    solver = DPMS(TOY, None, None, 1.0)
    with pytest.raises(ValueError, match="skip_type"):
        solver.sample(gaussian_noise(2), skip_type="karras")
    with pytest.raises(ValueError, match="order"):
        solver.sample(gaussian_noise(2), order=4)


# ---------------------------------------------------------------- SA-Solver

def _exp_power_integral(k, start, end, c):
    """int_start^end e^(c l) l^k dl for k = 0, 1, the official code's closed forms (after l -> c l)."""
    a, b = c * start, c * end
    if k == 0:
        return math.exp(b) * (1 - math.exp(-(b - a))) / c
    return math.exp(b) * ((b - 1) - (a - 1) * math.exp(-(b - a))) / c ** 2


def _reference_adams(x, s, t, lambdas, values, tau, noise, corrector):
    """One official few-step SA-Solver update (data prediction, order 1 or 2, with its order-2 rescaling)."""
    c, h = 1 + tau ** 2, t.lam - s.lam
    if len(lambdas) == 1:
        coefficients = [_exp_power_integral(0, s.lam, t.lam, c)]
    else:
        l0, l1 = lambdas
        integral0, integral1 = _exp_power_integral(0, s.lam, t.lam, c), _exp_power_integral(1, s.lam, t.lam, c)
        coefficients = [(integral1 - l1 * integral0) / (l0 - l1), (integral1 - l0 * integral0) / (l1 - l0)]
        exact = (h * c - 1 + math.exp(-c * h)) / c ** 2
        shift = math.exp(c * t.lam) * ((h / 2 - exact / h) if corrector else (h * h / 2 - exact) / (l0 - l1))
        coefficients = [coefficients[0] + shift, coefficients[1] - shift]
    x_t = math.exp(-tau ** 2 * h) * (t.sigma / s.sigma) * x
    for coefficient, value in zip(coefficients, values):
        x_t = x_t + c * t.sigma * math.exp(-tau ** 2 * t.lam) * coefficient * value
    return x_t + t.sigma * math.sqrt(1 - math.exp(-2 * tau ** 2 * h)) * noise


def reference_sa_solver(model_fn, x, steps, eta, draws):
    """The official `sample_few_steps` with the released facade's settings (time grid, predictor and corrector
    order 2, PEC, tau = eta on 0.2 <= t <= 0.8), written from its formulas: draws[0] is drawn at initialisation
    and never used, step i uses draws[i], the last step is a deterministic predictor step."""
    grid = [time_point(SCHEDULE, float(t)) for t in torch.linspace(1.0, 1e-3, steps + 1, dtype=torch.float64)]

    def x0(x, p):
        return (x - p.sigma * model_fn(x, p.t)) / p.alpha

    def tau(p):
        return eta if 0.2 <= p.t <= 0.8 else 0.0

    points, values = [grid[0]], [x0(x, grid[0])]
    for step in range(1, steps + 1):
        t, s = grid[step], points[-1]
        order_p = min(2, step, steps - step + 1)
        order_q = min(2, step + 1, steps - step + 2)
        noise = draws[step]
        if step == steps:
            x = _reference_adams(x, s, t, [p.lam for p in points[::-1][:order_p]], values[::-1][:order_p], 0.0,
                                 noise, corrector=False)
            break
        x_p = _reference_adams(x, s, t, [p.lam for p in points[::-1][:order_p]], values[::-1][:order_p], tau(t),
                               noise, corrector=False)
        values.append(x0(x_p, t))
        lambdas = [t.lam] + [p.lam for p in points[::-1]]
        x = _reference_adams(x, s, t, lambdas[:order_q], values[::-1][:order_q], tau(t), noise, corrector=True)
        points.append(t)
        values = values[-2:]
    return x


@pytest.mark.parametrize("steps", [25, 6])
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_sa_solver_follows_the_references_formulas_and_draws_s_plus_1_normals_in_its_order(steps, eta):
    x_T = gaussian_noise(16)
    torch.manual_seed(123)  # the official sampler draws from torch's global generator (randn_like)
    ours = SASolverSampler(TOY).sample(steps, 16, (2, 1, 1), x_T=x_T.clone(), eta=eta, progress=False)[0]
    torch.manual_seed(123)
    draws = [torch.randn_like(x_T) for _ in range(steps + 1)]
    expected = reference_sa_solver(TOY_FN, x_T.clone(), steps, eta, draws)
    assert (ours - expected).abs().max().item() < 1e-5 * expected.abs().max().item()
    if eta:  # the noise matters: another draw order (draws shifted by one) gives another trajectory
        shifted = reference_sa_solver(TOY_FN, x_T.clone(), steps, eta, draws[1:] + draws[:1])
        assert (shifted - expected).abs().max().item() > 1e-2


def test_sa_solver_draws_exactly_s_plus_1_normals_whatever_tau_is():
    x_T = gaussian_noise(4)
    for eta in (0.0, 1.0):
        torch.manual_seed(7)
        SASolverSampler(TOY).sample(25, 4, (2, 1, 1), x_T=x_T.clone(), eta=eta, progress=False)
        after = torch.randn(())
        torch.manual_seed(7)
        for _ in range(26):
            torch.randn_like(x_T)
        assert torch.equal(after, torch.randn(())), eta


def test_the_sa_solver_facade_defaults_to_eta_0_as_the_official_one():
    import inspect
    assert inspect.signature(SASolverSampler.sample).parameters["eta"].default == 0.0
    x_T = gaussian_noise(4)
    deterministic = [SASolverSampler(TOY).sample(10, 4, (2, 1, 1), x_T=x_T.clone(), generator=seed,
                                                 progress=False)[0] for seed in (0, 1)]
    assert torch.equal(*deterministic)


# diffusers builds its tables through numpy, which warns about torch's __array__.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_sa_solver_matches_diffusers_sasolver_scheduler_in_its_ode_form():
    from diffusers import SASolverScheduler

    # Known difference, not tested: with eta > 0 diffusers' SASolverScheduler is another stochastic sampler than
    # the released one (it rounds timesteps, evaluates tau at a step's start and draws S normals, the reference
    # S + 1, step i using draw i). At eta = 0 both are the same ODE solver; 27 steps put both on the same integer
    # grid (see the DPM-Solver test).
    scheduler = SASolverScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", predictor_order=2,
                                  corrector_order=2, algorithm_type="data_prediction", tau_func=lambda t: 0.0)
    scheduler.set_timesteps(27)
    x_T = gaussian_noise(64, dtype=torch.float32)
    theirs, generator = x_T.clone(), torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        theirs = scheduler.step(TOY(theirs, t.float().expand(len(theirs))), t, theirs, generator=generator).prev_sample
    ours = SASolver(TOY_FN, SCHEDULE).sample(x_T, steps=27, tau=lambda t: 0.0, generator=5, progress=False)
    assert torch.allclose(ours, theirs, atol=3e-5)


def test_sa_solver_ode_mode_converges_at_second_order():
    def sample(x_T, n):
        return SASolver(TOY_FN, SCHEDULE).sample(x_T, steps=n, skip_type="time_quadratic", progress=False)
    assert convergence_rate(sample, (48, 96, 192)) == pytest.approx(2.0, abs=0.4)


def test_sa_solver_first_order_step_with_tau_one_is_a_ddpm_posterior_draw():
    s, t = time_point(SCHEDULE, 0.6), time_point(SCHEDULE, 0.5)
    gen = torch.Generator().manual_seed(0)
    x_s, x0, noise = (torch.randn(8, 2, 1, 1, generator=gen, dtype=torch.float64) for _ in range(3))
    # q(x_t | x_s, x0) for s > t: x_s = (a_s/a_t) x_t + noise of variance s_s^2 - (a_s/a_t)^2 s_t^2.
    a_st = s.alpha / t.alpha
    var_st = s.sigma ** 2 - a_st ** 2 * t.sigma ** 2
    mean = (a_st * t.sigma ** 2 * x_s + t.alpha * var_st * x0) / s.sigma ** 2
    std = math.sqrt(t.sigma ** 2 * var_st / s.sigma ** 2)
    got = SASolver(TOY_FN, SCHEDULE).adams_step(x_s, s, t, [(s, x0)], tau=1.0, noise=noise)
    assert torch.allclose(got, mean + std * noise)


@pytest.mark.parametrize("steps", [25, 50])
def test_sa_solver_default_stochastic_sampling_reaches_the_data_distribution(steps):
    x = SASolverSampler(TOY).sample(steps, 20000, (2, 1, 1), eta=1.0, generator=0, progress=False)[0]
    assert_data_statistics(x, mean_tol=0.03, std_tol=0.035)


# ---------------------------------------------------------------- LCM

def test_lcm_uses_every_twelfth_step_of_the_50_step_ddim_grid():
    assert lcm_timesteps(4) == [999, 759, 519, 279]
    assert lcm_timesteps(1) == [999] and lcm_timesteps(2) == [999, 499]


# diffusers builds its tables through numpy, which warns about torch's __array__.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_lcm_sampling_matches_diffusers_lcm_scheduler_given_the_same_seed():
    from diffusers import LCMScheduler as DiffusersLCM

    theirs_scheduler = DiffusersLCM(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    theirs_scheduler.set_timesteps(timesteps=[999, 759, 519, 279])
    x_T = gaussian_noise(16, dtype=torch.float32)
    theirs, generator = x_T.clone(), torch.Generator().manual_seed(3)
    for t in theirs_scheduler.timesteps:
        theirs = theirs_scheduler.step(TOY(theirs, t.expand(len(theirs))), t, theirs, generator=generator).prev_sample
    ours = LCMScheduler().sample(TOY, x_T, num_inference_steps=4, generator=3, progress=False)
    assert torch.allclose(ours, theirs, atol=1e-5)


# ---------------------------------------------------------------- seeds and progress bars

def run_sampler(name, batch, generator):
    """Latents of `batch` samples of shape (2, 2, 2) from sampler `name` with the given generator/seed."""
    shape = (batch, 2, 2, 2)
    if name == "iddpm":
        diffusion = IDDPM("5")
        return diffusion.p_sample_loop(TOY.learned_range_model(diffusion.timestep_map.tolist()), shape,
                                       clip_denoised=False, generator=generator)
    if name == "ddim_eta1":
        return IDDPM("ddim5", learn_sigma=False, pred_sigma=False).ddim_sample_loop(
            TOY, shape, clip_denoised=False, eta=1.0, generator=generator)
    if name == "sa_solver":
        return SASolverSampler(TOY).sample(6, batch, shape[1:], generator=generator, progress=False)[0]
    return LCMScheduler().sample(TOY, torch.zeros(shape), generator=generator, progress=False)


@pytest.mark.parametrize("name", ["iddpm", "ddim_eta1", "sa_solver", "lcm"])
def test_same_seed_gives_identical_latents_and_another_seed_different_ones(name):
    first, again, other = run_sampler(name, 3, 7), run_sampler(name, 3, 7), run_sampler(name, 3, 8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("name", ["iddpm", "ddim_eta1", "sa_solver", "lcm"])
def test_per_sample_seeds_give_each_sample_the_same_result_in_any_batch(name):
    trio = run_sampler(name, 3, [11, 12, 13])
    alone = run_sampler(name, 1, [12])
    assert torch.allclose(trio[1:2], alone, atol=1e-6)


def test_progress_bar_can_be_turned_off(capfd):
    DPMS(TOY, None, None, 1.0).sample(gaussian_noise(2), steps=3, progress=False)
    assert capfd.readouterr().err == ""
    DPMS(TOY, None, None, 1.0).sample(gaussian_noise(2), steps=3, progress=True)
    assert "/3" in capfd.readouterr().err
