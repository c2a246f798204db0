"""Render the toy-shapes dataset: 1-2 coloured shapes on a plain background, captioned systematically.

Writes the InternalData layout (diffusion/data/paths.py): images/{train,val,unseen}/NNNNN.png,
partition/data_info.json (train), partition/val_info.json (same distribution, other images) and
partition/unseen_info.json (scenes with the held-out colour-shape pairs, which no training scene has), and
toy_shapes.json describing the build. Deterministic from --seed.

Example (the toy recipe, see README):
  python tools/make_toy_dataset.py --out data/toy_shapes
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import time

from diffusion.data.toy_shapes import write_toy_dataset


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='data/toy_shapes', help='dataset folder to create (default data/toy_shapes)')
    parser.add_argument('--num-train', type=int, default=4000, help='training images (default 4000)')
    parser.add_argument('--num-val', type=int, default=200,
                        help='validation images, from the training distribution (default 200)')
    parser.add_argument('--num-unseen', type=int, default=200,
                        help='images with held-out colour-shape pairs (default 200)')
    parser.add_argument('--image-size', type=int, default=64, help='image side in pixels, a multiple of 8 (default 64)')
    parser.add_argument('--seed', type=int, default=0, help='seed of every scene and of the held-out pairs (default 0)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing toy dataset at --out, deleting its extracted features')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ('num_train', 'num_val', 'num_unseen'):
        if getattr(args, flag) < 0:
            parser.error(f'--{flag.replace("_", "-")} must be >= 0')
    if args.num_train == 0:
        parser.error('--num-train must be > 0')
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    try:
        manifest = write_toy_dataset(args.out, args.num_train, args.num_val, args.num_unseen, args.image_size,
                                     args.seed, overwrite=args.overwrite, progress=not args.no_progress)
    except (FileExistsError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    counts = manifest['counts']
    pairs = ', '.join(' '.join(p) for p in manifest['held_out_pairs'])
    print(f'wrote {sum(counts.values())} images ({counts["train"]} train, {counts["val"]} val, {counts["unseen"]} '
          f'unseen) of {args.image_size} px to {args.out} in {time.time() - started:.1f} s; held out: {pairs}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
