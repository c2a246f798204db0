"""Latent consistency distillation (LCM, Luo et al. 2023; PIXART-delta): the maths of one distillation step.

A consistency model f(x_t, t) maps any point of a probability-flow ODE trajectory to its origin. It is
parameterised by the boundary scalings, f = c_skip(t) x_t + c_out(t) x0(x_t, t), so that f(x, 0) = x. Distillation
draws a step of the DDIM grid the teacher solves on, `t_start = grid[n]`, `t_end = max(t_start - T // N, 0)`, and
asks the student's f at (x_{t_start}, t_start) to equal the target network's f at (x_prev, t_end), where x_prev is
one guided DDIM step of the teacher from x_{t_start} to t_end. The training loop is `diffusion/train/lcm.py`; the
sampler of distilled models is `diffusion/lcm_scheduler.py`.
"""
import torch
import torch.nn.functional as F

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0  # t / 0.1: the scalings are almost a step function at t = 0
NUM_DDIM_TIMESTEPS = 50  # the released PixArt-LCM's grid
LOSS_TYPES = ("huber", "l2")


def ddim_timesteps(num_ddim_timesteps=NUM_DDIM_TIMESTEPS, num_train_timesteps=1000):
    """The DDIM grid the teacher is solved on, ascending: `(1..N) * (T // N) - 1` (19, 39, ..., 999 for 50 of
    1000), long."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"need 1 <= num_ddim_timesteps ({num_ddim_timesteps}) <= num_train_timesteps "
                         f"({num_train_timesteps})")
    stride = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * stride - 1


def boundary_scalings(timestep, sigma_data=SIGMA_DATA, timestep_scaling=TIMESTEP_SCALING):
    """(c_skip, c_out) at `timestep` (a number or a tensor): with s = t * timestep_scaling,
    c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s / sqrt(s^2 + sigma_data^2)."""
    # t / 0.1, as the reference divides: t * 10 can differ from it in the last bit
    scaled = timestep / (1.0 / timestep_scaling)
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def _per_sample(values, like):
    """(B,) values shaped (B, 1, ..., 1) to broadcast against `like`."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def consistency_output(x_t, x0, timestep):
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0 for the per-sample timesteps (B,) of a batch."""
    c_skip, c_out = boundary_scalings(timestep)
    return _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * x0


def lcm_guidance(cond, uncond, w):
    """The LCM paper's classifier-free guidance, cond + w (cond - uncond): its w is the usual scale minus 1."""
    if torch.is_tensor(w) and w.ndim == 1:
        w = _per_sample(w, cond)
    return cond + w * (cond - uncond)


class DDIMSolver:
    """One deterministic DDIM step down the grid of `num_ddim_timesteps` of a schedule's (float64) `alphas_cumprod`.

    `timesteps[n]` is grid step n; `skip(n)` gives (t_start, t_end) with t_end = max(t_start - T // N, 0); `step`
    goes from t_start to t_end: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, abar_prev being
    alphas_cumprod[grid[n - 1]], and alphas_cumprod[0] for n = 0. The coefficients stay float64, so x_prev is
    float64 (as the reference's)."""

    def __init__(self, alphas_cumprod, num_ddim_timesteps=NUM_DDIM_TIMESTEPS):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.num_train_timesteps = len(alphas_cumprod)
        self.stride = self.num_train_timesteps // num_ddim_timesteps
        self.timesteps = ddim_timesteps(num_ddim_timesteps, self.num_train_timesteps)
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])

    def __len__(self):
        return len(self.timesteps)

    def skip(self, index):
        """(t_start, t_end) of grid indices (B,), on their device."""
        t_start = self.timesteps.to(index.device)[index]
        return t_start, (t_start - self.stride).clamp(min=0)

    def step(self, x0, eps, index):
        abar_prev = _per_sample(self.alphas_cumprod_prev[index.cpu()].to(x0.device), x0)
        return abar_prev.sqrt() * x0 + (1.0 - abar_prev).sqrt() * eps


def huber_loss(pred, target, huber_c):
    """The pseudo-Huber distance mean(sqrt((pred - target)^2 + c^2) - c): L2-like within c, L1-like beyond."""
    return torch.mean(torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)


def consistency_distances(pred, target, loss_type="huber", huber_c=0.001):
    """Each sample's mean distance (B,), of the kind `consistency_loss` averages over the whole batch."""
    diff = pred.float() - target.float()
    if loss_type == "huber":
        return (torch.sqrt(diff ** 2 + huber_c ** 2) - huber_c).flatten(1).mean(1)
    if loss_type == "l2":
        return (diff ** 2).flatten(1).mean(1)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def consistency_loss(pred, target, loss_type="huber", huber_c=0.001):
    """The distance between the student's and the target's consistency outputs, in fp32: 'huber' (`huber_loss`)
    or 'l2' (the mean squared error)."""
    pred, target = pred.float(), target.float()
    if loss_type == "huber":
        return huber_loss(pred, target, huber_c)
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="mean")
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
