"""Latent consistency distillation (PIXART-delta) as a training flavour: a student that samples in 1-8 steps without
guidance, distilled from the `--load-from` model, every weight (`LCMFlavour`) or a LoRA adapter (`LCMLoRAFlavour`,
LCM-LoRA, when the config sets `lora` too).

Selected by the config key `lcm = True` (`flavour_from_config`). Three networks take part:
- the teacher: the `--load-from` weights, read from their file at every start (resumes included) into a model of
  its own, frozen, never saved; a checkpoint records its fingerprint, so a resume on other weights is refused;
- the student: the model that trains (it starts as the teacher);
- the target network: an EMA of the student at `ema_decay` (an averaged copy saved with the run as `target`), or
  with `ema_decay = 0` the student itself without gradient (the reference's LCM-LoRA).
One step (`diffusion/model/consistency.py` for the maths): draw per sample a step n of the `num_ddim_timesteps`
DDIM grid, t_start = grid[n], t_end = max(t_start - 1000 // N, 0), and x_t = q(x_0, t_start, noise); the student's
prediction is c_skip x_t + c_out x0(x_t); the teacher, guided with w = `cfg_scale` in the LCM paper's form
(x0 = x0_c + w (x0_c - x0_u), likewise eps), takes one DDIM step to x_prev; the target is c_skip x_prev + c_out x0
of the target network at (x_prev, t_end); the loss is the pseudo-Huber (`huber_c`) or L2 (`loss_type`) distance.

Differences from the reference's train_pixart_lcm.py / train_pixart_lcm_lora.py (SPEC section 9): the teacher's
unconditional half reads the null caption with every token kept (the reference gave it the prompt's mask); the
randomness is per sample (seed, epoch, record) like every flavour's; the LoRA rank is the config's `lora.rank` (the
reference's LCM-LoRA script ignored its --lora_rank flag); the LCM-LoRA teacher's null caption is the model's
`y_embedding`, as for full LCM (the reference's LCM-LoRA encodes the empty prompt with T5 instead).
"""
import contextlib
from pathlib import Path

import torch

from diffusion.model.builder import build_model_from_config
from diffusion.model.consistency import (
    DDIMSolver,
    consistency_distances,
    consistency_loss,
    consistency_output,
    lcm_guidance,
)
from diffusion.model.lora import fingerprint
from diffusion.release import VAE_DOWNSAMPLE
from diffusion.train.flavour import TrainingFlavour
from diffusion.train.lora import LoRAFlavour
from diffusion.train.randomness import draw_for_samples
from diffusion.utils.checkpoint import CheckpointError, load_state_dict_into, read_checkpoint, read_state_dict

TARGET = "target"    # the averaged copy of the student the targets come from
TEACHER = "teacher"  # the frozen module
DISTILLED_FLAVOURS = ("lcm", "lcm-lora")  # checkpoints of these sample with the lcm sampler


def is_distilled_checkpoint(path):
    """Whether `path` is a training checkpoint of an LCM or LCM-LoRA run (read memory-mapped: no weights are
    loaded). Other files, released ones and safetensors included, are not."""
    if Path(path).suffix == ".safetensors":
        return False
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except CheckpointError:  # e.g. a file in torch's legacy format, which cannot be mapped: not one of ours
        return False
    flavour = checkpoint.get("flavour")
    return isinstance(flavour, dict) and flavour.get("name") in DISTILLED_FLAVOURS


def load_teacher(cfg, load_from):
    """The teacher: the config's model with the weights of `load_from` (what --load-from reads), strictly, frozen,
    in eval mode."""
    if not load_from:
        raise CheckpointError("LCM distillation needs the teacher's weights: give --load-from CKPT (or load_from)")
    teacher = build_model_from_config(cfg, grad_checkpointing=False)  # it never computes gradients
    load_state_dict_into(teacher, read_state_dict(load_from), strict=True, source=f"{load_from} (the LCM teacher)")
    return teacher.eval().requires_grad_(False)


def mixed_precision_autocast(cfg, device):
    """The autocast the accelerate-prepared student runs under, for the teacher and the target network."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def teacher_ddim_step(teacher, diffusion, solver, x_t, index, y, mask, data_info, drop, cfg, device):
    """x_prev: one DDIM step of the teacher, guided with w = cfg.cfg_scale in the LCM paper's form, from x_t at the
    grid's step `index` to its previous step. The prompt (its mask, the samples' `drop` of caption dropout) and the
    null caption (`y_embedding` with every token kept) run as one batch [cond; uncond]."""
    B, channels = len(x_t), x_t.shape[1]
    t_start, _ = solver.skip(index)
    null = teacher.y_embedder.y_embedding[None].expand(B, -1, -1).to(y.dtype)
    x_both, t_both = torch.cat([x_t, x_t]), torch.cat([t_start, t_start])
    with mixed_precision_autocast(cfg, device):
        eps = teacher(x_both, t_both, torch.cat([y, null]), torch.cat([mask, torch.ones_like(mask)]),
                      data_info={k: torch.cat([v, v]) for k, v in data_info.items()},
                      force_drop_ids=torch.cat([drop, torch.zeros_like(drop)]))[:, :channels].float()
    x0 = diffusion._predict_xstart_from_eps(x_both, t_both, eps)
    (eps_c, eps_u), (x0_c, x0_u) = eps.chunk(2), x0.chunk(2)
    return solver.step(lcm_guidance(x0_c, x0_u, cfg.cfg_scale), lcm_guidance(eps_c, eps_u, cfg.cfg_scale), index)


class LCMFlavour(TrainingFlavour):
    """Consistency distillation of every weight of the loaded model (see the module docstring)."""

    name = "lcm"
    fine_tunes_loaded_weights = True  # the student starts as the teacher, which every start reads again

    def __init__(self):
        self.teacher_fingerprint = None

    def averaged_copies(self, cfg):
        return {TARGET: cfg.ema_decay} if cfg.ema_decay > 0 else {}

    def frozen_modules(self, cfg, device, load_from=None):
        teacher = load_teacher(cfg, load_from)
        self.teacher_fingerprint = fingerprint(teacher.state_dict())
        return {TEACHER: teacher.to(device)}

    def loss(self, model, diffusion, batch, epoch, cfg, device, vae=None, companions=None):
        """The consistency loss of one micro-batch, and per-sample terms (`distance`: each sample's mean distance,
        `ddim_index`: its DDIM step n)."""
        solver = DDIMSolver(diffusion.alphas_cumprod, cfg.num_ddim_timesteps)
        x, y, mask, data_info = batch
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        if y.ndim == 4:
            y = y.squeeze(1)
        mask = mask.reshape(len(y), -1)
        if cfg.data.get("load_vae_feat", True):
            latent_shape = (x.shape[1] // 2, *x.shape[-2:])
        else:
            latent_shape = (vae.config.latent_channels, *(s // VAE_DOWNSAMPLE for s in x.shape[-2:]))
        # per sample: the DDIM step n (drawn where full training draws its timestep), dropout, noise, posterior noise
        draws = draw_for_samples(data_info["index"], epoch, cfg.seed, latent_shape, len(solver),
                                 cfg.class_dropout_prob, device)
        latent = self.latents(x, draws.posterior_noise, cfg, vae)
        channels = latent.shape[1]
        info = {k: data_info[k].to(device) for k in ("img_hw", "aspect_ratio")}
        index = draws.timesteps
        t_start, t_end = solver.skip(index)
        x_t = diffusion.q_sample(latent, t_start, noise=draws.noise)

        eps = model(x_t, t_start, y, mask, data_info=info, force_drop_ids=draws.drop)[:, :channels]
        prediction = consistency_output(x_t, diffusion._predict_xstart_from_eps(x_t, t_start, eps), t_start)

        with torch.no_grad():
            teacher = companions[TEACHER]
            x_prev = teacher_ddim_step(teacher, diffusion, solver, x_t, index, y, mask, info, draws.drop, cfg, device)
            target_net = companions.get(TARGET, model)  # ema_decay 0: the student itself
            with mixed_precision_autocast(cfg, device):
                x_prev32 = x_prev.float()
                eps_target = target_net(x_prev32, t_end, y, mask, data_info=info,
                                        force_drop_ids=draws.drop)[:, :channels].float()
            x0_target = diffusion._predict_xstart_from_eps(x_prev32, t_end, eps_target)
            target = consistency_output(x_prev, x0_target, t_end)  # float64 like x_prev, as the reference's

        loss = consistency_loss(prediction, target, cfg.loss_type, cfg.huber_c)
        with torch.no_grad():
            distances = consistency_distances(prediction, target, cfg.loss_type, cfg.huber_c)
        return loss, {"distance": distances, "ddim_index": index}

    def extra_state(self):
        return {**super().extra_state(), "teacher_fingerprint": self.teacher_fingerprint}

    def load_extra_state(self, state):
        super().load_extra_state(state)
        if state.get("teacher_fingerprint") != self.teacher_fingerprint:
            saved = str(state.get("teacher_fingerprint"))[:12]
            raise CheckpointError(f"the checkpoint was distilled from another teacher (fingerprint {saved}, this run's "
                                  f"--load-from {self.teacher_fingerprint[:12]}); resume with the --load-from (or "
                                  "load_from) the run started with")


class LCMLoRAFlavour(LCMFlavour, LoRAFlavour):
    """LCM-LoRA: the consistency loss of `LCMFlavour` training one LoRA adapter on the frozen loaded model (LoRA's
    hooks: what trains, what is saved, the base weights' fingerprint). The teacher is a model of its own, read from
    the same file."""

    name = "lcm-lora"

    def __init__(self, lora):
        LCMFlavour.__init__(self)
        LoRAFlavour.__init__(self, lora)
