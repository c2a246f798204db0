"""DreamBooth's data: a folder of instance images under one prompt and, for prior preservation, class images under
the class prompt, held in memory as cached features (`diffusion/train/dreambooth.py` computes and caches them).

An item is InternalData's `(x, caption_feature, attention_mask, data_info)` for an instance image; with class images
its `data_info` also holds a class image's features as `class_x`, `class_caption`, `class_mask`, `class_img_hw`,
`class_aspect_ratio` and `class_index` (its per-sample randomness key), so every batch pairs instance and class
images whatever its size. Item i pairs instance image i mod n with class image i mod m, for max(n, m) items (n
alone without class images). On aspect-ratio buckets (`bucket_keys`) both images of an item share a bucket whenever
class image j was made at instance image j mod n's bucket, which is how they are generated.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from diffusion.data.errors import DataError

IMAGE_SUFFIXES = ('.bmp', '.jpeg', '.jpg', '.png', '.ppm', '.tif', '.tiff', '.webp')


def list_images(folder, what):
    """The image files (by suffix, sorted by name) directly in `folder`; `what` names the folder in errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f'{what} {folder} is {"not a folder" if folder.exists() else "missing"}: expected a folder '
                        f'of images ({", ".join(IMAGE_SUFFIXES)})')
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class CachedImage:
    """One image's training inputs: VAE feature (8, h/8, w/8) at its target size, its prompt's T5 feature (1, L, C)
    and mask (1, L), its original (h, w), the aspect ratio passed to the model and its bucket key."""
    path: str
    vae_feature: torch.Tensor
    caption: torch.Tensor
    mask: torch.Tensor
    img_hw: tuple
    aspect_ratio: float
    bucket: str


class DreamBoothData(Dataset):
    """Instance images (and class images) as items (see the module docstring). `multi_scale`: batches hold one
    bucket (`bucket_keys`, for the batch sampler)."""

    def __init__(self, instances, classes=(), dataset_dir=None, multi_scale=False):
        if not instances:
            raise DataError(f'no instance images in {dataset_dir}')
        self.instances, self.classes = list(instances), list(classes)
        self.dataset_dir = dataset_dir  # named in errors (diffusion/train/checks.py)
        count = max(len(self.instances), len(self.classes))
        self.bucket_keys = [self._bucket(i) for i in range(count)] if multi_scale else None
        self._count = count

    def __len__(self):
        return self._count

    def _pair(self, index):
        instance = self.instances[index % len(self.instances)]
        return instance, self.classes[index % len(self.classes)] if self.classes else None

    def _bucket(self, index):
        instance, image = self._pair(index)
        if image is None or image.bucket == instance.bucket:
            return instance.bucket
        return f'{instance.bucket}+{image.bucket}'  # a user's class image of another shape: a batch of such pairs

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f'item {index} out of range for {len(self)} items')
        instance, image = self._pair(index)
        data_info = {'img_hw': torch.tensor(instance.img_hw, dtype=torch.float32),
                     'aspect_ratio': torch.tensor([instance.aspect_ratio], dtype=torch.float32), 'index': index}
        if image is not None:
            data_info.update(class_x=image.vae_feature, class_caption=image.caption, class_mask=image.mask,
                             class_img_hw=torch.tensor(image.img_hw, dtype=torch.float32),
                             class_aspect_ratio=torch.tensor([image.aspect_ratio], dtype=torch.float32),
                             class_index=len(self) + index)  # never an instance sample's key
        return instance.vae_feature, instance.caption, instance.mask, data_info
