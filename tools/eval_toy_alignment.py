"""Score generated toy-shapes images against their prompts: a miniature T2I-CompBench by image analysis.

Each image is read back into a scene (diffusion/data/toy_shapes.py `detect_scene`: background = the border's
nearest named colour; shapes = connected blobs, classified by colour, by how much of their bounding box they
fill, by extent and by grid cell) and compared with the scene its prompt describes. Reported, as accuracies:
  background  the named background colour
  count       as many shapes as the prompt names
  position    a shape in each named cell (per described shape; the rest are judged on that shape)
  colour      ... of the named colour        kind  ... of the named kind (circle/square/triangle; --new-kind)
  size        ... of the named size          all   every attribute of the shape right
and the same per-shape scores for the shapes whose colour-kind pair no training image has, when the dataset
(--data) says which pairs were held out.

Inputs: a folder written by scripts/inference.py (its metadata.jsonl names each image and its prompt), or a
split of the toy dataset itself (--split: the dataset's own images, i.e. the detector's ceiling). Examples:
  python scripts/inference.py --config configs/pixart_config/PixArt_toy_shapes.py \\
      --model_path output/quickstart/train/checkpoints/<latest>.pth --txt_file prompts.txt \\
      --output-dir output/toy_samples
  python tools/eval_toy_alignment.py output/toy_samples --data data/toy_shapes
  python tools/eval_toy_alignment.py --data data/toy_shapes --split unseen
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import json

from PIL import Image

from diffusion.data import paths
from diffusion.data.toy_shapes import (
    KINDS,
    MANIFEST,
    NEW_KINDS,
    SPLIT_FILES,
    alignment_report,
    caption,
    detect_scene,
    parse_caption,
)
from diffusion.utils.fileio import atomic_write_text

ATTRIBUTES = ('background', 'count', 'position', 'colour', 'kind', 'size', 'all')
PER_SHAPE = ('position', 'colour', 'kind', 'size', 'all')


class EvalError(ValueError):
    """Input the evaluation cannot score; the message names the file and line."""


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', nargs='?', help='folder with generated images and their metadata.jsonl '
                                                  '(scripts/inference.py --output-dir)')
    parser.add_argument('--data', help='toy dataset folder: gives the held-out colour-kind pairs, and with --split '
                                       'the images to score')
    parser.add_argument('--split', choices=sorted(SPLIT_FILES), help='score this split of --data instead of a folder')
    parser.add_argument('--limit', type=int, default=None, help='score only the first N images')
    parser.add_argument('--json', metavar='OUT', help='also write the scores and per-image readings to this file')
    parser.add_argument('--new-kind', metavar='WORD=KIND', type=new_kind_argument, default=None,
                        help=f'score a kind the dataset never draws ({", ".join(NEW_KINDS)}; tools/toy_dreambooth.py '
                             'teaches one), named WORD in the prompts, e.g. --new-kind sks=bar: WORD is read as KIND '
                             'and the judge also reads blobs as KIND')
    return parser


def new_kind_argument(text):
    word, sep, kind = text.partition('=')
    if not sep or not word or ' ' in word or kind not in NEW_KINDS:
        raise argparse.ArgumentTypeError(f'{text!r}: expected WORD=KIND with one word and KIND one of '
                                         f'{", ".join(NEW_KINDS)}, e.g. sks=bar')
    return word, kind


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def read_generated(folder):
    """[(image path, prompt)] from a scripts/inference.py output folder."""
    folder = Path(folder)
    meta = folder / 'metadata.jsonl'
    if not meta.is_file():
        raise EvalError(f'{meta} not found: expected a folder written by scripts/inference.py '
                        f'(images plus metadata.jsonl)')
    items = []
    for number, line in enumerate(meta.read_text(encoding='utf-8').splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, prompt = record['file'], record['prompt']
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise EvalError(f'{meta} line {number}: expected a JSON object with "file" and "prompt" ({err})') from None
        items.append((folder / name, prompt, f'{meta} line {number}'))
    if not items:
        raise EvalError(f'{meta} lists no images')
    return items


def read_split(data, split):
    """[(image path, prompt)] of one split of the toy dataset."""
    annotation = paths.annotation_path(data, SPLIT_FILES[split])
    try:
        records = json.loads(Path(annotation).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvalError(f'cannot read {annotation}: {err}; '
                        f'expected a toy dataset (tools/make_toy_dataset.py)') from None
    return [(Path(paths.image_path(data, r['path'])), r['prompt'], f'{annotation} record {i}')
            for i, r in enumerate(records)]


def held_out_pairs_of(data):
    manifest = Path(data) / MANIFEST
    if not manifest.is_file():
        raise EvalError(f'{manifest} not found: --data must be a toy dataset folder (tools/make_toy_dataset.py)')
    return {tuple(pair) for pair in json.loads(manifest.read_text())['held_out_pairs']}


def evaluate(items, held_out=(), new_kind=None):
    """Scores of [(image path, prompt, where)]: {'all_shapes': scores, 'held_out_pairs': scores or None,
    'images': [{file, prompt, read}]}. A missing image or a prompt outside the toy grammar is an EvalError.
    `new_kind`: (word, kind) - prompts name a kind of NEW_KINDS by `word`, and the judge reads it."""
    kinds = KINDS + ((new_kind[1],) if new_kind else ())
    images, scenes, found, readings = [], [], [], []
    for path, prompt, where in items:
        try:
            text = prompt if new_kind is None else ' '.join(new_kind[1] if w == new_kind[0] else w
                                                            for w in prompt.split(' '))
            scene = parse_caption(text)
        except ValueError as err:
            raise EvalError(f'{where}: {err}') from None
        try:
            with Image.open(path) as image:
                image = image.convert('RGB')
        except OSError as err:
            raise EvalError(f'{where}: cannot read image {path}: {err}') from None
        images.append(image)
        scenes.append(scene)
        seen = detect_scene(image, kinds)
        found.append(seen)
        readings.append({'file': str(path), 'prompt': prompt,
                         'read': caption(seen) if seen.shapes else f'no shapes, on a {seen.background} background'})
    return {'num_images': len(images), **alignment_report(images, scenes, held_out, found=found, kinds=kinds),
            'images': readings}


def format_table(report):
    rows = [('all shapes', report['all_shapes'])]
    if report['held_out_pairs'] is not None:
        rows.append(('held-out pairs', {k: report['held_out_pairs'][k] for k in PER_SHAPE}))
    lines = [f'{"":16s}' + ''.join(f'{name:>11s}' for name in ATTRIBUTES)]
    for label, scores in rows:
        lines.append(f'{label:16s}' + ''.join(f'{scores[k]:11.2f}' if k in scores else f'{"":11s}' for k in ATTRIBUTES))
    return '\n'.join(lines)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.images is None) == (args.split is None):
        parser.error('give either a folder of generated images or --data with --split')
    if args.split and not args.data:
        parser.error('--split needs --data')
    try:
        items = read_split(args.data, args.split) if args.split else read_generated(args.images)
        items = items[:args.limit] if args.limit else items
        report = evaluate(items, held_out_pairs_of(args.data) if args.data else (), args.new_kind)
    except EvalError as err:
        sys.exit(f'error: {err}')
    print(f'{report["num_images"]} images from {args.images or f"{args.data} ({args.split})"}')
    print(format_table(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1))
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
