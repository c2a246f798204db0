"""Measure each sampler's error on Gaussian data, whose exact noise predictor and ODE solution are known.

The data are two independent channels, N(0.5, 0.5^2) and N(-0.3, 0.8^2), under PixArt's linear schedule.
For every sampler and step count the table gives the error of the sample mean (in units of the data
std) and of the sample std (relative), the worse channel of the two; for deterministic samplers also
the RMS distance to the exact ODE solution from the same x_T (in units of the data std). Deterministic
samplers start from normal quantiles so that their statistics carry no sampling noise; stochastic ones
carry a sampling error of about 1/sqrt(samples) in mean and 1/sqrt(2 samples) in std.

    python tools/sampler_accuracy.py [--samples 100000] [--steps 5 10 20] [--seed 0]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse

import torch

from diffusion import DPMS, IDDPM, SASolverSampler
from diffusion.model.diffusion_utils import GaussianDataDenoiser

MEAN, STD = (0.5, -0.3), (0.5, 0.8)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000, help="samples per sampler and step count")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20], help="step counts to measure")
    parser.add_argument("--seed", type=int, default=0, help="seed of x_T and of the samplers' noise")
    return parser.parse_args()


def quantile_noise(samples: int, seed: int) -> torch.Tensor:
    """Standard normal quantiles, shuffled per channel: x_T whose mean and std are exact."""
    levels = (torch.arange(samples, dtype=torch.float64) + 0.5) / samples
    quantiles = torch.special.ndtri(levels)
    gen = torch.Generator().manual_seed(seed)
    columns = [quantiles[torch.randperm(samples, generator=gen)] for _ in MEAN]
    return torch.stack(columns, dim=1).view(samples, len(MEAN), 1, 1)


def statistics_error(x: torch.Tensor):
    """Worst-channel |mean - true| / std and |std - true| / std of samples x."""
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    x = x.double().flatten(2).squeeze(2)
    return (((x.mean(0) - mean).abs() / std).max().item(), ((x.std(0) - std).abs() / std).max().item())


def ode_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    """RMS distance to the exact ODE solution, in units of the data std (worst channel)."""
    std = torch.tensor(STD, dtype=torch.float64)
    rms = (x.double() - exact.double()).flatten(2).squeeze(2).pow(2).mean(0).sqrt()
    return (rms / std).max().item()


def measure(toy: GaussianDataDenoiser, steps: int, samples: int, seed: int):
    """{sampler name: (mean error, std error, ODE error or None)} at `steps` steps."""
    x_T = quantile_noise(samples, seed)
    shape = (samples, len(MEAN), 1, 1)
    results = {}

    for respacing, label in ((str(steps), "learned variance (exact)"), (str(steps), "fixed_small")):
        learned = label.startswith("learned")
        diffusion = IDDPM(respacing, learn_sigma=learned, pred_sigma=learned, sigma_small=True)
        model = toy.learned_range_model(diffusion.timestep_map.tolist()) if learned else toy
        x = diffusion.p_sample_loop(model, shape, clip_denoised=False, generator=seed)
        results[f"IDDPM ancestral, {label}"] = (*statistics_error(x), None)

    ddim = IDDPM(f"ddim{steps}", learn_sigma=False, pred_sigma=False)
    x = ddim.ddim_sample_loop(toy, shape, noise=x_T, clip_denoised=False)
    exact = toy.ode_solution(x_T, int(ddim.timestep_map[-1]), 0)  # "ddimN" starts at 1000 - 1000/N
    results["DDIM eta=0 (ddimN)"] = (*statistics_error(x), ode_error(x, exact))

    exact = toy.ode_solution(x_T, 999, 0)
    solver = DPMS(toy, condition=None, uncondition=None, cfg_scale=1.0)
    for skip_type in ("time_uniform", "logSNR"):
        for order in (1, 2, 3):
            x = solver.sample(x_T, steps=steps, order=order, skip_type=skip_type, progress=False)
            results[f"DPM-Solver++ {order}M, {skip_type}"] = (*statistics_error(x), ode_error(x, exact))

    sampler = SASolverSampler(toy)
    x = sampler.sample(steps, samples, shape[1:], eta=0.0, x_T=x_T, progress=False)[0]
    results["SA-Solver eta=0 (ODE)"] = (*statistics_error(x), ode_error(x, exact))
    x = sampler.sample(steps, samples, shape[1:], eta=1.0, generator=seed, progress=False)[0]
    results["SA-Solver eta=1 (default)"] = (*statistics_error(x), None)
    return results


def main():
    args = parse_args()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    toy = GaussianDataDenoiser(torch.cumprod(1 - betas, 0), MEAN, STD)
    table = {steps: measure(toy, steps, args.samples, args.seed) for steps in args.steps}
    names = list(table[args.steps[0]])
    width = max(len(name) for name in names)
    print(f"{'':<{width}} | " + " | ".join(f"{f'{steps} steps':^26}" for steps in args.steps))
    print(f"{'sampler':<{width}} | " + " | ".join(f"{'mean':>8} {'std':>8} {'ODE':>8}" for _ in args.steps))
    for name in names:
        cells = []
        for steps in args.steps:
            mean_err, std_err, ode_err = table[steps][name]
            ode = "-" if ode_err is None else f"{ode_err:.1e}"
            cells.append(f"{mean_err:>8.1e} {std_err:>8.1e} {ode:>8}")
        print(f"{name:<{width}} | " + " | ".join(cells))
    print(f"({args.samples} samples; errors in units of the data std; ODE: RMS distance to the exact "
          "ODE solution from the same x_T)")


if __name__ == "__main__":
    main()
