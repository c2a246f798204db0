"""Classifier-free guidance: the one place where a model's conditional and unconditional predictions meet.

A sampler sees a model as `model_fn(x, timestep) -> output`, x (B, C, H, W), timestep (B,) in the model's
discrete time, output (B, C or 2C, H, W). `guided_model` makes such a function from a model and its inputs:
with guidance it runs one batch of [cond; uncond] (2B) and combines the halves with `apply_guidance`.
Every input is passed by name; per-sample tensors are concatenated explicitly, never guessed from shapes,
so extra inputs (a ControlNet condition, say) pass through the same path.
"""
from collections.abc import Mapping

import torch


def apply_guidance(out, scale, guided_channels=None):
    """Model output on a [cond; uncond] batch (2B, ...) -> the same layout with the first `guided_channels`
    channels (default: all) of both halves replaced by uncond + scale (cond - uncond). The other channels
    (PixArt's variance values) are left as each half computed them, as the reference's `forward_with_cfg`."""
    guided_channels = out.shape[1] if guided_channels is None else guided_channels
    eps, rest = out[:, :guided_channels], out[:, guided_channels:]
    cond, uncond = eps.chunk(2)
    half = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([half, half]), rest], dim=1)


def cfg_inputs(cond, uncond, batch_size):
    """The model inputs of a [cond; uncond] batch from those of each half (mappings with the same keys).

    Tensors must have the batch `batch_size` in both halves and are concatenated; mappings (`data_info`)
    are handled key by key; any other value (a flag, a LoRA scale) must be equal in both and is passed once."""
    if set(cond) != set(uncond):
        raise ValueError(f"conditional and unconditional inputs differ in keys: {sorted(cond)} against {sorted(uncond)}")
    joined = {}
    for key, value in cond.items():
        other = uncond[key]
        if isinstance(value, Mapping):
            joined[key] = cfg_inputs(value, other, batch_size)
        elif torch.is_tensor(value) or torch.is_tensor(other):
            for half, tensor in (("conditional", value), ("unconditional", other)):
                if not torch.is_tensor(tensor) or tensor.ndim == 0 or tensor.shape[0] != batch_size:
                    shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
                    raise ValueError(f"{half} input {key!r} is {shape}; per-sample inputs need the batch "
                                     f"{batch_size} of the latents")
            joined[key] = torch.cat([value, other.to(value.device)])
        elif value is None and other is None or value == other:
            joined[key] = value
        else:
            raise ValueError(f"input {key!r} is {value!r} for the conditional half and {other!r} for the "
                             "unconditional one; only tensors may differ between the halves")
    return joined


def guided_model(model, inputs, scale=1.0, guided_channels=None):
    """`model_fn(x, timestep)` for samplers: `model(x, timestep, **inputs)`, guided when `scale != 1`.

    With guidance, `inputs` are those of the [cond; uncond] batch (`cfg_inputs`, batch 2B): the model runs
    once on [x; x] and the function returns the guided first half (B, ...). At scale 1 `inputs` are the
    conditional ones (batch B) and the model runs on x alone."""
    if scale == 1.0:
        def conditional(x, timestep):
            return model(x, timestep, **inputs)
        return conditional

    def guided(x, timestep):
        timestep = torch.as_tensor(timestep, device=x.device)
        doubled = torch.cat([timestep, timestep]) if timestep.ndim else timestep
        out = model(torch.cat([x, x]), doubled, **inputs)
        return apply_guidance(out, scale, guided_channels)[:x.shape[0]]
    return guided
