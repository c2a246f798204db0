"""ControlNet-Transformer for PixArt (PIXART-delta, arXiv 2401.05252): the "ControlNet-Half" layout.

A frozen base PixArt and trainable copies of its first `copy_blocks_num` blocks. The control latent c
(B or 1, 4, H, W; an edge image in [-1, 1], VAE-encoded and scaled like x) is embedded by the base patch
embedder plus the sin-cos table of its grid. With n copies, B_k the base blocks and C_j the copies:

    x = B_0(x)
    h = C_0(x + before_proj(c_tokens));  x = B_1(x + s * after_proj_0(h))
    h = C_j(h);                           x = B_{j+1}(x + s * after_proj_j(h))     j = 1 .. n-1
    x = B_k(x) for k = n+1 .. depth-1, then the base final layer.

s is `conditioning_scale` (1 = the released behaviour). The projections are zero-initialised Linear(D, D)
layers, so a fresh ControlNet reproduces its base model. State-dict names are the released ones:
`base_model.<PixArt key>`, `controlnet.{j}.copied_block.<block key>`, `controlnet.0.before_proj.*`,
`controlnet.{j}.after_proj.*`.
"""
import copy

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from diffusion.model.guidance import apply_guidance
from diffusion.model.nets.PixArt import PixArt, _run_segment
from diffusion.model.nets.PixArt_blocks import get_2d_sincos_pos_embed
from diffusion.model.nets.PixArtMS import PixArtMS
from diffusion.utils.checkpoint import CheckpointError, load_state_dict_into

CONTROLNET_PREFIXES = ("base_model.", "controlnet.")


class ControlNetError(ValueError):
    """A ControlNet built or called with arguments it cannot take (copy count, base model, control shape)."""


def controlnet_copy_count(state_dict):
    """The copy_blocks_num of a ControlNet state dict (one past its highest `controlnet.{j}.` index); 0 for any
    other state dict."""
    indices = [int(parts[1]) for parts in (k.split(".") for k in state_dict)
               if parts[0] == "controlnet" and len(parts) > 1 and parts[1].isdigit()]
    return max(indices) + 1 if indices else 0


def _zero_linear(dim):
    linear = nn.Linear(dim, dim)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class ControlT2IDitBlockHalf(nn.Module):
    """Copy j of base block j with its zero-initialised output projection `after_proj`; copy 0 also has the
    zero-initialised input projection `before_proj` of the control tokens."""

    def __init__(self, base_block, block_index):
        super().__init__()
        self.block_index = block_index
        self.copied_block = copy.deepcopy(base_block).requires_grad_(True)
        dim = base_block.hidden_size
        if block_index == 0:
            self.before_proj = _zero_linear(dim)
        self.after_proj = _zero_linear(dim)


class ControlPixArtHalf(nn.Module):
    """ControlNet over a single-scale PixArt (the released 512 px model): `ControlPixArtHalf(base_model, 13)`.

    `forward(x, timestep, y, mask=None, data_info=None, c=None, conditioning_scale=1.0)`: the base forward
    (same arguments and output) steered by the control latent `c` (batch B, or 1 shared by every sample);
    `c=None` is the base forward itself. The base model is frozen (requires_grad False), the copies and
    projections are trainable. Weights: `load_weights(state_dict)` takes the released ControlNet layout or
    a plain PixArt checkpoint (then the copies start from the loaded base blocks)."""

    multi_scale = False

    def __init__(self, base_model, copy_blocks_num=13):
        super().__init__()
        if not isinstance(base_model, PixArt) or isinstance(base_model, PixArtMS) != self.multi_scale:
            wanted = ("PixArtMS", "ControlPixArtHalf") if self.multi_scale else ("PixArt", "ControlPixArtMSHalf")
            raise ControlNetError(f"{type(self).__name__} wraps a {wanted[0]}, got {type(base_model).__name__}; "
                                  f"use {wanted[1]} for that model")
        depth = len(base_model.blocks)
        # Copy j feeds base block j+1, so the last copy needs a base block after it: at most depth-1 copies.
        if not isinstance(copy_blocks_num, int) or not 1 <= copy_blocks_num <= depth - 1:
            raise ControlNetError(f"copy_blocks_num must be an integer in 1..{depth - 1} for a {depth}-block base "
                                  f"(copy j feeds base block j+1), got {copy_blocks_num!r}")
        self.base_model = base_model.requires_grad_(False)
        self.copy_blocks_num = copy_blocks_num
        self.total_blocks_num = depth
        self.controlnet = nn.ModuleList(ControlT2IDitBlockHalf(base_model.blocks[i], i)
                                        for i in range(copy_blocks_num))
        if base_model.compile_blocks:
            for branch in self.controlnet:
                branch.copied_block.compile()  # a deep copy drops the base block's compiled call

    # ------------------------------------------------------- the base model's description
    in_channels = property(lambda self: self.base_model.in_channels)
    out_channels = property(lambda self: self.base_model.out_channels)
    input_size = property(lambda self: self.base_model.input_size)
    patch_size = property(lambda self: self.base_model.patch_size)
    hidden_size = property(lambda self: self.base_model.hidden_size)
    depth = property(lambda self: self.base_model.depth)
    lewei_scale = property(lambda self: self.base_model.lewei_scale)
    base_size = property(lambda self: self.base_model.base_size)
    pred_sigma = property(lambda self: self.base_model.pred_sigma)
    caption_channels = property(lambda self: self.base_model.caption_channels)
    model_max_length = property(lambda self: self.base_model.model_max_length)
    y_embedder = property(lambda self: self.base_model.y_embedder)
    dtype = property(lambda self: self.base_model.dtype)

    def cfg_compat_options(self, cfg_compat):
        return self.base_model.cfg_compat_options(cfg_compat)

    # ------------------------------------------------------------------------ forward
    def forward(self, x, timestep, y, mask=None, data_info=None, c=None, conditioning_scale=1.0,
                force_drop_ids=None):
        if c is None:
            return self.base_model(x, timestep, y, mask, data_info, force_drop_ids)
        base = self.base_model
        tokens, captions, t, t0, (h, w) = base.embed_inputs(x, timestep, y, mask, data_info, force_drop_ids)
        control = self.embed_control(c, x)
        tokens = self._run_blocks(tokens, control, captions, t0, conditioning_scale)
        return base.decode_tokens(tokens, t, h, w)

    def embed_control(self, c, x):
        """Control tokens (B, h*w, D) of the control latent `c` for latents `x`: the frozen base patch embedder
        plus the sin-cos table of the grid. A control of batch 1 is shared by every sample."""
        B, C, H, W = x.shape
        if not torch.is_tensor(c) or c.ndim != 4 or tuple(c.shape[1:]) != (C, H, W) or c.shape[0] not in (1, B):
            shape = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
            raise ControlNetError(f"control latent c must be (1 or {B}, {C}, {H}, {W}) like the latents, got {shape}")
        return self.forward_c(c.to(x.device).expand(B, -1, -1, -1))

    def forward_c(self, c):
        """The reference's name: tokens (B, h*w, D) of a control latent c (B, C, H, W) on its own grid, the base
        patch embedder plus the sin-cos table of that grid (for the training grid: the base's `pos_embed`)."""
        base = self.base_model
        c = c.to(base.dtype)
        grid = (c.shape[-2] // base.patch_size, c.shape[-1] // base.patch_size)
        pos = get_2d_sincos_pos_embed(base.hidden_size, grid, base.lewei_scale, base.base_size, device=c.device)
        return base.x_embedder(c) + pos.float()[None].to(base.dtype)

    def _run_blocks(self, x, control, captions, t0, scale):
        blocks, depth, n = self.base_model.blocks, self.total_blocks_num, self.copy_blocks_num
        kv = captions.kv
        if kv is not None and len(kv) not in (depth, depth + n):
            raise ControlNetError(f"encoded captions carry keys/values of {len(kv)} blocks; this ControlNet has "
                                  f"{depth} base blocks and {n} copies: encode them with its encode_captions")
        base_kv = kv[:depth] if kv is not None else [None] * depth
        copy_kv = kv[depth:] if kv is not None and len(kv) == depth + n else [None] * n

        x = self._run_block(blocks[0], x, captions, t0, base_kv[0])
        h = x + self.controlnet[0].before_proj(control)
        for j, branch in enumerate(self.controlnet):
            h = self._run_block(branch.copied_block, h, captions, t0, copy_kv[j])
            x = self._run_block(blocks[j + 1], x + scale * branch.after_proj(h), captions, t0, base_kv[j + 1])
        for k in range(n + 1, depth):
            x = self._run_block(blocks[k], x, captions, t0, base_kv[k])
        return x

    def _run_block(self, block, x, captions, t0, kv):
        base = self.base_model
        eager = base.compile_blocks and not x.is_cuda  # as PixArt._run_blocks: compiled blocks run on CUDA only
        args = ([block], x, captions.tokens, t0, captions.key_mask, captions.pack_index,
                None if kv is None else [kv], eager)
        if base.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(_run_segment, *args, use_reentrant=False)
        return _run_segment(*args)

    def encode_captions(self, y, mask=None):
        """The base model's `encode_captions` plus the copies' cross-attention keys and values: captions encoded
        once for every step of a sampler (pass the result as `y`)."""
        captions = self.base_model.encode_captions(y, mask)
        copies = [branch.copied_block.cross_attn.keys_values(captions.tokens, captions.key_mask, captions.pack_index)
                  for branch in self.controlnet]
        return captions._replace(kv=captions.kv + copies)

    def forward_with_dpmsolver(self, x, timestep, y, data_info=None, c=None, **kwargs):
        """The eps part of the output only, as DPM-Solver and SA-Solver expect (the official argument order)."""
        return self.forward(x, timestep, y, data_info=data_info, c=c, **kwargs)[:, :self.in_channels]

    def forward_with_cfg(self, x, timestep, y, cfg_scale, data_info=None, c=None, mask=None, cfg_compat="fixed",
                         conditioning_scale=1.0):
        """Classifier-free guidance in one batch, x = [z; z], y = [cond; uncond], as `PixArt.forward_with_cfg`.
        The control steers both halves (the reference drops it here): c of batch 1, B (doubled here) or 2B."""
        guided_channels, keep_mask = self.cfg_compat_options(cfg_compat)
        half = x[: len(x) // 2]
        if c is not None and c.shape[0] == len(half) and len(half) > 1:
            c = torch.cat([c, c])
        out = self.forward(torch.cat([half, half]), timestep, y, mask if keep_mask else None, data_info, c=c,
                           conditioning_scale=conditioning_scale)
        return apply_guidance(out, cfg_scale, guided_channels)

    # ------------------------------------------------------------------------ weights
    def load_weights(self, state_dict, source="<state dict>"):
        """Load a state dict strictly and return its LoadReport. The layout is told by the keys: the released
        ControlNet layout (every key under `base_model.` / `controlnet.`) loads as it is; a plain PixArt state
        dict (no such key) loads into `base_model`, then every copy restarts from its loaded base block with
        zero projections (listed as `derived` in the report). Anything else is a CheckpointError naming keys."""
        keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
        ours = [k for k in keys if k.startswith(CONTROLNET_PREFIXES)]
        if len(ours) == len(keys):
            return load_state_dict_into(self, state_dict, strict=True, source=source)
        if ours:
            others = [k for k in keys if not k.startswith(CONTROLNET_PREFIXES)]
            raise CheckpointError(
                f"{source} mixes the ControlNet layout (e.g. {ours[:3]}) with other keys (e.g. {others[:3]}, "
                f"{len(others)} keys): expected every key under {CONTROLNET_PREFIXES} (a ControlNet checkpoint) "
                "or none (a plain PixArt checkpoint)")
        report = load_state_dict_into(self.base_model, state_dict, strict=True, source=source)
        self.reset_controlnet()
        report.derived = [k for k in self.state_dict() if k.startswith("controlnet.")]
        return report

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """torch's `load_state_dict`, also for the reference's call with a plain PixArt state dict (no key under
        `base_model.` / `controlnet.`): that loads into `base_model` and restarts the copies from it, where the
        reference renamed the keys to a module that does not exist. `load_weights` checks more and reports."""
        if state_dict and not any(k.startswith(CONTROLNET_PREFIXES) for k in state_dict):
            result = self.base_model.load_state_dict(state_dict, strict=strict, assign=assign)
            self.reset_controlnet()
            return result
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def reset_controlnet(self):
        """Restart the control branch from the base model: copy j = base block j, zero projections."""
        for j, branch in enumerate(self.controlnet):
            branch.copied_block.load_state_dict(self.base_model.blocks[j].state_dict())
            for name in ("before_proj", "after_proj"):
                if hasattr(branch, name):
                    nn.init.zeros_(getattr(branch, name).weight)
                    nn.init.zeros_(getattr(branch, name).bias)


class ControlPixArtMSHalf(ControlPixArtHalf):
    """ControlNet over a multi-scale PixArtMS (the released 1024 px model); `data_info` as PixArtMS."""

    multi_scale = True
