"""PixArtMS: PixArt for any latent H x W, with image-size and aspect-ratio micro-conditions (SPEC section 4)."""
import torch

from diffusion.model.nets.PixArt import PixArt
from diffusion.model.nets.PixArt_blocks import SizeEmbedder, get_2d_sincos_pos_embed


class PixArtMS(PixArt):
    """Multi-scale PixArt. `data_info = {'img_hw': (B, 2) [h, w] pixels, 'aspect_ratio': (B, 1) h/w}` is
    required; a first dimension that divides B is tiled. Training passes the original image size and the
    bucket ratio, inference the bucket size and ratio. Positions are recomputed for the actual token grid."""

    # The reference's PixArtMS.forward_with_cfg drops the caption mask; only cfg_compat="official" copies that.
    official_cfg_drops_mask = True

    def __init__(self, hidden_size=1152, **kwargs):
        if hidden_size % 3:
            raise ValueError(f"PixArtMS needs hidden_size divisible by 3 (size, size, ratio), got {hidden_size}")
        super().__init__(hidden_size=hidden_size, **kwargs)
        self.csize_embedder = SizeEmbedder(hidden_size // 3)
        self.ar_embedder = SizeEmbedder(hidden_size // 3)
        for embedder in (self.csize_embedder, self.ar_embedder):
            for linear in (embedder.mlp[0], embedder.mlp[2]):
                # Same scheme as the rest of initialize_weights(): N(0, 0.02) weights, zero bias.
                torch.nn.init.normal_(linear.weight, std=0.02)
                torch.nn.init.zeros_(linear.bias)

    def forward_with_dpmsolver(self, x, timestep, y, data_info=None, **kwargs):
        """The eps part of the output only (the reference takes data_info as the 4th argument here)."""
        return self.forward(x, timestep, y, data_info=data_info, **kwargs)[:, :self.in_channels]

    def position_embedding(self, h, w, device):
        if (h, w) == (self.base_size, self.base_size):
            return self.pos_embed
        pos = get_2d_sincos_pos_embed(self.hidden_size, (h, w), self.lewei_scale, self.base_size, device=device)
        return pos.float().unsqueeze(0)

    def add_micro_conditions(self, t, data_info, batch_size):
        if data_info is None or "img_hw" not in data_info or "aspect_ratio" not in data_info:
            raise ValueError("PixArtMS needs data_info={'img_hw': (B, 2) [h, w], 'aspect_ratio': (B, 1) h/w}, "
                             f"got {None if data_info is None else sorted(data_info)}")
        img_hw = torch.as_tensor(data_info["img_hw"], device=t.device).float()
        ratio = torch.as_tensor(data_info["aspect_ratio"], device=t.device).float()
        if img_hw.ndim == 1:
            img_hw = img_hw[None]
        if img_hw.ndim != 2 or img_hw.shape[1] != 2:
            raise ValueError(f"data_info['img_hw'] must have shape (B, 2), got {tuple(img_hw.shape)}")
        ratio = ratio.reshape(ratio.shape[0] if ratio.ndim else 1, -1)
        if ratio.shape[1] != 1:
            raise ValueError(f"data_info['aspect_ratio'] must have shape (B, 1), got {tuple(ratio.shape)}")
        csize = self.csize_embedder(img_hw, batch_size)
        ar = self.ar_embedder(ratio, batch_size)
        return t + torch.cat([csize, ar], dim=1).to(t.dtype)
