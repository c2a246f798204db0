"""Where every file of a dataset lives: the one definition, used by the datasets and the feature extractor.

A dataset folder (`data_root / data.root` in a config) holds:

    partition/<name>.json                 annotation lists (InternalData, InternalDataMS), SPEC section 7
    partition/part<k>.txt                 image lists (SAM), one image name a line
    images/<path>                         the images; <path> is the record's relative path
    captions/<stem>.txt                   raw captions of SAM records (the json datasets carry `prompt`)
    caption_feature_wmask/<stem>.npz      T5 features: caption_feature (1, L, C), attention_mask (1, L)
    img_vae_feature/train_vae_<S>/noflip/<stem>.npy     VAE mean+std (8, S/8, S/8), single resolution S
    img_vae_feature/train_vae_<S>_ms/noflip/<stem>.npy  VAE mean+std at the record's bucket of table S
    <condition>_feature_<S>[_ms]/<stem>.npy  ControlNet condition (canny/hed edge map) VAE mean+std, as above

<stem> is the record's relative path without its suffix, sub-folders kept: `a/b/x.png` -> `a/b/x.npz`. The
reference flattens `a/b/x.png` to `a_b/x` in one place and `b_x` in another (SPEC section 9 point 5); here
both sides call these functions, and `check_unique_feature_stems` rejects two records sharing a stem.
"""
from pathlib import Path, PurePosixPath

ANNOTATION_DIR = 'partition'
IMAGE_DIR = 'images'
CAPTION_DIR = 'captions'
CAPTION_FEATURE_DIR = 'caption_feature_wmask'
VAE_FEATURE_DIR = 'img_vae_feature'
FAILURES_NAME = 'extract_failures'


def dataset_dir(data_root, root):
    """The dataset folder: `root` under `data_root` (an absolute `root` is used as is)."""
    return Path(data_root) / root


def annotation_path(dataset, name):
    """An annotation json or partition txt of the dataset, e.g. `partition/data_info.json`."""
    return Path(dataset) / ANNOTATION_DIR / name


def record_stem(rel_path):
    """The feature stem of a record: its relative image path without the suffix, as a POSIX string."""
    return str(PurePosixPath(rel_path).with_suffix(''))


def image_path(dataset, rel_path):
    return Path(dataset) / IMAGE_DIR / rel_path


def caption_text_path(dataset, rel_path):
    """The raw caption file of a SAM record."""
    return Path(dataset) / CAPTION_DIR / f'{record_stem(rel_path)}.txt'


def caption_feature_path(dataset, rel_path):
    """The T5 feature file (.npz) of the record whose image is `images/<rel_path>`."""
    return Path(dataset) / CAPTION_FEATURE_DIR / f'{record_stem(rel_path)}.npz'


def vae_feature_dir(dataset, image_size, multi_scale=False):
    """The folder of VAE features at `image_size` (the bucket table's size when `multi_scale`)."""
    name = f'train_vae_{int(image_size)}' + ('_ms' if multi_scale else '')
    return Path(dataset) / VAE_FEATURE_DIR / name / 'noflip'


def vae_feature_path(dataset, rel_path, image_size, multi_scale=False):
    """The VAE feature file (.npy) of the record whose image is `images/<rel_path>`."""
    return vae_feature_dir(dataset, image_size, multi_scale) / f'{record_stem(rel_path)}.npy'


def condition_feature_dir(dataset, condition, image_size, multi_scale=False):
    """The folder of a ControlNet condition's VAE features (the reference's `hed_feature_<S>`), e.g.
    `canny_feature_512`; `_ms` for the bucket sizes of table `image_size`."""
    return Path(dataset) / (f'{condition}_feature_{int(image_size)}' + ('_ms' if multi_scale else ''))


def condition_feature_path(dataset, rel_path, condition, image_size, multi_scale=False):
    """The condition feature file (.npy, mean+std like a VAE feature) of the record `images/<rel_path>`."""
    return condition_feature_dir(dataset, condition, image_size, multi_scale) / f'{record_stem(rel_path)}.npy'


def failures_path(dataset, rank=0, world_size=1):
    """Where the feature extractor lists the records it could not process (one file per shard)."""
    suffix = '' if world_size == 1 else f'_rank{rank}_of_{world_size}'
    return Path(dataset) / f'{FAILURES_NAME}{suffix}.jsonl'


def check_relative_path(rel_path):
    """Raise ValueError unless `rel_path` is a relative path that stays inside the images folder."""
    pure = PurePosixPath(str(rel_path).replace('\\', '/'))
    if not str(rel_path) or pure.is_absolute() or '..' in pure.parts or not pure.suffix:
        raise ValueError(f'expected a relative image path with a suffix inside {IMAGE_DIR}/ '
                         f'(no leading "/", no ".."), got {rel_path!r}')


def check_unique_feature_stems(listed):
    """Raise ValueError if two records would share a feature file (e.g. `x.png` and `x.jpg`); `listed` holds
    (relative image path, where the record is listed) pairs."""
    seen = {}
    for rel_path, source in listed:
        stem = record_stem(rel_path)
        if stem in seen:
            first_path, first_source = seen[stem]
            raise ValueError(f'{first_source} ({first_path!r}) and {source} ({rel_path!r}) would share the '
                             f'feature files of {stem!r}; rename one image')
        seen[stem] = (rel_path, source)
