"""Network definitions. Importing this package registers every model with `diffusion.model.builder.MODELS`."""
from diffusion.model.nets.PixArt import PixArt, PixArt_XL_2
from diffusion.model.nets.PixArtMS import PixArtMS, PixArtMS_XL_2

__all__ = ["PixArt", "PixArt_XL_2", "PixArtMS", "PixArtMS_XL_2"]
