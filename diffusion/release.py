"""Facts of the released PixArt-alpha models and their parts (SPEC sections 1-3 and 5), each stated once here.

Imports nothing from this project, so data/, model/, tools/, scripts/ and bench/ can all use it.
"""
import torch

VAE_DOWNSAMPLE = 8  # SD-VAE latents are 1/8 of the image side (the toy VAE follows the same convention)
SD_VAE_SCALE_FACTOR = 0.18215  # latent scale factor of sd-vae-ft-ema
T5_TOKENS = 120  # caption tokens the released models read (model_max_length)
T5_CHANNELS = 4096  # width of T5 v1.1 XXL features (caption_channels)
XL_2_SHAPE = dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16)  # every released transformer

RELEASED_IMAGE_SIZES = (256, 512, 1024)  # PixArt-XL-2-256x256, -512x512, -1024-MS
# The conventional local layout of the released files (SPEC section 1); a T5 folder may be the parent of
# t5-v1_1-xxl/, as the reference scripts take it.
PRETRAINED_DIR = "output/pretrained_models"
RELEASED_T5_DIR = f"{PRETRAINED_DIR}/t5_ckpts"
RELEASED_VAE_DIR = f"{PRETRAINED_DIR}/sd-vae-ft-ema"

# Names of dtypes on command lines and in configs.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def released_lewei_scale(image_size):
    """The position-embedding scale of the released models: 1.0 at 256 and 512 px, 2.0 at 1024 px.

    Other sizes follow the same rule, image_size / 512 rounded down and at least 1, which is also diffusers'
    default `interpolation_scale` (max(sample_size // 64, 1))."""
    return float(max(int(image_size) // 512, 1))


def released_model_name(image_size):
    """The registered name of the released model at `image_size`: the 1024 px model is the multi-scale one."""
    if image_size not in RELEASED_IMAGE_SIZES:
        raise ValueError(f"image_size {image_size} is not a released model size; expected one of "
                         f"{', '.join(map(str, RELEASED_IMAGE_SIZES))} (or describe the model with a config)")
    return "PixArtMS_XL_2" if image_size == 1024 else "PixArt_XL_2"
