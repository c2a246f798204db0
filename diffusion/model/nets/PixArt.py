"""PixArt: a DiT with cross-attention to T5 caption features and adaLN-single timestep conditioning
(PixArt-alpha, arXiv 2310.00426). Math, initialisation and state-dict names as SPEC sections 2-3."""
from contextlib import contextmanager, nullcontext
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from diffusion.model.builder import MODELS
from diffusion.model.nets.PixArt_blocks import (
    CaptionEmbedder,
    PatchEmbed,
    PixArtBlock,
    T2IFinalLayer,
    TimestepEmbedder,
    _repeat_to_batch,
    get_2d_sincos_pos_embed,
    pack_caption_tokens,
)

CFG_COMPAT_MODES = ("fixed", "official")


class PixArt(nn.Module):
    """PixArt text-to-image transformer for square latents of `input_size` x `input_size`.

    `forward(x, timestep, y, mask=None, data_info=None)`: x (B, C, H, W) latents, timestep (B,) in [0, 1000)
    (float allowed), y (B, L, caption_channels) or (B, 1, L, caption_channels) T5 features, mask (B, L) of
    kept caption tokens (or (B, 1, 1, L); None keeps all). Returns (B, 2C, H, W) (eps, then variance values)
    when `pred_sigma`, else (B, C, H, W). `data_info` is accepted for API compatibility and unused here.
    `force_drop_ids` (B,) replaces the captions where it is 1 by the null caption instead of random caption
    dropout, so a trainer can draw dropout per sample from its own seeded generators.

    Speed options (each leaves the outputs equal up to float rounding; benchmarks in bench/):
    `trim_captions` drops the caption padding that every sample of the batch has at its end before the
    caption projection and cross-attention, and the mask itself when nothing is left padded (so SDPA can
    use its unmasked flash kernels); `pack_captions` projects only the kept caption tokens when captions of
    different lengths share a batch (training), scattering the keys and values back into the padded grid
    for attention (not with `compile`, whose graphs want fixed shapes); `fused_modulation` computes
    modulation and gated residuals as single addcmul kernels (CUDA); `compile` wraps every block in
    `torch.compile` (CUDA; the state-dict keys are unchanged). `caption_cache()` is a context for samplers:
    repeated forwards with the same caption batch reuse its projection and every block's keys and values.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, pred_sigma=True, drop_path=0.0, window_size=0,
                 window_block_indexes=None, use_rel_pos=False, caption_channels=4096, lewei_scale=1.0,
                 model_max_length=120, learn_sigma=True, grad_checkpointing=False, gc_step=1,
                 fp32_attention=False, trim_captions=True, pack_captions=True, fused_modulation=True,
                 compile=False):
        super().__init__()
        # The configs carry these keys but the reference never applies them; refuse rather than ignore.
        if window_size or window_block_indexes or use_rel_pos:
            raise NotImplementedError(
                "windowed attention / relative positions (window_size, window_block_indexes, use_rel_pos) are "
                "not part of PixArt-alpha; the released models use window_size=0, window_block_indexes=[], "
                f"use_rel_pos=False (got {window_size}, {window_block_indexes}, {use_rel_pos})")
        if learn_sigma and not pred_sigma:
            raise ValueError("learn_sigma=True needs pred_sigma=True: the variance is learned from the "
                             "model's extra output channels")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if gc_step < 1:
            raise ValueError(f"gc_step must be >= 1, got {gc_step}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.pred_sigma = pred_sigma
        self.learn_sigma = learn_sigma
        self.lewei_scale = lewei_scale
        self.base_size = input_size // patch_size
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.grad_checkpointing = grad_checkpointing
        self.gc_step = gc_step
        self.trim_captions = trim_captions
        self.pack_captions = pack_captions

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            PixArtBlock(hidden_size, num_heads, mlp_ratio, drop_path=rates[i], fp32_attention=fp32_attention,
                        fused_modulation=fused_modulation)
            for i in range(depth)
        ])
        self.final_layer = T2IFinalLayer(hidden_size, patch_size, self.out_channels, fused_modulation)
        pos = get_2d_sincos_pos_embed(hidden_size, self.base_size, lewei_scale, self.base_size)
        self.register_buffer("pos_embed", pos.float().unsqueeze(0))
        self.initialize_weights()
        self.compile_blocks = compile
        if compile:
            for block in self.blocks:
                # In place, so parameter names stay; all blocks share one compiled graph per input shape.
                block.compile()

    # ---------------------------------------------------------------- init
    def initialize_weights(self):
        """xavier_uniform Linear weights with zero bias; N(0, 0.02) for the timestep, adaLN-single and caption
        projections; zero cross-attention output and final linear. scale_shift_tables keep randn/sqrt(D)."""
        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                       self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def dtype(self):
        return self.x_embedder.proj.weight.dtype

    # ------------------------------------------------------------- forward
    def forward(self, x, timestep, y, mask=None, data_info=None, force_drop_ids=None):
        B = x.shape[0]
        h, w = self._token_grid(x)
        dtype = self.dtype
        x = x.to(dtype)
        if y.shape[0] != B:
            raise ValueError(f"caption batch {y.shape[0]} differs from latent batch {B}")
        x = self.x_embedder(x) + self.position_embedding(h, w, x.device).to(dtype)
        t = self.t_embedder(self._timesteps(timestep, B, x.device))
        t = self.add_micro_conditions(t, data_info, B)
        t0 = self.t_block(t)
        cache_key = self._caption_cache_key(y, mask, B, force_drop_ids)
        captions = self._cached_captions(y, mask, cache_key)
        if captions is None:
            captions = self.embed_captions(y.to(dtype), mask, B, force_drop_ids)
            if cache_key is not None:
                captions = self._cache_captions(y, mask, cache_key, captions)
        x = self._run_blocks(x, captions, t0)
        x = self.final_layer(x, t)
        return self.unpatchify(x, h, w)

    def embed_captions(self, y, mask, batch_size, force_drop_ids=None):
        """The caption side of a forward: `CaptionTokens` with the projected tokens, the key mask (None when
        nothing is masked) and, when packed, the pack index. Caption dropout happens here in training."""
        key_mask = self._caption_mask(mask, batch_size, y.shape[-2], y.device)
        length = pack_index = None
        optimise = not torch.compiler.is_compiling()
        if self.trim_captions and key_mask is not None and optimise:
            key_mask, length = trim_caption_padding(key_mask)
        # Packing makes the token count vary from batch to batch: not for compiled blocks (recompilation).
        if self.pack_captions and key_mask is not None and optimise and not self.compile_blocks:
            pack_index = pack_caption_tokens(key_mask)
        tokens = self.y_embedder(y, self.training, force_drop_ids, length, pack_index)
        return CaptionTokens(tokens, key_mask, pack_index)

    @contextmanager
    def caption_cache(self):
        """Within this context, a forward that gets the very caption tensor and mask of an earlier one (the
        same objects, not modified in place since) reuses that forward's caption work: mask checks and
        trimming, the caption projection and every block's cross-attention keys and values. Samplers call
        the model 20-100 times with one caption batch; `Sampler.sample` uses this. Only no-grad, eval-mode
        forwards without forced caption dropout are cached, and only while the caption weights are the
        ones the entry was computed with; the cache is dropped on exit."""
        previous = self._caption_cache
        self._caption_cache = []
        try:
            yield self
        finally:
            self._caption_cache = previous

    _caption_cache = None  # a list of cache entries inside `caption_cache()`, else None
    CAPTION_CACHE_ENTRIES = 4  # [uncond; cond] batches of a few sampling runs

    def _caption_cache_key(self, y, mask, batch_size, force_drop_ids):
        """What must be unchanged for a cached entry to hold, or None when this forward is not cacheable."""
        if (self._caption_cache is None or self.training or torch.is_grad_enabled() or force_drop_ids is not None
                or torch.compiler.is_compiling() or not torch.is_tensor(y)
                or not (mask is None or torch.is_tensor(mask))):  # a list mask could change unseen
            return None
        weights = [self.y_embedder.y_proj, *(block.cross_attn.kv_linear for block in self.blocks)]
        return (y._version, None if mask is None else mask._version, batch_size, self.dtype,
                tuple((p.data_ptr(), p._version) for module in weights for p in module.parameters()))

    def _cached_captions(self, y, mask, key):
        if key is None:
            return None
        for entry_y, entry_mask, entry_key, captions in self._caption_cache:
            if entry_y is y and entry_mask is mask and entry_key == key:
                return captions
        return None

    def _cache_captions(self, y, mask, key, captions):
        """Adds every block's keys and values to `captions`, stores them and returns them for this forward."""
        kv = [block.cross_attn.keys_values(captions.tokens, captions.key_mask, captions.pack_index)
              for block in self.blocks]
        captions = captions._replace(kv=kv)
        # The entry holds y and mask themselves, so their ids cannot be reused by other tensors while cached.
        self._caption_cache.append((y, mask, key, captions))
        del self._caption_cache[:-self.CAPTION_CACHE_ENTRIES]
        return captions

    def forward_with_dpmsolver(self, x, timestep, y, mask=None, **kwargs):
        """The eps part of the output only, as DPM-Solver and SA-Solver expect."""
        out = self.forward(x, timestep, y, mask, **kwargs)
        return out[:, :self.in_channels]

    def forward_with_cfg(self, x, timestep, y, cfg_scale, mask=None, data_info=None, cfg_compat="fixed"):
        """Classifier-free guidance in one batch: x = [z; z], y = [cond; uncond] captions.

        eps = uncond + cfg_scale * (cond - uncond) on all latent channels, with the prompt's mask for both
        halves. `cfg_compat="official"` reproduces the reference (only channels 0-2 guided; PixArtMS also
        drops the mask) for anyone who must match published samples (SPEC section 9).
        """
        if cfg_compat not in CFG_COMPAT_MODES:
            raise ValueError(f"cfg_compat must be one of {CFG_COMPAT_MODES}, got {cfg_compat!r}")
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        if cfg_compat == "official" and self.official_cfg_drops_mask:
            mask = None
        out = self.forward(combined, timestep, y, mask, data_info)
        guided = 3 if cfg_compat == "official" else self.in_channels
        eps, rest = out[:, :guided], out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    # The reference's PixArt.forward_with_cfg keeps the mask; only PixArtMS's drops it.
    official_cfg_drops_mask = False

    # --------------------------------------------------- hooks for PixArtMS
    def position_embedding(self, h, w, device):
        """The fixed table of the training resolution; PixArt only takes that square grid."""
        if (h, w) != (self.base_size, self.base_size):
            raise ValueError(
                f"PixArt takes latents of {self.input_size}x{self.input_size}, got "
                f"{h * self.patch_size}x{w * self.patch_size}; use PixArtMS for other sizes")
        return self.pos_embed

    def add_micro_conditions(self, t, data_info, batch_size):
        return t

    # ------------------------------------------------------------- helpers
    def _token_grid(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected latents (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"latent size {H}x{W} is not divisible by patch_size {self.patch_size}")
        return H // self.patch_size, W // self.patch_size

    @staticmethod
    def _timesteps(timestep, batch_size, device):
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"timestep must be a scalar or of shape ({batch_size},), got {tuple(t.shape)}")
        return t.float()  # fp32 timesteps: no rounding of fractional solver times (SPEC section 2)

    @staticmethod
    def _caption_mask(mask, batch_size, length, device):
        """(B, L) bool of kept tokens, tiled to the batch, or None when every token is kept."""
        if mask is None:
            return None
        mask = torch.as_tensor(mask, device=device)
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape[1] != length:
            raise ValueError(f"caption mask has {mask.shape[1]} tokens, captions have {length}")
        mask = _repeat_to_batch(mask, batch_size, "caption mask") != 0
        # An all-masked caption would make attention NaN; T5 always keeps at least the EOS token.
        if not torch.compiler.is_compiling() and not bool(mask.any(dim=1).all()):
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"caption mask rows {empty} keep no token; every caption needs at least one")
        return mask

    def _run_blocks(self, x, captions, t0):
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        # Compiled blocks run on CUDA only: on the CPU inductor's code rounds differently for different batch
        # layouts (a sample would depend on its batch-mates), and compiling costs more than it saves there.
        eager = self.compile_blocks and not x.is_cuda
        tokens, key_mask, pack_index, kv = captions
        for start in range(0, len(self.blocks), self.gc_step):
            segment = self.blocks[start:start + self.gc_step]
            segment_kv = None if kv is None else kv[start:start + self.gc_step]
            args = (segment, x, tokens, t0, key_mask, pack_index, segment_kv, eager)
            x = checkpoint(_run_segment, *args, use_reentrant=False) if use_ckpt else _run_segment(*args)
        return x

    def unpatchify(self, x, h=None, w=None):
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p); square when h, w are not given."""
        p, c = self.patch_size, self.out_channels
        if h is None:
            h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)


def trim_caption_padding(key_mask):
    """(key_mask, length): the mask cut after the last token that any sample keeps, and that length; the
    mask becomes None when no padding is left. Masked keys get exactly zero attention weight, so the cut
    changes nothing but the work. Costs one host sync (the length decides tensor shapes)."""
    columns = torch.stack([key_mask.any(dim=0), key_mask.all(dim=0)]).cpu()  # kept by some / by all samples
    length = int(columns[0].nonzero().max()) + 1
    key_mask = key_mask[:, :length]
    return (None if bool(columns[1, :length].all()) else key_mask), length


class CaptionTokens(NamedTuple):
    """The caption side of a forward as the blocks take it: `tokens` projected (B, L, D), or packed (T, D)
    when `pack_index` is given (`pack_caption_tokens`); `key_mask` (B, L) bool, or None when every token is
    kept; `kv` one `keys_values` tensor per block when computed beforehand (the sampling cache), else None."""
    tokens: torch.Tensor
    key_mask: Optional[torch.Tensor]
    pack_index: Optional[torch.Tensor]
    kv: Optional[List[torch.Tensor]] = None


def _run_segment(blocks, x, y, t0, key_mask, pack_index, kv, force_eager=False):
    # The stance is set in here so that checkpoint recomputation runs the same (eager or compiled) code.
    with torch.compiler.set_stance("force_eager") if force_eager else nullcontext():
        for i, block in enumerate(blocks):
            x = block(x, y, t0, key_mask, pack_index, None if kv is None else kv[i])
    return x


#################################################################################
#                                 Presets                                       #
#################################################################################

MODELS.register(PixArt)


XL_2_SHAPE = dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16)


def build_preset(cls, shape, kwargs):
    """`cls(**shape, **kwargs)`; restating a shape argument is allowed only with the preset's value."""
    for key, value in shape.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{cls.__name__} preset fixes {key}={value}, got {key}={kwargs[key]}; "
                             f"build {cls.__name__!r} with model_kwargs for other shapes")
    return cls(**{**kwargs, **shape})


@MODELS.register
def PixArt_XL_2(**kwargs):
    """The released 0.6B model: depth 28, hidden 1152, 16 heads, patch 2."""
    return build_preset(PixArt, XL_2_SHAPE, kwargs)
