"""Extract T5 caption features (.npz) and VAE features (.npy) for the dataset a config trains on.

The config's dataset (`data`, under `data_root`) says what to extract: its records from the `data.image_list_json`
(InternalData, InternalDataMS) or `data.image_list_txt` (SAM) partition files, their captions, their sizes
(`image_size`; InternalDataMS: the buckets of `aspect_ratio_type`) and where it reads each feature file; the
encoders come from `t5_pretrained` and `vae_pretrained`. A ControlNet config (`controlnet=True`) also gets the
condition features of `control_condition` (<condition>_feature_<S>/: the VAE posterior of each record's edge map,
Canny by default; 'hed' needs --hed-checkpoint). Existing files are skipped, so an interrupted run resumes. Exit
status 1 when some records failed (they are listed in a file).

Examples:
  python tools/extract_features.py configs/pixart_config/PixArt_toy_shapes.py
  python tools/extract_features.py configs/pixart_config/PixArt_xl2_img512_internalms.py --device cuda \\
      --cfg-options data_root=/data t5_pretrained=output/pretrained_models/t5_ckpts/t5-v1_1-xxl
  # 8 GPUs on one machine: one process per GPU, each takes every 8th record
  torchrun --nproc_per_node=8 tools/extract_features.py CONFIG --device cuda
  # ControlNet HED condition features (with the VAE features) for the 512 px ControlNet config
  python tools/extract_features.py configs/pixart_app_config/PixArt_xl2_img512_controlHed.py --skip-t5 \
      --hed-checkpoint output/pretrained_models/ControlNetHED.pth
  # or split by hand across machines
  python tools/extract_features.py CONFIG --start 0 --end 500000
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import os
import time

import numpy as np
import torch

from diffusion.data import paths
from diffusion.data.datasets import InternalDataMS, build_dataset_from_config, dataset_class
from diffusion.data.errors import DataError
from diffusion.data.extract import FeatureExtractor, shard_indices
from diffusion.release import DTYPES
from diffusion.utils.arguments import positive_int
from diffusion.utils.config import ConfigError, add_cfg_options_argument, load_config
from diffusion.utils.cpu import idle_cpu_threads


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='training config naming the dataset, encoders, image size and caption length')
    add_cfg_options_argument(parser)
    parser.add_argument('--annotations', nargs='+', metavar='NAME',
                        help='partition files to extract (default: the config\'s data.image_list_json, or '
                             'data.image_list_txt for SAM), e.g. --annotations data_info.json val_info.json')
    parser.add_argument('--skip-t5', action='store_true', help='do not extract T5 caption features')
    parser.add_argument('--skip-vae', action='store_true',
                        help='do not extract VAE features (nor ControlNet condition features, which need the VAE)')
    parser.add_argument('--skip-condition', action='store_true',
                        help='ControlNet configs: do not extract the condition features of control_condition')
    parser.add_argument('--hed-checkpoint', default=None, metavar='PTH',
                        help="the annotators' ControlNetHED.pth for control_condition='hed' (default "
                             "output/pretrained_models/ControlNetHED.pth, downloaded there when missing)")
    parser.add_argument('--batch-size', type=positive_int, default=32,
                        help='captions or images per encoder call (default 32)')
    parser.add_argument('--num-workers', type=int, default=0,
                        help='image-loading worker processes (default 0: load in the main process)')
    parser.add_argument('--device', default=None,
                        help='torch device for the encoders (default: cuda:LOCAL_RANK when CUDA is available, '
                             'else cpu)')
    parser.add_argument('--threads', type=positive_int, default=None,
                        help='torch CPU threads (default: OMP_NUM_THREADS, else the cores idle right now, at least 1)')
    parser.add_argument('--t5-dtype', choices=sorted(DTYPES), default=None,
                        help='T5 weight dtype (default: bf16 on CUDA, fp32 on CPU)')
    parser.add_argument('--t5-8bit', action='store_true', help='load T5 in 8 bits (needs bitsandbytes and CUDA)')
    parser.add_argument('--vae-dtype', choices=sorted(DTYPES), default='fp32',
                        help='VAE weight dtype (default fp32)')
    parser.add_argument('--feature-dtype', choices=('float32', 'float16'), default='float32',
                        help='dtype of the stored features (default float32; float16 halves the disk space)')
    parser.add_argument('--start', type=int, default=0, help='first record index to consider (default 0)')
    parser.add_argument('--end', type=int, default=None, help='one past the last record index (default: all)')
    parser.add_argument('--rank', type=int, default=None,
                        help='this shard: takes records start+rank, start+rank+world_size, ... '
                             '(default: env RANK or 0)')
    parser.add_argument('--world-size', type=int, default=None,
                        help='number of shards (default: env WORLD_SIZE or 1)')
    parser.add_argument('--verify-existing', action='store_true',
                        help='open every existing feature file and redo those that are damaged (default: skip any '
                             'existing file; writes are atomic, so they are complete)')
    parser.add_argument('--failures-file', default=None,
                        help='where to list failed records, one json object a line (default: '
                             '<dataset>/extract_failures[_rankR_of_W].jsonl)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def default_device():
    if torch.cuda.is_available():
        return f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}'
    return 'cpu'


def main(argv=None):
    args = parse_args(argv)
    if args.skip_t5 and args.skip_vae:
        raise SystemExit('error: --skip-t5 and --skip-vae leave nothing to do')
    rank = args.rank if args.rank is not None else int(os.environ.get('RANK', 0))
    world_size = args.world_size if args.world_size is not None else int(os.environ.get('WORLD_SIZE', 1))
    try:
        cfg = load_config(args.config, args.cfg_options)
        # The dataset reads the features this tool writes (it needs no text encoder for that).
        overrides = {'data.load_t5_feat': True}
        if args.annotations:
            overrides[f'data.{dataset_class(cfg.data.type).annotation_list_key}'] = list(args.annotations)
        dataset = build_dataset_from_config(cfg.with_overrides(overrides))
        indices = shard_indices(len(dataset), args.start, args.end, rank, world_size)
    except (ConfigError, DataError, KeyError, TypeError, ValueError) as err:
        raise SystemExit(f'error: {err}')
    device = args.device or default_device()
    torch.set_num_threads(args.threads or idle_cpu_threads())
    buckets = f' on the {dataset.aspect_ratio_type} buckets' if isinstance(dataset, InternalDataMS) else ''
    print(f'{dataset.dataset_dir}: {len(dataset)} records, shard {rank}/{world_size} of [{args.start}, '
          f'{args.end or len(dataset)}) has {len(indices)}; image size {cfg.image_size}{buckets}; device {device}',
          flush=True)

    text_encoder = vae = hed = None
    condition = None if args.skip_condition or args.skip_vae else getattr(dataset, 'control_condition', None)
    try:
        if not args.skip_t5:
            from diffusion.model.t5 import T5Embedder
            text_encoder = T5Embedder(cfg.t5_pretrained, device=device, torch_dtype=args.t5_dtype,
                                      model_max_length=cfg.model_max_length, load_in_8bit=args.t5_8bit)
            if text_encoder.hidden_size != cfg.caption_channels:
                raise SystemExit(f'error: {cfg.t5_pretrained} gives {text_encoder.hidden_size}-wide features, the '
                                 f'config says caption_channels={cfg.caption_channels}')
        if not args.skip_vae:
            from diffusion.model.t5 import resolve_dtype
            from diffusion.pipeline import load_vae
            vae = load_vae(cfg.vae_pretrained, device, dtype=resolve_dtype(args.vae_dtype, device))
        if condition == 'hed':
            from diffusion.model.hed import DEFAULT_HED_CHECKPOINT, load_hed
            hed = load_hed(args.hed_checkpoint or DEFAULT_HED_CHECKPOINT, device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f'error: {err}')

    extractor = FeatureExtractor(
        dataset, text_encoder=text_encoder, vae=vae, batch_size=args.batch_size, num_workers=args.num_workers,
        feature_dtype=np.dtype(args.feature_dtype), verify_existing=args.verify_existing,
        progress=not args.no_progress, hed=hed, skip_condition=args.skip_condition)
    failures_file = args.failures_file or paths.failures_path(dataset.dataset_dir, rank, world_size)
    started = time.time()
    try:
        summary = extractor.run(indices, failures_file=Path(failures_file))
    except DataError as err:  # a file that cannot be written (disk full, read-only folder) stops the run
        raise SystemExit(f'error: {err}')
    print(summary.text())
    print(f'features under {dataset.dataset_dir} ({time.time() - started:.1f} s)')
    return 1 if summary.failures else 0


if __name__ == '__main__':
    sys.exit(main())
