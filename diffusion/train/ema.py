"""Exponential moving average of the model weights, kept in fp32 and updated every optimizer step."""
import copy

import torch


class EMA:
    """`ema = rate * ema + (1 - rate) * weights` for every parameter; buffers are copied."""

    def __init__(self, model, rate):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"ema_rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        ema_params = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA and model have different parameters")
        torch._foreach_lerp_(ema_params, params, 1.0 - self.rate)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state_dict):
        self.model.load_state_dict(state_dict, strict=True)
