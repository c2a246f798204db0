"""DPM-Solver and DPM-Solver++ (Lu et al. 2022): exponential-integrator solvers of the diffusion ODE,
for a discrete-time model viewed in continuous time, with classifier-free guidance.

Notation: t in [1/N, 1] is continuous time, alpha_t and sigma_t the signal and noise scales, and
lambda_t = log(alpha_t / sigma_t) the half log-SNR. Between two times s > t the ODE has the exact form
    DPM-Solver++ (data prediction):  x_t = sigma_t/sigma_s x_s + sigma_t  int e^{lambda}  x0(lambda) dlambda
    DPM-Solver   (noise prediction): x_t = alpha_t/alpha_s x_s - alpha_t  int e^{-lambda} eps(lambda) dlambda
and a k-th order solver integrates a degree k-1 Taylor expansion of x0 (or eps) in lambda exactly.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from tqdm.auto import tqdm

from .guidance import cfg_inputs, guided_model

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through (xp, fp), xp increasing; the end segments extrapolate."""
    index = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[index - 1], xp[index], fp[index - 1], fp[index]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseScheduleVP:
    """A discrete VP schedule (betas or alphas_cumprod over N steps) seen in continuous time.

    Step n sits at t_n = (n + 1) / N and log(alpha_t) is linear between steps, so t runs from 1/N to 1.
    The marginal_* and inverse_lambda functions take floats or tensors and return float64 CPU tensors;
    samplers turn them into Python floats once per time point, so no device needs float64.
    """

    def __init__(self, betas=None, alphas_cumprod=None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("give exactly one of betas and alphas_cumprod")
        if betas is not None:
            log_alphas = 0.5 * torch.log1p(-torch.as_tensor(betas, dtype=torch.float64).cpu()).cumsum(0)
        else:
            log_alphas = 0.5 * torch.log(torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu())
        self.total_N = len(log_alphas)
        self.T = 1.0
        self.eps = 1.0 / self.total_N
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1, dtype=torch.float64)[1:]
        self.log_alpha_array = log_alphas

    def marginal_log_mean_coeff(self, t) -> torch.Tensor:
        """log(alpha_t)."""
        return _interp(torch.as_tensor(t, dtype=torch.float64), self.t_array, self.log_alpha_array)

    def marginal_alpha(self, t) -> torch.Tensor:
        """alpha_t."""
        return self.marginal_log_mean_coeff(t).exp()

    def marginal_std(self, t) -> torch.Tensor:
        """sigma_t = sqrt(1 - alpha_t^2)."""
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t) -> torch.Tensor:
        """lambda_t = log(alpha_t) - log(sigma_t)."""
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lam) -> torch.Tensor:
        """The time t with lambda_t = lam."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return _interp(log_alpha, self.log_alpha_array.flip(0), self.t_array.flip(0))

    def model_time(self, t: float) -> float:
        """The model's timestep input for continuous time t: (t - 1/N) * N, in [0, N - 1].

        The reference multiplies by 1000 whatever N is; this is the same for N = 1000 and right otherwise.
        """
        return (t - 1.0 / self.total_N) * self.total_N


@dataclass(frozen=True)
class TimePoint:
    """A time with its schedule values, as Python floats."""
    t: float
    alpha: float
    sigma: float
    lam: float


def time_point(schedule: NoiseScheduleVP, t) -> TimePoint:
    """TimePoint for continuous time t."""
    t = float(t)
    return TimePoint(t, float(schedule.marginal_alpha(t)), float(schedule.marginal_std(t)),
                     float(schedule.marginal_lambda(t)))


def time_grid(schedule: NoiseScheduleVP, skip_type: str, t_start: float, t_end: float, steps: int) -> List[TimePoint]:
    """steps + 1 times from t_start down to t_end: uniform in t ("time_uniform"), in lambda ("logSNR"),
    or in sqrt(t) ("time_quadratic")."""
    if skip_type == "time_uniform":
        times = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    elif skip_type == "logSNR":
        lam = torch.linspace(float(schedule.marginal_lambda(t_start)), float(schedule.marginal_lambda(t_end)),
                             steps + 1, dtype=torch.float64)
        times = schedule.inverse_lambda(lam)
    elif skip_type == "time_quadratic":
        times = torch.linspace(math.sqrt(t_start), math.sqrt(t_end), steps + 1, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"skip_type {skip_type!r} is unknown; expected one of {SKIP_TYPES}")
    return [time_point(schedule, t) for t in times.tolist()]


def continuous_time_model(model_fn: Callable, noise_schedule: NoiseScheduleVP) -> Callable:
    """`fn(x, t_continuous) -> eps` from a sampler's `model_fn(x, timestep) -> output` in the model's
    discrete time (see `diffusion.model.guidance`); the output's first C channels (x has C) are eps."""
    def noise_fn(x: torch.Tensor, t: float) -> torch.Tensor:
        # Timesteps stay float32 (or float64) even for a half-precision x: rounding 949.05 to fp16 gives 949.
        time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t_input = torch.full((x.shape[0],), noise_schedule.model_time(t), device=x.device, dtype=time_dtype)
        return model_fn(x, t_input)[:, :x.shape[1]]
    return noise_fn


def guided_callable(model: Callable, condition=None, uncondition=None, guidance_scale: float = 1.0,
                    model_kwargs: Optional[dict] = None) -> Callable:
    """`model_fn(x, timestep)` (see `diffusion.model.guidance`) for `model(x, timestep, cond, **model_kwargs)`.

    With an unconditional input and guidance_scale != 1 this is classifier-free guidance (`guided_model`):
    one batch of [cond; uncond], eps = eps_uncond + scale (eps_cond - eps_uncond) on every channel. The
    unconditional input (for PixArt the null caption y_embedding) may be given once for the whole batch;
    every tensor in `model_kwargs` is per-sample (batch of `condition`) and is given to both halves, so the
    null caption is read with the prompt's mask. `condition=None` calls `model(x, timestep, **kwargs)`.
    """
    model_kwargs = dict(model_kwargs or {})
    if condition is None:
        return guided_model(model, model_kwargs)

    def with_condition(x, timestep, condition, **kwargs):
        return model(x, timestep, condition, **kwargs)

    cond = dict(model_kwargs, condition=condition)
    if uncondition is None or guidance_scale == 1.0:
        return guided_model(with_condition, cond)
    batch = condition.shape[0]
    if uncondition.shape[0] == 1 and batch > 1:
        uncondition = uncondition.expand(batch, *uncondition.shape[1:])
    inputs = cfg_inputs(cond, dict(model_kwargs, condition=uncondition), batch)
    return guided_model(with_condition, inputs, guidance_scale)


def model_wrapper(model: Callable, noise_schedule: NoiseScheduleVP, condition=None, uncondition=None,
                  guidance_scale: float = 1.0, model_kwargs: Optional[dict] = None) -> Callable:
    """Turn `model(x, timestep, cond, **model_kwargs) -> eps` into `fn(x, t_continuous) -> eps`, guided as
    `guided_callable` describes."""
    return continuous_time_model(guided_callable(model, condition, uncondition, guidance_scale, model_kwargs),
                                 noise_schedule)


class DPMSolver:
    """DPM-Solver ("dpmsolver", noise prediction) and DPM-Solver++ ("dpmsolver++", data prediction).

    `model_fn(x, t_continuous) -> eps` is a noise-prediction model in continuous time (see `model_wrapper`).
    """

    def __init__(self, model_fn: Callable, noise_schedule: NoiseScheduleVP, algorithm_type: str = "dpmsolver++"):
        if algorithm_type not in ("dpmsolver", "dpmsolver++"):
            raise ValueError(f"algorithm_type {algorithm_type!r} is unknown; expected 'dpmsolver' or 'dpmsolver++'")
        self.model_fn = model_fn
        self.noise_schedule = noise_schedule
        self.predict_x0 = algorithm_type == "dpmsolver++"

    # ----------------------------------------------------------------------------------------------
    # Model values and update weights
    # ----------------------------------------------------------------------------------------------

    def _model_value(self, x: torch.Tensor, p: TimePoint) -> torch.Tensor:
        """x0 prediction (DPM-Solver++) or eps prediction (DPM-Solver) at x, p."""
        eps = self.model_fn(x, p.t)
        return (x - p.sigma * eps) / p.alpha if self.predict_x0 else eps

    def _weights(self, s: TimePoint, t: TimePoint):
        """(a, b, c0, c1, c2) with x_t = a x_s + b (c0 f + c1 h f' + c2 h^2 f''), f = x0 or eps at s,
        derivatives in lambda, h = lambda_t - lambda_s: the exact integral of the Taylor expansion."""
        h = t.lam - s.lam
        if self.predict_x0:
            c0 = -math.expm1(-h)          # int_0^h e^{u-h} du
            c1 = 1.0 + math.expm1(-h) / h  # int_0^h e^{u-h} u du / h
            c2 = 0.5 - c1 / h              # int_0^h e^{u-h} u^2/2 du / h^2
            return t.sigma / s.sigma, t.alpha, c0, c1, c2
        c0 = math.expm1(h)                 # int_0^h e^{h-u} du
        c1 = math.expm1(h) / h - 1.0       # int_0^h e^{h-u} u du / h
        c2 = c1 / h - 0.5                  # int_0^h e^{h-u} u^2/2 du / h^2
        return t.alpha / s.alpha, -t.sigma, c0, c1, c2

    def _first_order(self, x, s: TimePoint, t: TimePoint, value):
        """DDIM, in either parameterisation."""
        a, b, c0, _, _ = self._weights(s, t)
        return a * x + b * c0 * value

    def _point_at_lambda(self, lam: float) -> TimePoint:
        return time_point(self.noise_schedule, self.noise_schedule.inverse_lambda(lam))

    # ----------------------------------------------------------------------------------------------
    # Updates
    # ----------------------------------------------------------------------------------------------

    def _multistep_update(self, x, points: List[TimePoint], values: List[torch.Tensor], t: TimePoint,
                          order: int, solver_type: str):
        """One step from points[-1] to t reusing the model values at the last `order` points."""
        s, m0 = points[-1], values[-1]
        a, b, c0, c1, c2 = self._weights(s, t)
        if order == 1:
            return a * x + b * c0 * m0
        h = t.lam - s.lam
        r0 = (s.lam - points[-2].lam) / h
        d1_0 = (m0 - values[-2]) / r0                       # h f' + O(h^2)
        if order == 2:
            # "dpmsolver" replaces c1 by c0/2, equal to leading order (the DPM-Solver-2 form).
            return a * x + b * (c0 * m0 + (0.5 * c0 if solver_type == "dpmsolver" else c1) * d1_0)
        r1 = (points[-2].lam - points[-3].lam) / h
        d1_1 = (values[-2] - values[-3]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)          # h f' + O(h^3)
        # (d1_0 - d1_1) / (r0 + r1) is h^2 f'' / 2, so this is h^2 f''. The reference (and diffusers)
        # omit the 2, which leaves an O(h^3) local error and makes its "third-order" multistep solver
        # converge at second order; tests/test_samplers.py measures the order.
        d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
        return a * x + b * (c0 * m0 + c1 * d1 + c2 * d2)

    def _singlestep_update(self, x, s: TimePoint, t: TimePoint, value_s, order: int, solver_type: str):
        """One step of `order` from s to t, evaluating the model at order - 1 intermediate times."""
        a, b, c0, c1, c2 = self._weights(s, t)
        if order == 1:
            return a * x + b * c0 * value_s
        h = t.lam - s.lam
        if order == 2:
            s1 = self._point_at_lambda(s.lam + 0.5 * h)
            r1 = (s1.lam - s.lam) / h
            value_1 = self._model_value(self._first_order(x, s, s1, value_s), s1)
            d1 = (value_1 - value_s) / r1
            return a * x + b * (c0 * value_s + (0.5 * c0 if solver_type == "dpmsolver" else c1) * d1)
        s1 = self._point_at_lambda(s.lam + h / 3)
        s2 = self._point_at_lambda(s.lam + 2 * h / 3)
        r1, r2 = (s1.lam - s.lam) / h, (s2.lam - s.lam) / h
        value_1 = self._model_value(self._first_order(x, s, s1, value_s), s1)
        # Second-order step to s2 with the slope measured at s1; its O(h^3) error is enough here.
        a2, b2, c0_2, c1_2, _ = self._weights(s, s2)
        x2 = a2 * x + b2 * (c0_2 * value_s + c1_2 * (r2 / r1) * (value_1 - value_s))
        value_2 = self._model_value(x2, s2)
        if solver_type == "dpmsolver":
            # With r2 = 2/3 the slope through s2 alone also cancels the f'' term to third order.
            return a * x + b * (c0 * value_s + c1 * (value_2 - value_s) / r2)
        d1_0, d1_1 = (value_1 - value_s) / r1, (value_2 - value_s) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return a * x + b * (c0 * value_s + c1 * d1 + c2 * d2)

    @staticmethod
    def _singlestep_orders(steps: int, order: int) -> List[int]:
        """Orders of the singlestep solver's steps, spending exactly `steps` model evaluations; the last
        step is of lower order, as in the reference, which is steadier with few steps."""
        if order == 1:
            return [1] * steps
        if order == 2:
            return [2] * (steps // 2) + [1] * (steps % 2)
        full, rest = divmod(steps, 3)
        if rest == 0:
            return [3] * (full - 1) + [2, 1]
        return [3] * full + [rest]

    # ----------------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------------

    def sample(self, x: torch.Tensor, steps: int = 20, t_start: Optional[float] = None,
               t_end: Optional[float] = None, order: int = 2, skip_type: str = "time_uniform",
               method: str = "multistep", lower_order_final: bool = True, denoise_to_zero: bool = False,
               solver_type: str = "dpmsolver", progress: bool = True) -> torch.Tensor:
        """Solve the diffusion ODE from x at t_start (default 1) to t_end (default 1/N) in `steps` model
        evaluations ("multistep": one per step; "singlestep": steps split into steps of up to `order`).

        lower_order_final: as the reference, multistep lowers the order of the last steps only when
        steps < 10. denoise_to_zero: finish with one x0 prediction at t_end (one more evaluation).
        solver_type: "dpmsolver" or "taylor", two second-order forms of the first-derivative term.
        """
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        if method not in ("multistep", "singlestep"):
            raise ValueError(f"method {method!r} is unknown; expected 'multistep' or 'singlestep'")
        if solver_type not in ("dpmsolver", "taylor"):
            raise ValueError(f"solver_type {solver_type!r} is unknown; expected 'dpmsolver' or 'taylor'")
        if skip_type not in SKIP_TYPES:
            raise ValueError(f"skip_type {skip_type!r} is unknown; expected one of {SKIP_TYPES}")
        if steps < 1 or (method == "multistep" and steps < order):
            raise ValueError(f"steps={steps} is too few for {method} order {order}")
        schedule = self.noise_schedule
        t_start = schedule.T if t_start is None else t_start
        t_end = schedule.eps if t_end is None else t_end
        if not 0 < t_end < t_start <= schedule.T:
            raise ValueError(f"need 0 < t_end < t_start <= {schedule.T}, got t_start={t_start}, t_end={t_end}")

        with torch.no_grad():
            if method == "multistep":
                x = self._sample_multistep(x, time_grid(schedule, skip_type, t_start, t_end, steps), order,
                                           lower_order_final, solver_type, progress)
            else:
                orders = self._singlestep_orders(steps, order)
                if skip_type == "logSNR":
                    grid = time_grid(schedule, skip_type, t_start, t_end, len(orders))
                else:
                    # Outer steps on the grid of single evaluations, so that a step of order k spans k cells.
                    fine = time_grid(schedule, skip_type, t_start, t_end, steps)
                    ends = [0]
                    for k in orders:
                        ends.append(ends[-1] + k)
                    grid = [fine[j] for j in ends]
                for i in tqdm(range(len(orders)), disable=not progress, leave=False):
                    value = self._model_value(x, grid[i])
                    x = self._singlestep_update(x, grid[i], grid[i + 1], value, orders[i], solver_type)
            if denoise_to_zero:
                end = time_point(schedule, t_end)
                eps = self.model_fn(x, end.t)
                x = (x - end.sigma * eps) / end.alpha
        return x

    def _sample_multistep(self, x, grid: List[TimePoint], order: int, lower_order_final: bool,
                          solver_type: str, progress: bool):
        steps = len(grid) - 1
        points, values = [grid[0]], [self._model_value(x, grid[0])]
        for i in tqdm(range(1, steps + 1), disable=not progress, leave=False):
            step_order = min(order, i)  # warm-up: only i earlier values exist
            if lower_order_final and steps < 10:
                step_order = min(step_order, steps + 1 - i)
            x = self._multistep_update(x, points, values, grid[i], step_order, solver_type)
            if i < steps:  # the last value would never be used
                points.append(grid[i])
                values.append(self._model_value(x, grid[i]))
                del points[:-order], values[:-order]
        return x
