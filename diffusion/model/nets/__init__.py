"""Network definitions (model code only; `diffusion.model.builder` names and builds them)."""
from diffusion.model.nets.PixArt import PixArt
from diffusion.model.nets.PixArtMS import PixArtMS
from diffusion.model.nets.pixart_controlnet import ControlPixArtHalf, ControlPixArtMSHalf

__all__ = ["PixArt", "PixArtMS", "ControlPixArtHalf", "ControlPixArtMSHalf"]
