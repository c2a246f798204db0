"""Read and write images, T5 feature files and VAE feature files, checking what they hold (SPEC section 7).

Writers are atomic (temp file in the same folder, then rename), so a file under its final name is complete;
the extractor's resume relies on that. Readers raise `DataFileError` naming the file and the problem.
"""

import numpy as np
import torch
from PIL import Image

from diffusion.data.errors import DataFileError

from diffusion.utils.fileio import atomic_write

CAPTION_KEYS = ('caption_feature', 'attention_mask')


# ---------------------------------------------------------------- images

def load_image(path):
    """The image at `path`, fully decoded, as RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert('RGB')
    except FileNotFoundError:
        raise DataFileError(path, 'image file is missing') from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataFileError(path, f'corrupt or unreadable image ({type(err).__name__}: {err})') from err


def read_image_size(path):
    """(height, width) of an image from its header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise DataFileError(path, 'image file is missing') from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataFileError(path, f'corrupt or unreadable image ({type(err).__name__}: {err})') from err
    return height, width


# ---------------------------------------------------------------- T5 features

def save_caption_feature(path, caption_feature, attention_mask, dtype=np.float32):
    """Write a T5 feature file: caption_feature (1, L, C) as `dtype`, attention_mask (1, L) int64."""
    feature = np.asarray(caption_feature, dtype=dtype)
    mask = np.asarray(attention_mask, dtype=np.int64)
    if feature.ndim != 3 or feature.shape[0] != 1 or mask.shape != feature.shape[:2]:
        raise ValueError(f'{path}: expected caption_feature (1, L, C) and attention_mask (1, L), '
                         f'got {feature.shape} and {mask.shape}')
    return atomic_write(path, lambda f: np.savez(f, caption_feature=feature, attention_mask=mask))


def load_caption_feature(path, max_length=None, channels=None):
    """(caption_feature (1, L, C) float32, attention_mask (1, L) int64) from a T5 feature file; `max_length`
    and `channels`, when given, are the L and C the file must have."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in CAPTION_KEYS if key not in npz.files]
            if missing:
                raise DataFileError(path, f'T5 feature file lacks {missing}; it holds {sorted(npz.files)}, '
                                          f'expected caption_feature (1, L, C) and attention_mask (1, L)')
            feature, mask = npz['caption_feature'], npz['attention_mask']
    except FileNotFoundError:
        raise DataFileError(path, 'T5 feature file is missing') from None
    except DataFileError:
        raise
    except Exception as err:  # numpy raises many types for damaged files (BadZipFile, EOFError, ValueError...)
        raise DataFileError(path, f'corrupt or truncated T5 feature file ({type(err).__name__}: {err})') from err
    if feature.ndim != 3 or feature.shape[0] != 1 or mask.shape != feature.shape[:2]:
        raise DataFileError(path, f'expected caption_feature (1, L, C) and attention_mask (1, L), '
                                  f'got {feature.shape} and {mask.shape}')
    if max_length is not None and feature.shape[1] != max_length:
        raise DataFileError(path, f'holds {feature.shape[1]} tokens, expected model_max_length={max_length}')
    if channels is not None and feature.shape[2] != channels:
        raise DataFileError(path, f'holds {feature.shape[2]} channels, expected caption_channels={channels}')
    if feature.dtype.kind != 'f' or mask.dtype.kind not in 'iub':
        raise DataFileError(path, f'expected a float caption_feature and an integer attention_mask, '
                                  f'got {feature.dtype} and {mask.dtype}')
    if not np.isfinite(feature).all():
        raise DataFileError(path, 'caption_feature holds NaN or infinite values')
    return torch.from_numpy(feature.astype(np.float32)), torch.from_numpy(mask.astype(np.int64))


# ---------------------------------------------------------------- VAE features

def save_vae_feature(path, feature, dtype=np.float32):
    """Write a VAE feature file: (2C, h, w) posterior mean then std, unscaled."""
    feature = np.asarray(feature, dtype=dtype)
    if feature.ndim != 3 or feature.shape[0] % 2:
        raise ValueError(f'{path}: expected a VAE feature (2C, h, w), got shape {feature.shape}')
    return atomic_write(path, lambda f: np.save(f, feature, allow_pickle=False))


def load_vae_feature(path, expected_shape=None):
    """A VAE feature file as a float32 tensor (2C, h, w); `expected_shape`, when given, is the shape it must
    have, e.g. (8, 32, 32) for a 256 px image."""
    try:
        feature = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataFileError(path, 'VAE feature file is missing') from None
    except Exception as err:  # truncated files raise ValueError/EOFError/OSError
        raise DataFileError(path, f'corrupt or truncated VAE feature file ({type(err).__name__}: {err})') from err
    if feature.dtype.kind != 'f' or feature.ndim != 3 or feature.shape[0] % 2:
        raise DataFileError(path, f'expected a float array (2C, h, w) of posterior mean and std, got '
                                  f'{feature.dtype} {feature.shape}')
    if expected_shape is not None and tuple(feature.shape) != tuple(expected_shape):
        raise DataFileError(path, f'VAE feature has shape {tuple(feature.shape)}, expected {tuple(expected_shape)} '
                                  f'(extracted at another size?)')
    if not np.isfinite(feature).all():
        raise DataFileError(path, 'VAE feature holds NaN or infinite values')
    return torch.from_numpy(feature.astype(np.float32))
