"""SA-Solver (Xue et al. 2023): a stochastic Adams predictor-corrector for the diffusion SDE family
    dx = [f(t) x - (1 + tau(t)^2)/2 g(t)^2 score(x, t)] dt + tau(t) g(t) dw,
where tau = 0 is the probability-flow ODE and tau = 1 the reverse SDE. Data-prediction form only.

Over a step from s to t with tau constant, c = 1 + tau^2 and h = lambda_t - lambda_s, the solution is
    x_t = sigma_t/sigma_s e^{-tau^2 h} x_s + alpha_t c int_{-h}^{0} e^{c u} x0(lambda_t + u) du
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) xi,
and the solver replaces x0(lambda) by the polynomial through earlier model values (predictor,
Adams-Bashforth) or through earlier values and the predicted point's (corrector, Adams-Moulton).
"""
import math
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion_utils import make_generator, randn
from .dpm_solver import NoiseScheduleVP, TimePoint, time_grid

# SA-Solver calls the uniform-in-t grid "time".
_SKIP_TYPES = {"time": "time_uniform", "logSNR": "logSNR", "time_quadratic": "time_quadratic"}


def _exponential_moments(c: float, h: float, max_power: int) -> List[float]:
    """I_k = int_{-h}^{0} e^{c u} u^k du for k = 0..max_power (closed form, by parts)."""
    decay = math.exp(-c * h)
    moments = [-math.expm1(-c * h) / c]
    for k in range(1, max_power + 1):
        moments.append(-decay * (-h) ** k / c - k / c * moments[-1])
    return moments


def adams_weights(lambdas: List[float], lambda_s: float, lambda_t: float, c: float,
                  simplified_slope: bool = False) -> List[float]:
    """Weights w_j with int_{-h}^{0} e^{c u} P(lambda_t + u) du = sum_j w_j m_j, where P is the polynomial
    through the points (lambdas[j], m_j) and h = lambda_t - lambda_s.

    simplified_slope (two points only): the slope term's weight int e^{c u}(u + h) du becomes its
    small-h limit h^2/2; an O(h^3) change the SA-Solver authors use for few-step sampling (their
    "few_steps" mode, the released PixArt default).
    """
    h = lambda_t - lambda_s
    nodes = [lam - lambda_t for lam in lambdas]  # in u = lambda - lambda_t, where the moments live
    moments = _exponential_moments(c, h, len(nodes) - 1)
    weights = []
    for j, node in enumerate(nodes):
        others = [other for k, other in enumerate(nodes) if k != j]
        basis = np.atleast_1d(np.poly(others))[::-1] / np.prod([node - other for other in others])  # ascending powers
        weights.append(float(sum(coef * moment for coef, moment in zip(basis, moments))))
    if simplified_slope and len(nodes) == 2:
        exact_slope_weight = (c * h + math.expm1(-c * h)) / c ** 2
        shift = (h * h / 2 - exact_slope_weight) / (nodes[0] - nodes[1])
        weights[0] += shift
        weights[1] -= shift
    return weights


class SASolver:
    """SA-Solver in data-prediction form for a noise-prediction `model_fn(x, t_continuous) -> eps`."""

    def __init__(self, model_fn: Callable, noise_schedule: NoiseScheduleVP):
        self.model_fn = model_fn
        self.noise_schedule = noise_schedule

    def _x0(self, x: torch.Tensor, p: TimePoint) -> torch.Tensor:
        return (x - p.sigma * self.model_fn(x, p.t)) / p.alpha

    def adams_step(self, x: torch.Tensor, s: TimePoint, t: TimePoint, history: List[Tuple[TimePoint, torch.Tensor]],
                   tau: float, noise: Optional[torch.Tensor], simplified_slope: bool = True) -> torch.Tensor:
        """x_s -> x_t using the x0 values in `history` (pairs of time and value; predictor or corrector),
        with stochasticity tau and the step's standard normal `noise` (unused when tau = 0).
        simplified_slope: the released few-step form of two-point steps (see `adams_weights`)."""
        c = 1.0 + tau ** 2
        h = t.lam - s.lam
        weights = adams_weights([p.lam for p, _ in history], s.lam, t.lam, c, simplified_slope)
        x_t = (t.sigma / s.sigma * math.exp(-tau ** 2 * h)) * x
        for weight, (_, value) in zip(weights, history):
            x_t = x_t + (t.alpha * c * weight) * value
        if tau > 0:
            x_t = x_t + (t.sigma * math.sqrt(-math.expm1(-2.0 * tau ** 2 * h))) * noise
        return x_t

    def sample(self, x: torch.Tensor, steps: int = 25, tau: Callable[[float], float] = lambda t: 0.0,
               predictor_order: int = 2, corrector_order: int = 2, skip_type: str = "time", pc_mode: str = "PEC",
               t_start: Optional[float] = None, t_end: Optional[float] = None, generator=None,
               progress: bool = True) -> torch.Tensor:
        """Sample from x at t_start (default 1) to t_end (default 1/N) in `steps` model evaluations.

        tau(t) gives the stochasticity at continuous time t of each step's end. Each step predicts
        with the last `predictor_order` values, evaluates the model at the prediction, and corrects
        with `corrector_order` values including the new one; "PECE" evaluates again after correcting.
        Orders drop while the history fills and over the final steps. As in the released few-step
        mode the last step is a deterministic predictor step with no correction. `generator`: seed,
        generator or one per sample, for the noise (None: torch's global generator, as the reference's
        `randn_like`); steps + 1 normals are drawn in the reference's order whatever tau is.
        """
        if skip_type not in _SKIP_TYPES:
            raise ValueError(f"skip_type {skip_type!r} is unknown; expected one of {tuple(_SKIP_TYPES)}")
        if pc_mode not in ("PEC", "PECE"):
            raise ValueError(f"pc_mode {pc_mode!r} is unknown; expected 'PEC' or 'PECE'")
        if not 1 <= predictor_order <= 4 or not 0 <= corrector_order <= 4:
            raise ValueError(f"need predictor_order in 1..4 and corrector_order in 0..4, "
                             f"got {predictor_order} and {corrector_order}")
        if steps < max(predictor_order, corrector_order - 1, 1):
            raise ValueError(f"steps={steps} is too few for predictor order {predictor_order} "
                             f"and corrector order {corrector_order}")
        schedule = self.noise_schedule
        t_start = schedule.T if t_start is None else t_start
        t_end = schedule.eps if t_end is None else t_end
        grid = time_grid(schedule, _SKIP_TYPES[skip_type], t_start, t_end, steps)
        generator = make_generator(generator)
        keep = max(predictor_order, corrector_order)

        def draw():
            return randn(x.shape, generator, x.device, x.dtype)

        with torch.no_grad():
            # The released sampler draws one normal before the first step that it never uses, then one on every
            # step whatever tau is, the last included: S + 1 draws, step i using draw i. Drawing the same way
            # gives a user who seeds like the official scripts the official image.
            draw()
            history = [(grid[0], self._x0(x, grid[0]))]
            for i in tqdm(range(1, steps + 1), disable=not progress, leave=False):
                s, t = grid[i - 1], grid[i]
                p = min(predictor_order, i, steps - i + 1)
                q = min(corrector_order, i + 1, steps - i + 2)
                noise = draw()  # the predictor and the corrector share the step's noise
                if i == steps:
                    x = self.adams_step(x, s, t, history[-p:], 0.0, None)
                    break
                tau_t = float(tau(t.t))
                x_pred = self.adams_step(x, s, t, history[-p:], tau_t, noise)
                value = self._x0(x_pred, t)
                if corrector_order > 0:
                    x = self.adams_step(x, s, t, (history + [(t, value)])[-q:], tau_t, noise)
                    if pc_mode == "PECE":
                        value = self._x0(x, t)
                else:
                    x = x_pred
                history = (history + [(t, value)])[-keep:]
        return x
