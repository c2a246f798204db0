"""The toy dataset: 1-2 coloured shapes on a plain background, with systematic, concept-dense captions.

A scene is a background colour and one or two shapes, each with a colour, a kind, a size and a cell of a
3 x 3 grid; its caption names all of them, e.g. "a large red circle on the left and a small blue square at
the top right, on a gray background". `parse_caption` inverts `caption`, and `detect_scene` reads a scene
back from pixels, so generated images can be scored against their prompts (`alignment_scores`).

Splits: a few (colour, kind) pairs are held out (chosen from the seed, each colour and kind at most once):
`train` and `val` never contain them, `unseen` scenes always do (their first shape), to test composition.
Every record is a pure function of (seed, split, index).
"""
import math
import re
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# five hues far apart in RGB: a toy VAE trained for two minutes keeps them apart (orange did not survive)
COLOURS = {'red': (220, 35, 35), 'yellow': (240, 215, 30), 'green': (30, 165, 60), 'blue': (35, 75, 220),
           'purple': (150, 40, 210)}
BACKGROUNDS = {'white': (240, 240, 240), 'gray': (125, 125, 125), 'black': (20, 20, 20)}
KINDS = ('circle', 'square', 'triangle')  # a small diamond is a blurred circle after an /8 VAE
# Kinds the dataset never draws, for teaching a trained toy model a new one (tools/toy_dreambooth.py): the renderer
# draws them and the judge reads them when asked to (`kinds=`). A bar is a horizontal rectangle 0.4 as tall as it is
# long; it survives the toy VAE as an elongated blob, where a cross or a ring comes back as a round one.
NEW_KINDS = ('bar',)
BAR_HEIGHT = 0.4
SIZES = {'small': 0.2, 'large': 0.28}  # extent as a fraction of the image side; a grid cell is 1/3
# grid cell (row, column) -> name and the phrase the caption uses
POSITIONS = {(0, 0): 'top left', (0, 1): 'top', (0, 2): 'top right',
             (1, 0): 'left', (1, 1): 'center', (1, 2): 'right',
             (2, 0): 'bottom left', (2, 1): 'bottom', (2, 2): 'bottom right'}
SPLITS = {'train': 0, 'val': 1, 'unseen': 2}
NUM_HELD_OUT_PAIRS = 3
SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliased edges
POSITION_JITTER = 0.01  # of the image side: neighbouring large shapes stay apart
COLOUR_JITTER = 12  # per channel, shapes; backgrounds get half


def position_phrase(position):
    if position == 'center':
        return 'in the center'
    if position in ('left', 'right'):
        return f'on the {position}'
    return f'at the {position}'


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    size: str
    position: str  # a name of POSITIONS


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple


def caption(scene):
    """The caption of a scene."""
    parts = [f'a {s.size} {s.colour} {s.kind} {position_phrase(s.position)}' for s in scene.shapes]
    return f'{" and ".join(parts)}, on a {scene.background} background'


_ALTERNATIVES = {key: '|'.join(sorted(map(re.escape, names), key=len, reverse=True)) for key, names in (
    ('size', SIZES), ('colour', COLOURS), ('kind', KINDS + NEW_KINDS), ('position', POSITIONS.values()),
    ('background', BACKGROUNDS))}
_SHAPE_RE = (rf'a (?P<size{{i}}>{_ALTERNATIVES["size"]}) (?P<colour{{i}}>{_ALTERNATIVES["colour"]}) '
             rf'(?P<kind{{i}}>{_ALTERNATIVES["kind"]}) (?:in|on|at) the (?P<position{{i}}>{_ALTERNATIVES["position"]})')
_CAPTION_RE = re.compile(rf'{_SHAPE_RE.format(i=0)}(?: and {_SHAPE_RE.format(i=1)})?, '
                         rf'on a (?P<background>{_ALTERNATIVES["background"]}) background')


def parse_caption(text):
    """The scene a toy caption describes; ValueError for text outside the caption grammar."""
    match = _CAPTION_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f'not a toy-shapes caption: {text!r}; expected e.g. '
                         f'"a large red circle on the left, on a gray background"')
    shapes = []
    for i in (0, 1):
        if match[f'kind{i}']:
            shape = Shape(match[f'colour{i}'], match[f'kind{i}'], match[f'size{i}'], match[f'position{i}'])
            if position_phrase(shape.position) not in text:
                raise ValueError(f'wrong preposition for {shape.position!r} in {text!r}; '
                                 f'expected "{position_phrase(shape.position)}"')
            shapes.append(shape)
    return Scene(match['background'], tuple(shapes))


# ---------------------------------------------------------------- sampling scenes

def held_out_pairs(seed):
    """The (colour, kind) pairs no training scene contains: NUM_HELD_OUT_PAIRS pairs, each colour and kind
    at most once, so every colour and every kind still appears in training."""
    rng = np.random.default_rng((seed, 7919))
    colours = rng.permutation(list(COLOURS))[:NUM_HELD_OUT_PAIRS]
    kinds = rng.permutation(list(KINDS))[:NUM_HELD_OUT_PAIRS]
    return tuple(sorted((str(c), str(k)) for c, k in zip(colours, kinds)))


def _pick(rng, names):
    names = list(names)
    return names[int(rng.integers(len(names)))]


def _random_scene(rng):
    count = int(rng.integers(1, 3))
    cells = rng.permutation(len(POSITIONS))[:count]
    positions = list(POSITIONS.values())
    shapes = tuple(Shape(_pick(rng, COLOURS), _pick(rng, KINDS), _pick(rng, SIZES), positions[int(c)])
                   for c in cells)
    return Scene(_pick(rng, BACKGROUNDS), shapes)


def sample_scene(seed, split, index):
    """Record `index` of `split`: its scene and the rng that renders it (jitter), both from (seed, split, index)."""
    rng = np.random.default_rng((seed, SPLITS[split], index))
    held_out = set(held_out_pairs(seed))
    if split == 'unseen':
        scene = _random_scene(rng)
        colour, kind = sorted(held_out)[int(rng.integers(len(held_out)))]
        first = scene.shapes[0]
        scene = Scene(scene.background, (Shape(colour, kind, first.size, first.position),) + scene.shapes[1:])
        return scene, rng
    while True:  # rejection: about 3 in 4 scenes have no held-out pair
        scene = _random_scene(rng)
        if not any((s.colour, s.kind) in held_out for s in scene.shapes):
            return scene, rng


# ---------------------------------------------------------------- rendering

def _jitter_colour(rgb, rng, amount):
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def _cell_centre(position, size):
    row, col = next(cell for cell, name in POSITIONS.items() if name == position)
    return (col + 0.5) * size / 3, (row + 0.5) * size / 3


def _layout(scene, big, rng):
    """(background rgb, [(shape, rgb, cx, cy)]) of a scene on a canvas of `big` px, with `rng`'s jitter drawn in the
    one order both renderers share (so a scene's masks match its image pixel for pixel)."""
    background = BACKGROUNDS[scene.background]
    if rng is not None:
        background = _jitter_colour(background, rng, COLOUR_JITTER // 2)
    placed = []
    for shape in scene.shapes:
        cx, cy = _cell_centre(shape.position, big)
        colour = COLOURS[shape.colour]
        if rng is not None:
            cx, cy = (v + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * big for v in (cx, cy))
            colour = _jitter_colour(colour, rng, COLOUR_JITTER)
        placed.append((shape, colour, cx, cy))
    return background, placed


def _draw_shape(draw, shape, cx, cy, big, fill):
    half = SIZES[shape.size] * big / 2
    if shape.kind == 'circle':
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape.kind == 'square':
        side = half * 0.9  # a square of the full extent looks much bigger than the other kinds
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    elif shape.kind == 'bar':
        side = half * BAR_HEIGHT
        draw.rectangle([cx - half, cy - side, cx + half, cy + side], fill=fill)
    elif shape.kind == 'triangle':  # pointing up
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f'unknown shape kind {shape.kind!r}: expected one of {", ".join(KINDS + NEW_KINDS)}')


def render_scene(scene, image_size=64, rng=None):
    """The scene as an RGB PIL image of image_size x image_size; `rng` adds small position and colour jitter."""
    big = image_size * SUPERSAMPLE
    background, placed = _layout(scene, big, rng)
    canvas = Image.new('RGB', (big, big), background)
    draw = ImageDraw.Draw(canvas)
    for shape, colour, cx, cy in placed:
        _draw_shape(draw, shape, cx, cy, big, colour)
    return canvas.reduce(SUPERSAMPLE)


def render_scene_mask(scene, image_size=64, rng=None):
    """The ground truth of where a scene's shapes are: a boolean (image_size, image_size) array, True where shapes
    cover more than half a pixel of `render_scene(scene, image_size, rng)` (pass an rng in the same state to get
    the same jitter, e.g. a fresh `sample_scene(seed, split, index)[1]`)."""
    big = image_size * SUPERSAMPLE
    _, placed = _layout(scene, big, rng)
    canvas = Image.new('L', (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for shape, _, cx, cy in placed:
        _draw_shape(draw, shape, cx, cy, big, 255)
    return np.asarray(canvas.reduce(SUPERSAMPLE)) > 127


# ---------------------------------------------------------------- reading scenes back from pixels

FOREGROUND_THRESHOLD = 45  # max channel difference from the background
# of a small circle's area (about 13 px at 64 px): a blob at least this big is a shape, so a spurious one makes the
# count wrong; smaller specks are noise. 0.3 let 6 x 6 px spurious blobs pass unseen
MIN_AREA_FRACTION = 0.1


def _nearest(rgb, table):
    return min(table, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, table[name])))


def _components(mask):
    """4-connected components of a boolean mask, as arrays of (row, col) pixel coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        found.append(np.array(pixels))
    return found


# Kinds are told apart by moments of the blob's soft mask (contrast / the blob's own contrast, in [0, 1]):
# blurring adds a symmetric kernel, which leaves the numerators of these moments unchanged and only grows the
# second moment in their denominators, so blurred shapes keep their signs. Ideal values and, after a Gaussian
# blur of 2.5 px on a 64 px image, the 5-95% ranges measured on rendered validation scenes:
#   vertical skewness        triangle (apex up) -0.57, blurred -0.36..-0.18;  circle, square 0 (+-0.03)
#   4-fold moment Re(z^4)    square -0.43, blurred -0.24..-0.10;  circle 0 (-0.03..0.09)
#   elongation (var_x - var_y) / (var_x + var_y)   bar 0.70-0.74, in the toy VAE's reconstructions 0.20-0.56;
#                            circle, square -0.04..0.04 (blurred too); triangle < 0 (-0.20..-0.07 blurred)
# The thresholds sit about midway between the kinds' blurred ranges.
TRIANGLE_SKEW = -0.12
SQUARE_FOURFOLD = -0.1
BAR_ELONGATION = 0.12


def _classify_kind(rows, cols, weights, kinds=KINDS):
    """circle / square / triangle (and a bar when `kinds` holds it) from a blob's pixel coordinates and soft-mask
    weights."""
    weights = weights / weights.sum()
    y = rows - (weights * rows).sum()
    x = cols - (weights * cols).sum()
    skew = (weights * y ** 3).sum() / max((weights * y * y).sum(), 1e-9) ** 1.5
    if skew < TRIANGLE_SKEW:  # image rows grow downwards: an upward triangle's mass sits low, its tail high
        return 'triangle'
    if 'bar' in kinds:
        var_x, var_y = (weights * x * x).sum(), (weights * y * y).sum()
        if (var_x - var_y) / max(var_x + var_y, 1e-9) > BAR_ELONGATION:
            return 'bar'
    fourfold = ((weights * (x ** 4 - 6 * x * x * y * y + y ** 4)).sum()
                / max((weights * (x * x + y * y) ** 2).sum(), 1e-9))
    return 'square' if fourfold < SQUARE_FOURFOLD else 'circle'


def _pixels(image):
    return np.asarray(image.convert('RGB') if isinstance(image, Image.Image) else image).astype(np.float32)


def _blobs(pixels):
    """(background rgb, contrast (H, W), [(rows, cols, soft, peak)]) of an image (H, W, 3) float: the background
    is the border's median, a pixel's contrast its largest channel difference from it; each blob is a connected
    region of contrast above FOREGROUND_THRESHOLD, big enough to count as a shape, with its own contrast `peak` (of
    its median colour) and its pixels' soft mask (contrast / peak, clipped to [0, 1])."""
    size = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    contrast = np.abs(pixels - background_rgb).max(axis=2)
    min_area = MIN_AREA_FRACTION * math.pi * (SIZES['small'] * size / 2) ** 2
    blobs = []
    for blob in _components(contrast > FOREGROUND_THRESHOLD):
        if len(blob) < min_area:
            continue
        rows, cols = blob[:, 0], blob[:, 1]
        colour = np.median(pixels[rows, cols], axis=0)
        peak = np.abs(colour - background_rgb).max()
        blobs.append((rows, cols, np.clip(contrast[rows, cols] / peak, 0.0, 1.0), peak))
    return background_rgb, contrast, blobs


def _check_kinds(kinds):
    unknown = [k for k in kinds if k not in KINDS + NEW_KINDS]
    if unknown or not set(KINDS) <= set(kinds):
        raise ValueError(f'kinds {tuple(kinds)}: expected the dataset kinds {KINDS} plus any of {NEW_KINDS}')


def detect_scene(image, kinds=KINDS):
    """A Scene read from an RGB image (PIL or uint8 array): background = nearest named colour of the border's
    median, shapes = connected blobs differing from it, each classified by colour, moments, extent and cell.
    `kinds`: the kinds a blob may be read as, the dataset's and any of NEW_KINDS."""
    _check_kinds(kinds)
    pixels = _pixels(image)
    size = pixels.shape[0]
    size_threshold = (SIZES['small'] + SIZES['large']) / 2 * size
    background_rgb, _, blobs = _blobs(pixels)
    shapes = []
    for rows, cols, soft, _ in blobs:
        # the blob's outline at half its contrast: blurred edges (a VAE's, a generator's) do not swell it
        core = soft > 0.5
        if not core.any():
            continue
        core_rows, core_cols = rows[core], cols[core]
        centre_r = (core_rows.min() + core_rows.max()) / 2
        centre_c = (core_cols.min() + core_cols.max()) / 2
        cell = (min(int(centre_r * 3 / size), 2), min(int(centre_c * 3 / size), 2))
        extent = max(core_rows.max() - core_rows.min(), core_cols.max() - core_cols.min()) + 1
        kind = _classify_kind(rows.astype(np.float64), cols.astype(np.float64), soft, kinds)
        inner = soft > 0.75  # blurred edges mix the colour with the background's
        inner = inner if inner.any() else np.ones_like(inner)
        colour = np.median(pixels[rows[inner], cols[inner]], axis=0)
        shapes.append(Shape(_nearest(colour, COLOURS), kind, 'large' if extent > size_threshold else 'small',
                            POSITIONS[cell]))
    return Scene(_nearest(background_rgb, BACKGROUNDS), tuple(shapes))


# half a pixel's coverage, less 8-bit rounding: a shape edge on a half-pixel boundary blends to exactly half contrast
HALF_CONTRAST = 0.49


def _grow(mask):
    """A boolean mask grown by one pixel (8-neighbourhood)."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    return np.logical_or.reduce([padded[1 + dr:1 + dr + height, 1 + dc:1 + dc + width]
                                 for dr in (-1, 0, 1) for dc in (-1, 0, 1)])


def shape_mask(image):
    """Where an image (PIL or uint8 array) shows shapes: a boolean (H, W) array, True where a blob `detect_scene`
    reads (the same background, threshold and minimum area) has at least half its own contrast, so blurred edges
    do not swell a shape and an anti-aliased render gives its shapes' half-coverage outline. A blob's edge pixels
    just under the detection threshold (low-contrast shapes: purple on gray is 76 levels) are included when they
    reach half contrast."""
    pixels = _pixels(image)
    mask = np.zeros(pixels.shape[:2], dtype=bool)
    _, contrast, blobs = _blobs(pixels)
    for rows, cols, _, peak in blobs:
        blob = np.zeros_like(mask)
        blob[rows, cols] = True
        mask |= _grow(blob) & (contrast >= HALF_CONTRAST * peak)
    return mask


def mask_iou(a, b):
    """Intersection over union of two boolean masks of one shape; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f'masks of different shapes: {a.shape} and {b.shape}')
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def scene_masks(seed, split, indices, image_size=64):
    """The ground-truth shape masks (`render_scene_mask`, with the records' own jitter) of records `indices` of a
    toy dataset's `split` built with `seed`: what `write_toy_dataset` rendered, as masks."""
    masks = []
    for index in indices:
        scene, rng = sample_scene(seed, split, index)
        masks.append(render_scene_mask(scene, image_size, rng))
    return masks


def _blob_in_cell(seen, position):
    """The blob `detect_scene` found at `position` (a shape's cell), or None."""
    return next((blob for blob in seen.shapes if blob.position == position), None)


def alignment_scores(images, scenes, only=None, found=None, kinds=KINDS):
    """How well images show their scenes, as fractions in [0, 1]: `background`, `count` (as many blobs as
    shapes), and per described shape `position` (a blob in its cell), `colour`, `kind`, `size` (that blob's
    attributes; a missing blob counts as wrong) and `all` (every attribute right). `only(shape) -> bool`
    limits the per-shape scores to the shapes it accepts (e.g. those of held-out colour-kind pairs).
    `found`: the images' `detect_scene` results, when the caller already has them; `kinds` as for `detect_scene`."""
    found = [detect_scene(image, kinds) for image in images] if found is None else found
    totals = dict(background=0, count=0, position=0, colour=0, kind=0, size=0, all=0)
    num_shapes = 0
    for seen, scene in zip(found, scenes, strict=True):
        totals['background'] += seen.background == scene.background
        totals['count'] += len(seen.shapes) == len(scene.shapes)
        for shape in scene.shapes:
            if only is not None and not only(shape):
                continue
            num_shapes += 1
            match = _blob_in_cell(seen, shape.position)
            if match is None:
                continue
            hits = {key: getattr(match, key) == getattr(shape, key) for key in ('colour', 'kind', 'size')}
            totals['position'] += 1
            for key, hit in hits.items():
                totals[key] += hit
            totals['all'] += all(hits.values())
    per_scene = ('background', 'count')
    return {key: value / (len(scenes) if key in per_scene else max(num_shapes, 1)) for key, value in totals.items()}


def alignment_report(images, scenes, held_out=(), found=None, kinds=KINDS):
    """`alignment_scores` over every described shape ('all_shapes') and over the shapes whose (colour, kind)
    pair is in `held_out` ('held_out_pairs'; None when no scene has one), reading each image once:
    tools/eval_toy_alignment.py and the quickstart report these. `found` and `kinds` as for `alignment_scores`."""
    found = [detect_scene(image, kinds) for image in images] if found is None else found
    held_out = {tuple(pair) for pair in held_out}
    has_held_out = any((s.colour, s.kind) in held_out for scene in scenes for s in scene.shapes)
    return {'all_shapes': alignment_scores(images, scenes, found=found),
            'held_out_pairs': alignment_scores(images, scenes, only=lambda s: (s.colour, s.kind) in held_out,
                                               found=found) if has_held_out else None,
            'kind_confusion': kind_confusion(images, scenes, found=found, kinds=kinds)}


MISSING = 'missing'


def kind_confusion(images, scenes, found=None, kinds=KINDS):
    """What the judge read each described shape as: {described kind: {'read': {read kind, or MISSING when no blob is
    in its cell: count}, 'by_size': {size: the same}}}, so a kind accuracy tells which kinds are confused (the toy
    model's circles read as squares, e.g.). Kinds no scene describes are left out. `found` and `kinds` as for
    `alignment_scores`."""
    found = [detect_scene(image, kinds) for image in images] if found is None else found
    reads, by_size = kinds + (MISSING,), {}
    for seen, scene in zip(found, scenes, strict=True):
        for shape in scene.shapes:
            match = _blob_in_cell(seen, shape.position)
            counts = by_size.setdefault(shape.kind, {size: dict.fromkeys(reads, 0) for size in SIZES})
            counts[shape.size][match.kind if match is not None else MISSING] += 1
    return {kind: {'read': {read: sum(c[read] for c in by_size[kind].values()) for read in reads},
                   'by_size': by_size[kind]} for kind in kinds if kind in by_size}


def format_kind_confusion(confusion):
    """Lines of a `kind_confusion` table: each described kind's count, accuracy (per size too) and what it was read
    as."""
    lines = []
    for kind, row in confusion.items():
        total = sum(row['read'].values())
        sizes = ', '.join(f'{size} {counts[kind] / sum(counts.values()):.2f}'
                          for size, counts in row['by_size'].items() if sum(counts.values()))
        read = ', '.join(f'{name} {count}' for name, count in row['read'].items() if count)
        lines.append(f'{kind:>9s} ({total}): right {row["read"][kind] / total:.2f} ({sizes}); read as {read}')
    return lines


def mirrored_cell(position):
    """The position point-reflected through the center (left <-> right, top left <-> bottom right, ...); the center
    has none (ValueError)."""
    row, col = next(cell for cell, name in POSITIONS.items() if name == position)
    if (row, col) == (1, 1):
        raise ValueError('the center has no mirrored cell')
    return POSITIONS[(2 - row, 2 - col)]


def contradicting_scene(scene):
    """A scene whose every shape is in the point-reflected cell and of the next kind (circle -> square -> triangle
    -> circle), colours, sizes and background kept: a caption that contradicts `scene`'s edges in place and kind,
    and agrees with them on nothing else they show. Shapes in the center have no such cell (ValueError)."""
    return Scene(scene.background, tuple(Shape(s.colour, KINDS[(KINDS.index(s.kind) + 1) % len(KINDS)], s.size,
                                               mirrored_cell(s.position)) for s in scene.shapes))


# ---------------------------------------------------------------- what a toy model understands (the demo says it)

def vocabulary_note():
    """One line on the only grammar a toy model knows."""
    return (f'This toy model knows one small grammar: "a SIZE COLOUR KIND POSITION[ and a SIZE COLOUR KIND POSITION], '
            f'on a BACKGROUND background", sizes {"/".join(SIZES)}, colours {"/".join(COLOURS)}, kinds '
            f'{"/".join(KINDS)}, positions "at the top left", "at the top", ..., "in the center", "on the left", ..., '
            f'"at the bottom right", backgrounds {"/".join(BACKGROUNDS)}. Other words mean nothing to it.')


def example_prompts(dataset_dir, per_split=4):
    """(prompts, held-out pairs) of a toy dataset folder: the first `per_split` prompts of the val split, then of
    the unseen split (whose first shape is a colour-kind pair no training image has), and those pairs."""
    import json
    from pathlib import Path

    from diffusion.data import paths
    held_out = [tuple(p) for p in json.loads((Path(dataset_dir) / MANIFEST).read_text())['held_out_pairs']]
    prompts = []
    for split in ('val', 'unseen'):
        records = json.loads(Path(paths.annotation_path(dataset_dir, SPLIT_FILES[split])).read_text())
        prompts += [record['prompt'] for record in records[:per_split]]
    return prompts, held_out


# ---------------------------------------------------------------- writing the dataset

SPLIT_FILES = {'train': 'data_info.json', 'val': 'val_info.json', 'unseen': 'unseen_info.json'}
MANIFEST = 'toy_shapes.json'


def write_toy_dataset(out_dir, num_train=4000, num_val=200, num_unseen=200, image_size=64, seed=0,
                      overwrite=False, progress=True):
    """Render the toy dataset into `out_dir` in the InternalData layout: `images/<split>/<index>.png` and
    `partition/{data_info,val_info,unseen_info}.json`, plus `toy_shapes.json` describing the build. An
    existing toy folder is replaced only with `overwrite` (its features go too: they would be stale).
    Returns the manifest dict."""
    import json
    import shutil
    from pathlib import Path

    from tqdm import tqdm

    from diffusion.data import paths
    from diffusion.utils.fileio import atomic_write_text, save_png

    out_dir = Path(out_dir)
    if image_size % 8 or image_size < 32:
        raise ValueError(f'image_size must be a multiple of 8 and at least 32, got {image_size}')
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST).is_file():
            raise FileExistsError(f'{out_dir} is not empty and is not a toy-shapes folder (no {MANIFEST}); '
                                  f'choose another --out')
        if not overwrite:
            raise FileExistsError(f'{out_dir} already holds a toy dataset; pass --overwrite to rebuild it '
                                  f'(its extracted features are deleted too)')
        shutil.rmtree(out_dir)
    counts = {'train': num_train, 'val': num_val, 'unseen': num_unseen}
    bar = tqdm(total=sum(counts.values()), desc='rendering', unit='img', disable=not progress, dynamic_ncols=True)
    for split, count in counts.items():
        records = []
        for index in range(count):
            scene, rng = sample_scene(seed, split, index)
            rel_path = f'{split}/{index:05d}.png'
            save_png(paths.image_path(out_dir, rel_path), render_scene(scene, image_size, rng))
            records.append({'path': rel_path, 'prompt': caption(scene), 'height': image_size,
                            'width': image_size, 'ratio': 1.0})
            bar.update(1)
        atomic_write_text(paths.annotation_path(out_dir, SPLIT_FILES[split]), json.dumps(records, indent=1))
    bar.close()
    manifest = {
        'seed': seed, 'image_size': image_size, 'counts': counts, 'annotation_files': SPLIT_FILES,
        'held_out_pairs': [list(p) for p in held_out_pairs(seed)], 'colours': list(COLOURS),
        'backgrounds': list(BACKGROUNDS), 'kinds': list(KINDS), 'sizes': list(SIZES),
        'positions': list(POSITIONS.values()),
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest
