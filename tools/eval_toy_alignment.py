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
(--data) says which pairs were held out; then, per described kind and size, what the judge read the shapes as
(kind_confusion: which kinds are confused for which). With --data, images steered by a ControlNet whose control
image is a record of that dataset (metadata.jsonl's `control_image`, e.g. data/toy_shapes/images/val/00003.png)
also get
  mask IoU    intersection over union of the image's shape mask (`shape_mask`: the blobs the judge reads, at half
              their contrast) with the control record's shapes as the toy renderer drew them (`render_scene_mask`)
and a split scored by --split gets it against its own records (the judge's ceiling: 1.00 on the renders).

Inputs: a folder written by scripts/inference.py (its metadata.jsonl names each image and its prompt), or a
split of the toy dataset itself (--split: the dataset's own images, i.e. the detector's ceiling). Examples:
  python scripts/inference.py --config configs/pixart_config/PixArt_toy_shapes.py \\
      --model_path output/quickstart/train/checkpoints/<latest>.pth --txt_file prompts.txt \\
      --output-dir output/toy_samples
  python tools/eval_toy_alignment.py output/toy_samples --data data/toy_shapes
  python tools/eval_toy_alignment.py --data data/toy_shapes --split unseen
  # a toy ControlNet (scripts/toy_controlnet.py) steered by a held-out scene's edges: mask IoU with its shapes
  python scripts/inference.py --config configs/pixart_app_config/PixArt_toy_controlCanny.py \\
      --model_path output/toy_controlnet/train/checkpoints/<latest>.pth --control_image \\
      data/toy_shapes/images/val/00000.png --prompt "<its caption>" --output-dir output/toy_control_samples
  python tools/eval_toy_alignment.py output/toy_control_samples --data data/toy_shapes
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import json

from PIL import Image

from diffusion.data import paths
from diffusion.data.toy_shapes import (KINDS, MANIFEST, NEW_KINDS, SPLIT_FILES, alignment_report, caption,
                                       detect_scene, format_kind_confusion, mask_iou, parse_caption,
                                       scene_masks, shape_mask)
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
    parser.add_argument('--new-kind', metavar='PHRASE=KIND', type=new_kind_argument, default=None,
                        help=f'score a kind the dataset never draws ({", ".join(NEW_KINDS)}; tools/toy_dreambooth.py '
                             'teaches one), named PHRASE in the prompts, e.g. --new-kind "sks square=bar": PHRASE (one '
                             'or more words) is read as KIND and the judge also reads blobs as KIND')
    return parser


def new_kind_argument(text):
    phrase, sep, kind = text.partition('=')
    words = phrase.split(' ')
    if not sep or not all(words) or kind not in NEW_KINDS:
        raise argparse.ArgumentTypeError(f'{text!r}: expected PHRASE=KIND with PHRASE one or more words (single '
                                         f'spaces) and KIND one of {", ".join(NEW_KINDS)}, e.g. "sks square=bar"')
    return phrase, kind


def name_new_kind(prompt, phrase, kind):
    """`prompt` with every whole-word occurrence of `phrase` replaced by `kind`."""
    return f' {prompt} '.replace(f' {phrase} ', f' {kind} ').strip(' ')


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def read_generated(folder):
    """[(image path, prompt, where, control image path or None)] from a scripts/inference.py output folder."""
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
            control = record.get('control_image')
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise EvalError(f'{meta} line {number}: expected a JSON object with "file" and "prompt" ({err})') from None
        items.append((folder / name, prompt, f'{meta} line {number}', control))
    if not items:
        raise EvalError(f'{meta} lists no images')
    return items


def split_records(data, split):
    """(annotation file, its records) of one split of the toy dataset."""
    annotation = paths.annotation_path(data, SPLIT_FILES[split])
    try:
        return annotation, json.loads(Path(annotation).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvalError(f'cannot read {annotation}: {err}; '
                        f'expected a toy dataset (tools/make_toy_dataset.py)') from None


def read_split(data, split):
    """[(image path, prompt, where, image path)] of one split of the toy dataset: each image is its own control."""
    annotation, records = split_records(data, split)
    return [(Path(paths.image_path(data, r['path'])), r['prompt'], f'{annotation} record {i}',
             paths.image_path(data, r['path'])) for i, r in enumerate(records)]


def toy_manifest(data):
    manifest = Path(data) / MANIFEST
    if not manifest.is_file():
        raise EvalError(f'{manifest} not found: --data must be a toy dataset folder (tools/make_toy_dataset.py)')
    return json.loads(manifest.read_text())


def held_out_pairs_of(data):
    return {tuple(pair) for pair in toy_manifest(data)['held_out_pairs']}


def toy_records(data):
    """{resolved image path: (split, index)} of every record of the toy dataset `data`: record `index` of a split is
    the scene `sample_scene(seed, split, index)` (write_toy_dataset writes them in that order)."""
    return {Path(paths.image_path(data, record['path'])).resolve(): (split, index)
            for split in SPLIT_FILES for index, record in enumerate(split_records(data, split)[1])}


def evaluate(items, held_out=(), data=None, new_kind=None):
    """Scores of [(image path, prompt, where, control image or None)]: {'all_shapes': scores, 'held_out_pairs':
    scores or None, 'mask_iou': {'images', 'mean'} or None, 'images': [{file, prompt, read, mask_iou}]}. `data`: the
    toy dataset whose records, as control images, give the ground-truth masks of the mask IoU. A missing image or a
    prompt outside the toy grammar is an EvalError. `new_kind`: (phrase, kind) - prompts name a kind of NEW_KINDS by
    `phrase`, and the judge reads it."""
    kinds = KINDS + ((new_kind[1],) if new_kind else ())
    manifest = toy_manifest(data) if data is not None else None
    records = toy_records(data) if data is not None else {}
    images, scenes, found, readings, ious = [], [], [], [], []
    for path, prompt, where, control in items:
        try:
            text = prompt if new_kind is None else name_new_kind(prompt, *new_kind)
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
        reading = {'file': str(path), 'prompt': prompt,
                   'read': caption(seen) if seen.shapes else f'no shapes, on a {seen.background} background'}
        record = records.get(Path(control).resolve()) if control is not None else None
        if record is not None:
            truth = scene_masks(manifest['seed'], record[0], [record[1]], manifest['image_size'])[0]
            if truth.shape != (image.height, image.width):
                raise EvalError(f'{where}: image {path} is {image.width}x{image.height}, its control record '
                                f'{control} {truth.shape[1]}x{truth.shape[0]}')
            reading['mask_iou'] = mask_iou(shape_mask(image), truth)
            ious.append(reading['mask_iou'])
        readings.append(reading)
    iou = {'images': len(ious), 'mean': sum(ious) / len(ious)} if ious else None
    return {'num_images': len(images), **alignment_report(images, scenes, held_out, found=found, kinds=kinds), 'mask_iou': iou,
            'images': readings}


def format_table(report):
    rows = [('all shapes', report['all_shapes'])]
    if report['held_out_pairs'] is not None:
        rows.append(('held-out pairs', {k: report['held_out_pairs'][k] for k in PER_SHAPE}))
    lines = [f'{"":16s}' + ''.join(f'{name:>11s}' for name in ATTRIBUTES)]
    for label, scores in rows:
        lines.append(f'{label:16s}' + ''.join(f'{scores[k]:11.2f}' if k in scores else f'{"":11s}' for k in ATTRIBUTES))
    lines.append('shapes by described kind:')
    lines += ['  ' + line for line in format_kind_confusion(report['kind_confusion'])]
    if report['mask_iou'] is not None:
        lines.append(f'mask IoU with the control records\' shapes: {report["mask_iou"]["mean"]:.2f} '
                     f'({report["mask_iou"]["images"]} images)')
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
        report = evaluate(items, held_out_pairs_of(args.data) if args.data else (), args.data, args.new_kind)
    except EvalError as err:
        sys.exit(f'error: {err}')
    print(f'{report["num_images"]} images from {args.images or f"{args.data} ({args.split})"}')
    print(format_table(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1))
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
