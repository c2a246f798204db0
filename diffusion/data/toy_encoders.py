"""Tiny stand-ins for T5-XXL and the SD VAE, built for the toy dataset and saved as folders that load through
the same calls as the real ones: `T5Embedder(folder)` (AutoTokenizer + T5EncoderModel) and
`AutoencoderKL.from_pretrained(folder)` (/8 downsampling, 4 latent channels).

- T5: a sentencepiece tokenizer trained on the toy captions (plus the alphabet, so any lowercase text
  tokenises; BPE rather than T5's unigram, which on so small a closed vocabulary keeps words in pieces)
  and a small `T5EncoderModel` (T5 v1.1 layout: gated-GELU, relative positions, no tied embeddings).
  Randomly initialised, such an encoder gives a word nearly the same feature wherever it stands (its
  residual stream is the word embedding), so "a red circle on the left and a blue square on the right"
  and its colour-swapped twin encode alike. `train_toy_t5` trains it briefly to make each token's feature
  tell the attributes of the shape phrase it is part of: contextual features, as T5-XXL's are.
- VAE: an `AutoencoderKL` trained on the toy images (L1 + MSE, with shape pixels weighted up since the plain
  backgrounds are easy, and a small KL term). With `anchor_weight`, latent channels 0-2 are also pulled
  towards the /8 average-pooled image and channel 3 weakly towards 0 (it keeps what the decoder needs beyond):
  colours then sit as far apart in the latent space as in RGB, where an unanchored VAE put them on nearly one
  axis and the diffusion model mixed them up. (SD's VAE latents are also close to a linear map of a
  low-resolution image; latent previews rely on that.) `latent_scale_factor` gives 1/std of its sampled
  latents (as 0.18215 is for SD's VAE); tools/build_toy_encoders.py stores `--latent-gain` (3) times that as
  the VAE config's `scaling_factor` (its docstring says why).
"""
import io
import json
import math
import string
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffusion.data import toy_shapes
from diffusion.release import VAE_DOWNSAMPLE
from diffusion.utils.fileio import atomic_write, atomic_write_text

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


# per-token targets of `train_toy_t5`: the attributes of the phrase a token belongs to, then the background
PHRASE_ATTRIBUTES = ('colour', 'kind', 'size', 'position')


def _target_classes():
    """The class names of each target of `phrase_targets`, in order (PHRASE_ATTRIBUTES, then background)."""
    return [list(toy_shapes.COLOURS), list(toy_shapes.KINDS), list(toy_shapes.SIZES),
            list(toy_shapes.POSITIONS.values()), list(toy_shapes.BACKGROUNDS)]


def phrase_targets(text, word_ids):
    """Per-token class targets (len(word_ids), 5) of a toy caption: the colour, kind, size and position of the
    shape phrase a token is part of (-100 for tokens of no shape phrase), then the scene's background (every
    token, special tokens included). `word_ids`: the tokenizer's word index of each token (None: special)."""
    scene = toy_shapes.parse_caption(text)
    *tables, backgrounds = _target_classes()
    phrase_of_word, phrase = [], 0
    for word in text.split():
        if word == 'and' and phrase == 0:
            phrase_of_word.append(None)  # the conjunction belongs to neither shape
            phrase = 1
            continue
        phrase_of_word.append(phrase)
        if word.endswith(','):  # the last shape phrase ends at the comma; the background phrase follows
            phrase = 2
    background = backgrounds.index(scene.background)
    targets = []
    for word in word_ids:
        which = None if word is None else phrase_of_word[word]
        if which is None or which >= len(scene.shapes):
            targets.append([-100] * len(tables) + [background])
        else:
            shape = scene.shapes[which]
            targets.append([table.index(getattr(shape, key)) for table, key in zip(tables, PHRASE_ATTRIBUTES)]
                           + [background])
    return targets


def train_toy_t5(t5_dir, captions, model_max_length, steps=300, batch_size=64, lr=3e-3, seed=0, progress=True):
    """Train the toy T5 in `t5_dir` so that every token's feature tells the attributes of the shape phrase it is
    part of and the scene's background (linear read-outs, cross-entropy; the read-outs are discarded), then save
    it back. Returns the read-out accuracy per attribute on `captions`.

    A random T5 gives each token a feature of its own word, barely of its neighbours' (cosine 1.00 between one
    word's features at two places): no model reading them can tell which colour goes with which position in a
    two-shape caption. T5-XXL's features are contextual; this makes the toy's so."""
    from transformers import AutoTokenizer, T5EncoderModel

    from diffusion.model.t5 import clean_caption

    tokenizer = AutoTokenizer.from_pretrained(t5_dir, local_files_only=True)
    model = T5EncoderModel.from_pretrained(t5_dir, local_files_only=True)
    texts = list(dict.fromkeys(clean_caption(c) for c in captions))  # the text T5Embedder will tokenise
    tokens = tokenizer(texts, max_length=model_max_length, padding='max_length', truncation=True,
                       return_tensors='pt')
    targets = torch.tensor([phrase_targets(text, tokens.word_ids(i)) for i, text in enumerate(texts)])
    targets[tokens['attention_mask'] == 0] = -100  # padding predicts nothing
    sizes = [len(classes) for classes in _target_classes()]
    torch.manual_seed(seed)
    heads = torch.nn.Linear(model.config.d_model, sum(sizes))
    parameters = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def losses_and_hits(ids, mask, target):
        logits = heads(model(input_ids=ids, attention_mask=mask).last_hidden_state).split(sizes, dim=-1)
        loss = sum(torch.nn.functional.cross_entropy(l.flatten(0, 1), t.flatten(), ignore_index=-100)
                   for l, t in zip(logits, target.unbind(-1)))
        hits = [((l.argmax(-1) == t) & (t >= 0)).sum().item() / max((t >= 0).sum().item(), 1)
                for l, t in zip(logits, target.unbind(-1))]
        return loss, hits

    model.train()
    bar = tqdm(range(steps), desc='T5 training', unit='step', disable=not progress, dynamic_ncols=True)
    for _ in bar:
        pick = torch.randint(len(texts), (batch_size,), generator=generator)
        loss, _ = losses_and_hits(tokens['input_ids'][pick], tokens['attention_mask'][pick], targets[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f'{loss.item():.3f}', refresh=False)
    model.eval()
    with torch.no_grad():
        _, hits = losses_and_hits(tokens['input_ids'], tokens['attention_mask'], targets)
    model.save_pretrained(t5_dir)
    return dict(zip(PHRASE_ATTRIBUTES + ('background',), hits))


# What a build of the toy encoders must reach (tools/build_toy_encoders.py checks its reports against these; the
# shipped encoders meet them, and tests/test_toy_encoders_rebuild.py rebuilds them and checks again). Read-out
# accuracies of the T5 on the training captions; the VAE's PSNR on the val images and the shapes read back from its
# reconstructions of them (kind is the hard part of 12-18 px shapes on an 8 x 8 latent).
REPORT_THRESHOLDS = {
    't5': {'readout_accuracy': dict(colour=0.99, kind=0.99, size=0.99, position=0.99, background=0.99)},
    'vae': {'psnr_val_db': 32.0,
            'reconstruction_alignment': dict(background=0.99, count=0.98, position=0.98, colour=0.98, kind=0.8,
                                             size=0.98)},
}


def report_shortfalls(kind, report):
    """Messages for every figure of a 't5' or 'vae' report below REPORT_THRESHOLDS (empty when it meets them all)."""
    shortfalls = []
    for key, minimum in REPORT_THRESHOLDS[kind].items():
        pairs = ([(f'{key} {name}', report[key][name], low) for name, low in minimum.items()]
                 if isinstance(minimum, dict) else [(key, report[key], minimum)])
        shortfalls += [f'{kind} {label} = {value:.3f}, below the threshold {low}'
                       for label, value, low in pairs if value < low]
    return shortfalls


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


# of anchor_weight: channel 3's weak pull towards 0, which keeps its scale near the others'; 0.1 held it near 0
# (std 0.18 against 1.7) and shapes read back from the reconstructions worse (kind 0.66 against 0.71)
ANCHOR_FREE_CHANNEL_WEIGHT = 0.01


def train_toy_vae(train_images, steps=1000, batch_size=16, lr=2e-3, warmup=30, foreground_weight=4.0,
                  kl_weight=1e-6, anchor_weight=1.0, block_out_channels=(16, 16, 32, 64), seed=0, progress=True):
    """Train an AutoencoderKL on uint8 images (N, H, W, 3); returns the model (eval mode) and the loss history.
    `anchor_weight`: weight of the MSE between the posterior mean's channels 0-2 and the /8 average-pooled image
    (plus `ANCHOR_FREE_CHANNEL_WEIGHT` times channel 3's mean square); 0 leaves the latent code free."""
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
        if anchor_weight:
            mean = posterior.mean
            pooled = torch.nn.functional.avg_pool2d(batch, VAE_DOWNSAMPLE)
            loss = loss + anchor_weight * ((mean[:, :3] - pooled).pow(2).mean()
                                           + ANCHOR_FREE_CHANNEL_WEIGHT * mean[:, 3:].pow(2).mean())
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
