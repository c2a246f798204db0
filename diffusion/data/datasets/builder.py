"""Build a dataset from a config's `data` dict (`type` = InternalData, InternalDataMS or SAM)."""
import inspect

from diffusion.data.datasets.internal import InternalData, InternalDataMS
from diffusion.data.datasets.sam import SAM
from diffusion.utils.names import lookup

DATASETS = {cls.__name__: cls for cls in (InternalData, InternalDataMS, SAM)}


def dataset_class(name):
    """The dataset class a config's `data.type` names."""
    return lookup(DATASETS, name, 'dataset (data.type)')


def build_dataset(data_cfg, data_root='', **kwargs):
    """The dataset `data_cfg['type']` built with the other `data_cfg` entries and `kwargs` (resolution,
    max_length, caption_channels, text_encoder, ...); the dataset folder is `data_root / data_cfg['root']`."""
    options = dict(data_cfg)
    name = options.pop('type', None)
    cls = dataset_class(name)
    # The base config's `data` dict carries `image_list_json`, so every config inherits it; SAM reads
    # `image_list_txt` instead, and the json datasets would have no use for a txt list.
    for other in {c.annotation_list_key for c in DATASETS.values()} - {cls.annotation_list_key}:
        options.pop(other, None)
    twice = sorted(set(options) & set(kwargs))
    if twice:
        raise TypeError(f'dataset arguments {twice} are given both in data and as keyword arguments')
    options.update(kwargs)
    accepted = set(inspect.signature(cls.__init__).parameters)
    accepted |= set(inspect.signature(InternalData.__init__).parameters)  # what subclasses pass on in **kwargs
    unknown = sorted(set(options) - accepted - {'self', 'kwargs'})
    if unknown:
        raise TypeError(f'{name} takes no argument(s) {unknown} (from data.*); it accepts '
                        f'{sorted(accepted - {"self", "kwargs"})}')
    return cls(data_root=data_root, **options)


def build_dataset_from_config(cfg, **kwargs):
    """The training dataset of a loaded config: `cfg.data` under `cfg.data_root`, at `cfg.image_size`, with the
    config's caption length and width (and bucket table for InternalDataMS; condition features for a ControlNet)."""
    derived = dict(resolution=cfg.image_size, max_length=cfg.model_max_length, caption_channels=cfg.caption_channels)
    if cfg.data.get('type') == 'InternalDataMS' and cfg.aspect_ratio_type:
        derived['aspect_ratio_type'] = cfg.aspect_ratio_type
    if cfg.get('controlnet', False):
        derived['control_condition'] = cfg.control_condition
    derived.update(kwargs)
    return build_dataset(cfg.data, data_root=cfg.data_root, **derived)
