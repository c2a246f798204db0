"""Tiny stand-ins for T5-XXL and the SD VAE, built for the toy dataset and saved as folders that load through
the same calls as the real ones: `T5Embedder(folder)` (AutoTokenizer + T5EncoderModel) and
`AutoencoderKL.from_pretrained(folder)` (/8 downsampling, 4 latent channels).

- T5: a sentencepiece tokenizer trained on the toy captions (plus the alphabet, so any lowercase text
  tokenises; BPE rather than T5's unigram, which on so small a closed vocabulary keeps words in pieces)
  and a small, randomly initialised `T5EncoderModel` (T5 v1.1 layout: gated-GELU, relative positions, no
  tied embeddings). Random features still identify each token in its context, which is what
  the diffusion model's cross-attention needs; training the encoder is not required for the toy.
- VAE: an `AutoencoderKL` trained on the toy images (L1 + MSE, with shape pixels weighted up since the plain
  backgrounds are easy, and a small KL term). `latent_scale_factor` gives 1/std of its sampled latents (as
  0.18215 is for SD's VAE); tools/build_toy_encoders.py stores `--latent-gain` (3) times that as the VAE
  config's `scaling_factor` (its docstring says why).
"""
import io
import json
import math
import string
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffusion.utils.fileio import atomic_write, atomic_write_text
from diffusion.model.builder import VAE_DOWNSAMPLE

# T5 convention: pad 0, eos 1, unk 2; no bos
SPECIAL_IDS = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
# Every lowercase word can be spelt with these (captions are lowercased by the caption cleaning).
ALPHABET_LINE = ' '.join(string.ascii_lowercase + string.digits + '.,;:!?\'"-()&/')


# ---------------------------------------------------------------- T5

def train_tokenizer(captions, out_dir, vocab_size=192):
    """Train a sentencepiece BPE model on `captions` and write a T5 tokenizer folder (`spiece.model`,
    `tokenizer_config.json`, `special_tokens_map.json`), laid out like t5-v1_1-xxl's, without sentinel ids."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    model = io.BytesIO()
    lines = list(dict.fromkeys(captions)) + [ALPHABET_LINE]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type='bpe',
        hard_vocab_limit=False, character_coverage=1.0, split_digits=True, minloglevel=2, **SPECIAL_IDS)
    atomic_write(out_dir / 'spiece.model', lambda f: f.write(model.getvalue()))
    special = {'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': '<pad>'}
    atomic_write_text(out_dir / 'special_tokens_map.json', json.dumps(special, indent=2))
    config = {**special, 'extra_ids': 0, 'additional_special_tokens': [], 'model_max_length': 512,
              'tokenizer_class': 'T5Tokenizer'}
    atomic_write_text(out_dir / 'tokenizer_config.json', json.dumps(config, indent=2))
    return out_dir


def build_toy_t5(captions, out_dir, width=128, num_layers=2, num_heads=4, vocab_size=192, seed=0):
    """Write a toy T5 folder: tokenizer trained on `captions` and a random `T5EncoderModel` of `width`."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    if width % num_heads:
        raise ValueError(f'width {width} is not divisible by num_heads {num_heads}')
    out_dir = Path(out_dir)
    train_tokenizer(captions, out_dir, vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=width // num_heads, d_ff=2 * width,
                      num_layers=num_layers, num_heads=num_heads, feed_forward_proj='gated-gelu', dropout_rate=0.0,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(out_dir)
    return out_dir


def max_token_count(tokenizer, captions):
    """The most tokens (with the EOS) any caption needs, untruncated."""
    return max(len(ids) for ids in tokenizer(list(captions), add_special_tokens=True)['input_ids'])


# ---------------------------------------------------------------- VAE

def toy_vae_config(block_out_channels=(16, 16, 32, 64), image_size=64):
    """An AutoencoderKL config with len(block_out_channels) - 1 = 3 halvings (/8) and 4 latent channels."""
    levels = len(block_out_channels)
    if 2 ** (levels - 1) != VAE_DOWNSAMPLE:
        raise ValueError(f'{levels} blocks downsample by {2 ** (levels - 1)}, the pipeline expects {VAE_DOWNSAMPLE}')
    return dict(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * levels,
                up_block_types=('UpDecoderBlock2D',) * levels, block_out_channels=tuple(block_out_channels),
                layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=image_size)


def images_to_tensor(images):
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr(reconstruction, target):
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((reconstruction.clamp(-1, 1) - target) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def reconstruct(vae, images, batch_size=64):
    """Decode the posterior means of `images` (N, 3, H, W) in [-1, 1]."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            out.append(vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(out)


def latent_scale_factor(vae, images, seed=0, batch_size=64):
    """1 / std of sampled latents of `images`: scaled latents then have unit variance, like SD's 0.18215."""
    generator = torch.Generator().manual_seed(seed)
    latents = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            latents.append(vae.encode(images[start:start + batch_size]).latent_dist.sample(generator=generator))
    return float(1.0 / torch.cat(latents).std())


def train_toy_vae(train_images, steps=1000, batch_size=16, lr=2e-3, warmup=30, foreground_weight=4.0,
                  kl_weight=1e-6, block_out_channels=(16, 16, 32, 64), seed=0, progress=True):
    """Train an AutoencoderKL on uint8 images (N, H, W, 3); returns the model (eval mode) and the loss history."""
    from diffusers import AutoencoderKL

    images = images_to_tensor(train_images).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(seed)
    # channels-last convolutions: a quarter faster on the CPU, measured
    vae = AutoencoderKL(**toy_vae_config(block_out_channels, images.shape[-1])).to(memory_format=torch.channels_last)
    with torch.no_grad():  # start with a narrow posterior (std ~0.05): sampling noise does not drown the signal
        vae.quant_conv.bias[vae.config.latent_channels:].fill_(-6.0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    history = []
    vae.train()
    bar = tqdm(range(steps), desc='VAE training', unit='step', disable=not progress, dynamic_ncols=True)
    for _ in bar:
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        # pixels away from the background colour (the top-left pixel) are the shapes: weight them up
        foreground = (batch - batch[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.2
        weight = 1.0 + foreground_weight * foreground.float()
        error = reconstruction - batch
        loss = (weight * (error.abs() + error ** 2)).mean() + kl_weight * posterior.kl().mean() / batch[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append(float(error.detach().pow(2).mean()))
        bar.set_postfix(mse=f'{np.mean(history[-20:]):.4f}', refresh=False)
    return vae.to(memory_format=torch.contiguous_format).eval(), history


def save_toy_vae(vae, out_dir, scale_factor):
    """save_pretrained with the latent scale factor in the config, as SD's VAE folders carry it."""
    vae.register_to_config(scaling_factor=scale_factor)
    vae.save_pretrained(out_dir)
    return Path(out_dir)
