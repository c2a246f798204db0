"""Building blocks of PixArt: embedders, attention, the adaLN-single transformer block, the final layer,
and the 2-D sin-cos position table. State-dict names follow the released checkpoints (SPEC section 2)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def t2i_modulate(x, shift, scale):
    return x * (1 + scale) + shift


# The fused forms below run only on CUDA: on the CPU they measured no faster, and there the rounding of the
# vectorised addcmul depends on the batch layout, which would make samples depend on their batch-mates.

def modulate(x, shift, scale, fused):
    """`t2i_modulate`; `fused` computes it as one addcmul kernel instead of three elementwise passes."""
    return torch.addcmul(shift, x, 1 + scale) if fused and x.is_cuda else t2i_modulate(x, shift, scale)


def gated_residual(x, gate, branch, fused):
    """x + gate * branch; `fused` does it in one addcmul kernel instead of two passes over the activations."""
    return torch.addcmul(x, gate, branch) if fused and x.is_cuda else x + gate * branch


def approx_gelu():
    return nn.GELU(approximate="tanh")


#################################################################################
#                         Sine/cosine position table                            #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size, lewei_scale=1.0, base_size=16, device=None):
    """(h*w, embed_dim) float64 table for a token grid (h, w) (an int means square).

    Positions are `arange(n) / (n / base_size) / lewei_scale`; the first half of the channels encodes the
    column (w) coordinate, the second half the row (h) coordinate. Like the reference, positions are
    float32 and the frequencies and sin/cos float64, so non-square grids match it to the last bit.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos positions, got {embed_dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    kw = dict(dtype=torch.float32, device=device)
    grid_h = torch.arange(h, **kw) / (h / base_size) / lewei_scale
    grid_w = torch.arange(w, **kw) / (w / base_size) / lewei_scale
    rows, cols = torch.meshgrid(grid_h.double(), grid_w.double(), indexing="ij")
    emb_w = _1d_sincos(embed_dim // 2, cols.reshape(-1))
    emb_h = _1d_sincos(embed_dim // 2, rows.reshape(-1))
    return torch.cat([emb_w, emb_h], dim=1)


def _1d_sincos(dim, pos):
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = pos[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


#################################################################################
#                                 Embedders                                     #
#################################################################################

class PatchEmbed(nn.Module):
    """Image latent (B, C, H, W) -> tokens (B, H/p * W/p, D) with a strided convolution."""

    def __init__(self, patch_size, in_channels, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        # Contiguous tokens: the transposed view would hand its column-major layout to every residual add
        # after it, and then each LayerNorm and Linear of every block copies its input (measured on the CPU).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoid of scalars t (N,) -> (N, dim), `[cos, sin]`, always computed in float32 so fractional solver
    times are not rounded (the reference casts to the model dtype first; SPEC section 2)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoid(256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t):
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """Micro-conditions (B, k) -> (B, k * outdim): each scalar embedded like a timestep (PixArtMS)."""

    def __init__(self, outdim, frequency_embedding_size=256):
        super().__init__(outdim, frequency_embedding_size)
        self.outdim = outdim

    def forward(self, s, batch_size):
        if s.ndim == 1:
            s = s[:, None]
        s = _repeat_to_batch(s, batch_size, "data_info entry")
        b, k = s.shape
        emb = super().forward(s.reshape(-1))
        return emb.reshape(b, k * self.outdim)


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear, with the released names fc1/fc2."""

    def __init__(self, in_features, hidden_features, out_features=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = approx_gelu()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 features (B, L, C) or (B, 1, L, C) -> (B, L, D), with training-time caption dropout.

    `y_embedding` is the null caption used for classifier-free guidance: a buffer initialised
    randn/sqrt(C), saved in checkpoints and never trained.
    """

    def __init__(self, in_channels, hidden_size, uncond_prob, token_num=120):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels ** 0.5)
        self.uncond_prob = uncond_prob

    def token_drop(self, caption, force_drop_ids=None):
        """Replace whole captions by the null caption: at random with `uncond_prob`, or where
        `force_drop_ids == 1`. Masks are left as they are (SPEC section 2)."""
        if force_drop_ids is None:
            # Drawn on the caption's device with torch's RNG (the reference hard-codes CUDA).
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        else:
            drop = torch.as_tensor(force_drop_ids, device=caption.device) == 1
        null = self.y_embedding.to(caption.dtype)
        return torch.where(drop[:, None, None], null, caption)

    def forward(self, caption, train, force_drop_ids=None, length=None, pack_index=None):
        """(B, L, D) projected tokens, or (T, D) with `pack_index`.

        `length`: project only the first `length` tokens (after dropout, which needs whole captions);
        `pack_index` (T,): project only these tokens of the (B, length) grid, given as flat positions
        b * length + l (see `pack_caption_tokens`)."""
        if caption.ndim == 4:
            caption = caption.squeeze(1)
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            if caption.shape[1:] != self.y_embedding.shape:
                raise ValueError(
                    f"caption dropout needs captions of shape (B, {self.y_embedding.shape[0]}, "
                    f"{self.y_embedding.shape[1]}) like y_embedding, got {tuple(caption.shape)}")
            caption = self.token_drop(caption, force_drop_ids)
        if length is not None:
            caption = caption[:, :length]
        if pack_index is not None:
            caption = caption.reshape(-1, caption.shape[-1]).index_select(0, pack_index)
        return self.y_proj(caption)


def pack_caption_tokens(key_mask):
    """Flat positions b * L + l of the kept tokens of a (B, L) key mask, in order: the index that packs the
    captions' kept tokens into one (T, D) sequence (`CaptionEmbedder`) and scatters their keys and values
    back into the (B, L) grid (`MultiHeadCrossAttention.keys_values`). Costs one host sync on a GPU."""
    return key_mask.reshape(-1).nonzero().squeeze(1)


def _repeat_to_batch(t, batch_size, what):
    """Tile a tensor whose first dimension divides the batch (e.g. one mask for [cond; uncond])."""
    if t.shape[0] == batch_size:
        return t
    if t.shape[0] == 0 or batch_size % t.shape[0]:
        raise ValueError(f"{what} has batch {t.shape[0]}, which does not divide the model batch {batch_size}")
    return t.repeat(batch_size // t.shape[0], *([1] * (t.ndim - 1)))


#################################################################################
#                                 Attention                                     #
#################################################################################

def _attention(q, k, v, attn_mask, fp32_attention):
    """SDPA over (B, heads, N, head_dim); `fp32_attention` runs it in float32 (config key of the reference)."""
    if fp32_attention and q.dtype != torch.float32:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _heads(t, num_heads):
    """(B, N, heads * head_dim) -> (B, heads, N, head_dim) as a view. Splitting a packed projection along its
    last dimension (rather than stacking q, k, v in a new one) lets the backward pass rebuild the packed
    gradient with one concatenation instead of a stack plus a copy."""
    B, N, C = t.shape
    return t.view(B, N, num_heads, C // num_heads).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv projection (q, k, v in that order)."""

    def __init__(self, dim, num_heads, qkv_bias=True, fp32_attention=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fp32_attention = fp32_attention
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (_heads(t, self.num_heads) for t in self.qkv(x).split(C, dim=-1))
        out = _attention(q, k, v, None, self.fp32_attention)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MultiHeadCrossAttention(nn.Module):
    """Image tokens attend to caption tokens; kv_linear packs k then v.

    The reference packs all captions into one sequence with a block-diagonal mask; a per-sample key
    padding mask gives the same numbers without the packing.
    """

    def __init__(self, dim, num_heads, fp32_attention=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fp32_attention = fp32_attention
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, cond, key_mask=None, pack_index=None):
        """Packed keys|values (B, L, 2D) of caption tokens cond (B, L, D); or of packed tokens cond (T, D) with
        their `pack_index` and the (B, L) `key_mask`, scattered into the grid with zeros at the padding
        (masked keys: their values never count)."""
        kv = self.kv_linear(cond)
        if pack_index is None:
            return kv
        B, L = key_mask.shape
        return kv.new_zeros(B * L, kv.shape[-1]).index_copy(0, pack_index, kv).view(B, L, -1)

    def forward(self, x, cond, key_mask=None, pack_index=None, kv=None):
        """x (B, N, D); cond (B, L, D), or packed (T, D) with `pack_index` (see `keys_values`); key_mask (B, L)
        bool of kept caption tokens or None (all kept); kv: this block's `keys_values` when computed
        beforehand (then cond is not read)."""
        B, N, C = x.shape
        q = _heads(self.q_linear(x), self.num_heads)
        if kv is None:
            kv = self.keys_values(cond, key_mask, pack_index)
        k, v = (_heads(t, self.num_heads) for t in kv.split(C, dim=-1))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = _attention(q, k, v, attn_mask, self.fp32_attention)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


#################################################################################
#                             Transformer blocks                                #
#################################################################################

def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention and MLP; self-attention and MLP are modulated by the shared
    adaLN-single vector t0 plus this block's own `scale_shift_table`.

    `fused_modulation`: modulation and gated residuals as single addcmul kernels on CUDA (same math, fewer
    passes over the activations)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, drop_path=0.0, fp32_attention=False,
                 fused_modulation=True):
        super().__init__()
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, fp32_attention=fp32_attention)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads, fp32_attention=fp32_attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = drop_path
        self.fused_modulation = fused_modulation
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, y, t0, key_mask=None, pack_index=None, kv=None):
        """y, key_mask, pack_index, kv: the caption tokens as `MultiHeadCrossAttention.forward` takes them."""
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.reshape(B, 6, -1)).chunk(6, dim=1)
        fused = self.fused_modulation
        x = self._residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa, fused)))
        x = x + self.cross_attn(x, y, key_mask, pack_index, kv)  # no norm and no modulation before cross-attention
        x = self._residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp, fused)))
        return x

    def _residual(self, x, gate, branch):
        if self.drop_path and self.training:
            return x + drop_path(gate * branch, self.drop_path, self.training)
        return gated_residual(x, gate, branch, self.fused_modulation)


class T2IFinalLayer(nn.Module):
    """LayerNorm modulated by the timestep embedding t (not t0), then a linear map to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels, fused_modulation=True):
        super().__init__()
        self.fused_modulation = fused_modulation
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale, self.fused_modulation))
