"""PixArt: a DiT with cross-attention to T5 caption features and adaLN-single timestep conditioning
(PixArt-alpha, arXiv 2310.00426). Math, initialisation and state-dict names as SPEC sections 2-3."""
from contextlib import nullcontext
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from diffusion.model.guidance import apply_guidance
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
    `torch.compile` (CUDA; the state-dict keys are unchanged). For samplers, `encode_captions(y, mask)`
    computes the caption projection and every block's keys and values once; pass its result as `y`.
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
        x, captions, t, t0, (h, w) = self.embed_inputs(x, timestep, y, mask, data_info, force_drop_ids)
        x = self._run_blocks(x, captions, t0)
        return self.decode_tokens(x, t, h, w)

    def embed_inputs(self, x, timestep, y, mask=None, data_info=None, force_drop_ids=None):
        """Everything of a forward before the blocks: (tokens (B, h*w, D), CaptionTokens, t, t0, (h, w)).
        Split out so that a wrapper (the ControlNet) can run its own block loop between this and
        `decode_tokens`."""
        B = x.shape[0]
        h, w = self._token_grid(x)
        dtype = self.dtype
        x = x.to(dtype)
        if isinstance(y, CaptionTokens):
            if mask is not None or force_drop_ids is not None:
                raise ValueError("encoded captions (encode_captions) carry their mask and no dropout; pass mask=None "
                                 "and force_drop_ids=None with them")
            captions = y
        else:
            if y.shape[0] != B:
                raise ValueError(f"caption batch {y.shape[0]} differs from latent batch {B}")
            captions = self.embed_captions(y.to(dtype), mask, B, force_drop_ids)
        if captions.batch_size != B:
            raise ValueError(f"encoded caption batch {captions.batch_size} differs from latent batch {B}")
        x = self.x_embedder(x) + self.position_embedding(h, w, x.device).to(dtype)
        t = self.t_embedder(self._timesteps(timestep, B, x.device))
        t = self.add_micro_conditions(t, data_info, B)
        t0 = self.t_block(t)
        return x, captions, t, t0, (h, w)

    def decode_tokens(self, x, t, h, w):
        """Everything of a forward after the blocks: the final layer, then tokens -> (B, out_channels, H, W)."""
        return self.unpatchify(self.final_layer(x, t), h, w)

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
        return CaptionTokens(tokens, key_mask, pack_index, batch=batch_size)

    def encode_captions(self, y, mask=None):
        """Captions (B, L, C) or (B, 1, L, C) and their mask, encoded once for many forwards: the caption
        projection and every block's cross-attention keys and values. Samplers call the model 20-100 times
        with one caption batch; pass the result as `y` (with mask=None) instead of the features.
        Valid for the weights it was computed with; no caption dropout."""
        if y.ndim == 4:
            y = y.squeeze(1)
        captions = self.embed_captions(y.to(self.dtype), mask, y.shape[0])
        kv = [block.cross_attn.keys_values(captions.tokens, captions.key_mask, captions.pack_index)
              for block in self.blocks]
        return captions._replace(kv=kv)

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
        guided_channels, keep_mask = self.cfg_compat_options(cfg_compat)
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), timestep, y, mask if keep_mask else None, data_info)
        return apply_guidance(out, cfg_scale, guided_channels)

    def cfg_compat_options(self, cfg_compat):
        """(guided channels, keep the caption mask) of a `cfg_compat` mode: ours guides all latent channels
        with the mask; "official" is the reference's `forward_with_cfg` (channels 0-2; PixArtMS drops the mask)."""
        if cfg_compat not in CFG_COMPAT_MODES:
            raise ValueError(f"cfg_compat must be one of {CFG_COMPAT_MODES}, got {cfg_compat!r}")
        if cfg_compat == "official":
            return 3, not self.official_cfg_drops_mask
        return self.in_channels, True

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
        tokens, key_mask, pack_index, kv, _ = captions
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
    batch: int = None

    @property
    def batch_size(self):
        return self.batch if self.batch is not None else self.tokens.shape[0]


def _run_segment(blocks, x, y, t0, key_mask, pack_index, kv, force_eager=False):
    # The stance is set in here so that checkpoint recomputation runs the same (eager or compiled) code.
    with torch.compiler.set_stance("force_eager") if force_eager else nullcontext():
        for i, block in enumerate(blocks):
            x = block(x, y, t0, key_mask, pack_index, None if kv is None else kv[i])
    return x
