"""ControlNet conditions: an image -> the edge map the ControlNet reads -> the control latent `c`.

A condition image is (1, 3, H, W) in [-1, 1], white edges on black. It comes from a photo by one of
`CONDITIONS`: "canny" (OpenCV's Canny, needs no weights), "hed" (the ControlNet annotators' HED network, from a
local checkpoint: `diffusion.model.hed`), or "image" (the file already is an edge map: used as it is). The control
latent is its VAE encoding scaled like the latents x (`control_latent`). Images of another size than the sample are
resized to cover it and center-cropped first, with a `ConditionResizedWarning`.
"""
import warnings

import numpy as np
import torch
from PIL import Image

from diffusion.data.latents import posterior_feature, sample_latent
from diffusion.data.transforms import center_crop, resize_to_cover

CONDITIONS = ("canny", "hed", "image")
# ControlNet's Canny annotator defaults (lllyasviel/ControlNet gradio_canny2image.py).
CANNY_LOW, CANNY_HIGH = 100, 200


class ConditionResizedWarning(UserWarning):
    """The condition image had another size than the sample and was resized (cover, center crop) to it."""


def read_condition_image(path, what="condition image"):
    """The RGB PIL image at `path`, read fully; a missing or unreadable file is an error naming it (`what`)."""
    from pathlib import Path
    from PIL import UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{what} {path} is not a readable image ({err}); expected a PNG, JPEG or other image "
                         "file") from None


def fit_condition_image(image, height, width):
    """A PIL image as RGB of exactly height x width: resized to cover (aspect ratio kept) and center-cropped, with a
    ConditionResizedWarning when its size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        warnings.warn(f"condition image is {image.width}x{image.height} (w x h); resized to cover and center-cropped "
                      f"to the sample's {width}x{height}", ConditionResizedWarning, stacklevel=2)
        image = center_crop(resize_to_cover(image, height, width), height, width)
    return image


def canny_edges(image, low_threshold=CANNY_LOW, high_threshold=CANNY_HIGH):
    """Canny edges (H, W) uint8 in {0, 255} of a PIL image, with OpenCV on the RGB pixels as ControlNet's annotator."""
    import cv2  # opencv-python(-headless): only this condition needs it
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"Canny thresholds need 0 <= low <= high, got low={low_threshold}, high={high_threshold}")
    return cv2.Canny(np.asarray(image.convert("RGB")), low_threshold, high_threshold)


def edges_to_condition(edges):
    """Edges in [0, 1], (H, W) or (B, 1, H, W) -> the condition image (B, 3, H, W) in [-1, 1]."""
    edges = torch.as_tensor(edges, dtype=torch.float32)
    if edges.ndim == 2:
        edges = edges[None, None]
    return (edges * 2 - 1).repeat(1, 3, 1, 1)


def image_to_condition(image):
    """A ready condition image (PIL, white edges on black) -> (1, 3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def make_condition(image, height, width, condition="canny", hed=None, canny_thresholds=(CANNY_LOW, CANNY_HIGH)):
    """The condition image (1, 3, height, width) in [-1, 1] of a PIL image, by `condition` (one of CONDITIONS).
    "hed" needs `hed`, a loaded network (`diffusion.model.hed.load_hed`)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    image = fit_condition_image(image, height, width)
    if condition == "image":
        return image_to_condition(image)
    if condition == "canny":
        return edges_to_condition(torch.from_numpy(canny_edges(image, *canny_thresholds)) / 255.0)
    if hed is None:
        raise ValueError("condition 'hed' needs the HED network: load it with diffusion.model.hed.load_hed(path)")
    from diffusion.model.hed import hed_edges
    device = next(hed.parameters()).device
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].to(device)
    return edges_to_condition(hed_edges(hed, pixels).cpu())


def control_latent(vae, condition, scale_factor, sample_posterior=False, generator=None):
    """The control latent c (B, C, H/8, W/8) of condition images (B, 3, H, W) in [-1, 1]: VAE-encoded and scaled like
    the latents. The posterior mean by default (c then depends on the image only); `sample_posterior` draws
    mean + std * noise (from `generator`) as the released demo does."""
    feature = posterior_feature(vae, condition)
    return sample_latent(feature, scale_factor, generator=generator, sample_posterior=sample_posterior)


def control_latent_of_image(image, vae, height, width, scale_factor, condition="canny", hed=None, **kwargs):
    """`control_latent` of `make_condition(image, height, width, condition, hed)`: a photo or an edge map (a PIL image
    or a path) to the ControlNet's c for a height x width sample."""
    if not isinstance(image, Image.Image):
        image = read_condition_image(image)
    return control_latent(vae, make_condition(image, height, width, condition, hed), scale_factor, **kwargs)
