"""Exponential moving average of the model weights, kept in fp32 and updated every optimizer step."""
import copy

import torch


class EMA:
    """`ema = rate * ema + (1 - rate) * weights` for every trainable parameter; buffers are copied. Frozen
    parameters never change, so their copies stay equal to them without the work (LoRA freezes the whole base)."""

    def __init__(self, model, rate):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"ema_rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        ema_params, params = list(self.model.parameters()), list(model.parameters())
        if len(ema_params) != len(params):
            raise ValueError("EMA and model have different parameters")
        pairs = [(e, p.detach().float()) for e, p in zip(ema_params, params) if p.requires_grad]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - self.rate)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state_dict):
        self.model.load_state_dict(state_dict, strict=True)
