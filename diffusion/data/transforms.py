"""Image transforms (SPEC section 7): RGB, resize to cover the target size keeping the aspect ratio, center
crop, normalise to [-1, 1]. No random flip or crop: an item depends on its index only.

For a square target this is the released "resize the shorter side, center crop"; for a bucket (h, w) it is
the multi-scale transform, which never distorts the aspect ratio (the reference's extractor did).
"""
import math

import numpy as np
import torch
from PIL import Image


def resize_to_cover(image, height, width, resample=Image.BICUBIC):
    """Resize a PIL image, keeping its aspect ratio, to the smallest size covering height x width."""
    scale = max(height / image.height, width / image.width)
    # ceil after a tiny tolerance so float noise never leaves a side one pixel short (or long)
    new_w = max(width, math.ceil(image.width * scale - 1e-6))
    new_h = max(height, math.ceil(image.height * scale - 1e-6))
    if (new_w, new_h) == image.size:
        return image
    return image.resize((new_w, new_h), resample=resample)


def center_crop(image, height, width):
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_normalised_tensor(image):
    """PIL RGB image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert('RGB'), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def default_train(image, height, width):
    """The released training transform for a target size (height, width)."""
    return to_normalised_tensor(center_crop(resize_to_cover(image.convert('RGB'), height, width), height, width))


TRANSFORMS = {'default_train': default_train}


def get_transform(name):
    """The transform called `name` in configs (`data.transform`): a function (image, height, width) -> tensor."""
    if name not in TRANSFORMS:
        raise KeyError(f'unknown image transform {name!r}; expected one of {", ".join(sorted(TRANSFORMS))}')
    return TRANSFORMS[name]
