"""Optimizers, the `auto_lr` rule and learning-rate schedules of the released recipe (SPEC section 8)."""
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("AdamW", "CAME")
LR_SCHEDULES = ("constant", "cosine")


def scaled_lr(lr, effective_batch, auto_lr):
    """`auto_lr=dict(rule='sqrt')`: lr x sqrt(effective batch / 256); `rule='linear'`: x (batch / 256);
    an empty dict (or None) keeps lr. `base_batch_size` may be given in the dict (default 256)."""
    if not auto_lr:
        return lr
    rule = auto_lr.get("rule", "sqrt")
    ratio = effective_batch / auto_lr.get("base_batch_size", 256)
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "linear":
        return lr * ratio
    raise ValueError(f"auto_lr rule must be 'sqrt' or 'linear', got {rule!r}")


def build_optimizer(params, optimizer_cfg, lr, fused=None):
    """AdamW (torch) or CAME (came-pytorch) from a config dict `dict(type=..., lr=..., weight_decay=..., ...)`;
    `lr` is the already-scaled learning rate. `fused=True` asks torch for the fused AdamW kernel."""
    cfg = dict(optimizer_cfg)
    kind = cfg.pop("type")
    cfg.pop("lr", None)
    if kind == "AdamW":
        if fused:
            cfg["fused"] = True
        return torch.optim.AdamW(params, lr=lr, **cfg)
    if kind == "CAME":
        from came_pytorch import CAME
        if not isinstance(cfg.get("eps", ()), (tuple, list)):
            raise ValueError(f"optimizer.eps for CAME is a pair (eps1, eps2), e.g. (1e-30, 1e-16); got {cfg['eps']!r}")
        cfg.setdefault("betas", (0.9, 0.999, 0.9999))
        cfg.setdefault("eps", (1e-30, 1e-16))
        return CAME(params, lr=lr, **cfg)
    raise ValueError(f"optimizer type must be one of {OPTIMIZERS}, got {kind!r}")


def build_lr_scheduler(optimizer, schedule, num_warmup_steps, num_training_steps=None):
    """LambdaLR stepped once per optimizer step: linear warm-up from 0 over `num_warmup_steps`, then constant
    or cosine decay to 0 at `num_training_steps`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "cosine" and not num_training_steps:
        raise ValueError("the cosine schedule needs the total number of optimizer steps")

    def factor(step):
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    return LambdaLR(optimizer, factor)
