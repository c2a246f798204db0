"""Build the toy text encoder and VAE for a toy-shapes dataset (tools/make_toy_dataset.py).

Writes two folders under --out that load exactly like the real encoders:
  t5/   sentencepiece tokenizer trained on the captions + a small T5EncoderModel, trained --t5-steps steps
        so that every token's feature tells the attributes of its shape phrase (t5_report.json: how well a
        linear read-out recovers them) (diffusion.model.t5.T5Embedder(folder), like t5-v1_1-xxl)
  vae/  AutoencoderKL (/8, 4 latent channels) trained on the training images, latent channels 0-2 anchored
        to the average-pooled image (--vae-anchor; diffusion/data/toy_encoders.py says why), its scaling_factor in
        config.json, plus vae_report.json (PSNR on the val images, scale factor) and reconstructions.png
        (val images above, their reconstructions below) (AutoencoderKL.from_pretrained(folder), like
        sd-vae-ft-ema)
The latent scale factor is --latent-gain (3) / std of the VAE's latents, not 1 / std as for SD's VAE: a 64 px
image has only 8 x 8 latents, and at most of the linear schedule's timesteps (made for 32-128 wide latents)
so small a latent keeps too little of its layout for a few-minute training run to learn it from. Scaling the
latents by g raises the signal-to-noise ratio of every timestep by g^2 (log-SNR + 2.2 for g = 3); the last
timestep stays pure noise but for a 2% trace of the image (a gain of 8 left 5% and broke the sampled backgrounds,
which start from pure noise).
The scale factor and caption width/length are compared with --config; a mismatch is reported with the
--cfg-options that fixes it.

Example (the toy recipe, see README):
  python tools/build_toy_encoders.py --data data/toy_shapes --out output/pretrained_models/toy
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import json
import time

import numpy as np
import torch

from diffusion.data import paths
from diffusion.data.errors import DataError
from diffusion.data.feature_io import load_image
from diffusion.utils.arguments import non_negative_int, positive_int
from diffusion.utils.cpu import RECIPE_THREADS, pin_cpu_numerics
from diffusion.utils.fileio import atomic_write_text, save_png
from diffusion.data.records import load_dataset_records
from diffusion.data.toy_encoders import (
    build_toy_t5,
    images_to_tensor,
    latent_scale_factor,
    max_token_count,
    report_shortfalls,
    psnr,
    reconstruct,
    save_toy_vae,
    train_toy_t5,
    train_toy_vae,
)
from diffusion.data.toy_shapes import SPLIT_FILES, alignment_scores, parse_caption
from diffusion.utils.config import ConfigError, add_cfg_options_argument, load_config

DEFAULT_CONFIG = 'configs/pixart_config/PixArt_toy_shapes.py'
LATENT_GAIN = 3.0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default='data/toy_shapes', help='toy dataset folder (default data/toy_shapes)')
    parser.add_argument('--out', default='output/pretrained_models/toy',
                        help='where to write t5/ and vae/ (default output/pretrained_models/toy)')
    parser.add_argument('--config', default=DEFAULT_CONFIG,
                        help=f'config to check the encoders against: caption_channels, model_max_length, '
                             f'scale_factor (default {DEFAULT_CONFIG}; "none" to skip)')
    add_cfg_options_argument(parser)
    parser.add_argument('--skip-t5', action='store_true', help='do not build the text encoder')
    parser.add_argument('--skip-vae', action='store_true', help='do not build the VAE')
    parser.add_argument('--t5-width', type=positive_int, default=128,
                        help='T5 d_model = caption feature width (default 128)')
    parser.add_argument('--t5-layers', type=positive_int, default=2, help='T5 encoder layers (default 2)')
    parser.add_argument('--t5-heads', type=positive_int, default=4, help='T5 attention heads (default 4)')
    parser.add_argument('--vocab-size', type=positive_int, default=192, help='tokenizer vocabulary size (default 192)')
    parser.add_argument('--max-length', type=positive_int, default=32,
                        help='caption tokens the pipeline uses; every caption must fit (default 32)')
    parser.add_argument('--t5-steps', type=non_negative_int, default=300,
                        help='steps training the T5 so that each token\'s feature tells its shape phrase\'s '
                             'attributes; 0 keeps it random (default 300)')
    parser.add_argument('--vae-steps', type=positive_int, default=4000,
                        help='VAE training steps (default 4000: 32.7 dB and shapes read back kind 0.86, against 28.4 dB '
                             'and 0.73 after 1000)')
    parser.add_argument('--vae-batch-size', type=positive_int, default=16, help='VAE training batch (default 16)')
    parser.add_argument('--vae-lr', type=float, default=2e-3, help='VAE peak learning rate (default 2e-3)')
    parser.add_argument('--vae-anchor', type=float, default=1.0,
                        help='weight of the loss tying latent channels 0-2 to the /8 average-pooled image; 0 '
                             'leaves the latent code free (default 1)')
    parser.add_argument('--latent-gain', type=float, default=LATENT_GAIN,
                        help=f'the VAE\'s scaling_factor is this many times 1/std of its latents (default '
                             f'{LATENT_GAIN}; 1 = unit variance, like 0.18215 for SD\'s VAE): see the module docstring')
    parser.add_argument('--vae-channels', default='16,16,32,64',
                        help='AutoencoderKL block_out_channels, 4 levels = /8 (default 16,16,32,64)')
    parser.add_argument('--threads', type=positive_int, default=RECIPE_THREADS,
                        help=f'torch CPU threads (default {RECIPE_THREADS}, as the shipped encoders were built: results '
                             f'are bitwise reproducible for a fixed thread count only)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the encoders\' weights and training (default 0)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.vae_channels = tuple(int(c) for c in args.vae_channels.split(','))
    except ValueError:
        parser.error(f'--vae-channels expects comma-separated integers, got {args.vae_channels!r}')
    if len(args.vae_channels) != 4:
        parser.error(f'--vae-channels needs 4 levels (3 halvings = /8), got {len(args.vae_channels)}')
    if args.vae_anchor < 0:
        parser.error(f'--vae-anchor must be 0 or more, got {args.vae_anchor}')
    if not args.latent_gain > 0:
        parser.error(f'--latent-gain must be positive, got {args.latent_gain}')
    if args.skip_t5 and args.skip_vae:
        parser.error('--skip-t5 and --skip-vae leave nothing to do')
    return args


def read_split(dataset, split):
    """(records, uint8 images (N, H, W, 3)) of a toy split."""
    records = load_dataset_records(dataset, [SPLIT_FILES[split]], 'json')
    images = np.stack([np.asarray(load_image(paths.image_path(dataset, r.path))) for r in records])
    return records, images


def check_against_config(args, found):
    """Messages for every config value that differs from what was built."""
    if args.config.lower() == 'none':
        return []
    cfg = load_config(args.config, args.cfg_options)
    notes = []
    for key, value in found.items():
        expected = cfg[key]
        differs = abs(expected - value) > 0.05 * abs(value) if key == 'scale_factor' else expected != value
        if differs:
            notes.append(f'{args.config}: {key} = {expected}, the encoders give {value:.6g}: '
                         f'pass --cfg-options {key}={value:.6g} (or edit the config)')
    return notes


def main(argv=None):
    args = parse_args(argv)
    pin_cpu_numerics(args.threads)
    dataset, out = Path(args.data), Path(args.out)
    started = time.time()
    found, report, shortfalls = {}, {}, []
    try:
        train_records, train_images = read_split(dataset, 'train')
        if not args.skip_t5:
            captions = [r.prompt for r in train_records]
            for split in ('val', 'unseen'):
                captions += [r.prompt for r in load_dataset_records(dataset, [SPLIT_FILES[split]], 'json')]
            t5_dir = build_toy_t5(captions, out / 't5', width=args.t5_width, num_layers=args.t5_layers,
                                  num_heads=args.t5_heads, vocab_size=args.vocab_size, seed=args.seed)
            if args.t5_steps:
                accuracy = train_toy_t5(t5_dir, [r.prompt for r in train_records], args.max_length,
                                        steps=args.t5_steps, seed=args.seed, progress=not args.no_progress)
                t5_report = {'readout_accuracy': accuracy, 'steps': args.t5_steps, 'threads': args.threads}
                atomic_write_text(t5_dir / 't5_report.json', json.dumps(t5_report, indent=1))
                shortfalls += report_shortfalls('t5', t5_report)
                print('T5 read-out accuracy: ' + ', '.join(f'{k} {v:.3f}' for k, v in accuracy.items()))
            from diffusion.model.t5 import T5Embedder, clean_caption
            embedder = T5Embedder(t5_dir, model_max_length=args.max_length)
            longest = max_token_count(embedder.tokenizer, [clean_caption(c) for c in captions])
            if longest > args.max_length:
                print(f'error: a caption needs {longest} tokens, more than --max-length {args.max_length}',
                      file=sys.stderr)
                return 2
            found.update(caption_channels=args.t5_width, model_max_length=args.max_length)
            print(f'T5: {t5_dir} (vocabulary {len(embedder.tokenizer)}, width {args.t5_width}, longest caption '
                  f'{longest} tokens of {args.max_length})')
        if not args.skip_vae:
            val_records, val_images = read_split(dataset, 'val')
            vae, history = train_toy_vae(train_images, steps=args.vae_steps, batch_size=args.vae_batch_size,
                                         lr=args.vae_lr, anchor_weight=args.vae_anchor,
                                         block_out_channels=args.vae_channels, seed=args.seed,
                                         progress=not args.no_progress)
            val = images_to_tensor(val_images)
            reconstructions = reconstruct(vae, val)
            unit_scale = latent_scale_factor(vae, images_to_tensor(train_images[:1000]), seed=args.seed)
            scale_factor = args.latent_gain * unit_scale
            vae_dir = save_toy_vae(vae, out / 'vae', scale_factor)
            scores = alignment_scores(to_uint8(reconstructions), [parse_caption(r.prompt) for r in val_records])
            report = {'psnr_val_db': round(psnr(reconstructions, val), 2), 'scale_factor': scale_factor,
                      'latent_std': 1 / unit_scale, 'latent_gain': args.latent_gain, 'anchor_weight': args.vae_anchor,
                      'reconstruction_alignment': {k: round(v, 3) for k, v in scores.items()},
                      'steps': args.vae_steps, 'final_train_mse': float(np.mean(history[-50:])),
                      'block_out_channels': list(args.vae_channels), 'train_images': len(train_images),
                      'val_images': len(val_images), 'threads': args.threads}
            atomic_write_text(vae_dir / 'vae_report.json', json.dumps(report, indent=1))
            save_png(vae_dir / 'reconstructions.png', reconstruction_grid(val[:16], reconstructions[:16]))
            found['scale_factor'] = scale_factor
            shortfalls += report_shortfalls('vae', report)
            print(f'VAE: {vae_dir} (PSNR {report["psnr_val_db"]:.2f} dB on {len(val_images)} val images, '
                  f'scale_factor {scale_factor:.6g}; reconstructions.png shows them)\n'
                  f'  shapes read back from the reconstructions (the ceiling for generated images): '
                  + ', '.join(f'{k} {v:.2f}' for k, v in scores.items()))
        notes = check_against_config(args, found)
    except (DataError, ConfigError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for note in notes:
        print(f'warning: {note}')
    print(f'done in {time.time() - started:.1f} s ({torch.get_num_threads()} CPU threads)')
    if shortfalls:  # a full build (the defaults) meets these; a small or short one need not
        print('below the thresholds the shipped encoders meet (diffusion/data/toy_encoders.py REPORT_THRESHOLDS):\n  '
              + '\n  '.join(shortfalls))
    return 0


def to_uint8(images):
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def reconstruction_grid(originals, reconstructions):
    """A PIL image: originals in the top row, their reconstructions below."""
    from PIL import Image
    rows = [np.concatenate(list(to_uint8(batch)), axis=1) for batch in (originals, reconstructions)]
    return Image.fromarray(np.concatenate(rows, axis=0))


if __name__ == '__main__':
    sys.exit(main())
