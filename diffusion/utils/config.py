"""Load, override, validate and freeze configs (mmengine python config files with `_base_`).

The base config `configs/PixArt_xl2_internal.py` is the schema: every top-level key of a config must be
defined there, with a value of the same type, and a dict may only hold the keys the base config's
`_dict_keys_` block lists (per dataset, optimizer, schedule or model where they depend on one). Each value
must also lie in the range `VALUE_RULES` gives its (dotted) key, and a few combinations of keys are checked
(`_check_combinations`). Config files and overrides are checked alike: the error names the key, the value,
where it was set (the file, --cfg-options or with_overrides()) and what is accepted. A loaded config is
read-only; change it with `--cfg-options key=value` on the command line or `cfg.with_overrides({...})` in
code. The keys in `INERT_KEYS` are accepted but do nothing; a value other than the base config's draws an
`InertConfigKeyWarning` naming it.
"""
import argparse
import ast
import copy
import difflib
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from mmengine.config import Config

from diffusion.data.aspect_ratios import table_names
from diffusion.release import VAE_DOWNSAMPLE, XL_2_SHAPE
from diffusion.utils.fileio import atomic_write_text

SCHEMA_PATH = Path(__file__).resolve().parents[2] / 'configs' / 'PixArt_xl2_internal.py'
# Bookkeeping keys mmengine may leave inside dicts; they are not config fields.
_MMENGINE_PRIVATE_KEYS = ('_scope_', '_delete_')
_READ_ONLY = 'the config is read-only after loading; use --cfg-options KEY=VALUE or cfg.with_overrides({...})'
# Keys of the reference's configs that no code here reads (its token-masking experiment, evaluation runs, remote
# storage, and the LCM config's guidance range, which its trainer never reads either). They are accepted so that the
# released configs load as they are.
INERT_KEYS = ('mask_type', 'num_group_tokens', 'mask_loss_coef', 'load_mask_index', 'eval_batch_size', 'valid_num',
              'eval_sampling_steps', 'save_image_epochs', 'tensorboard_mox_interval', 's3_work_dir', 'w_min', 'w_max')
DIFFUSION_STEPS = 1000  # the steps of the training diffusion (IDDPM's default); train_sampling_steps respaces them
DEFAULT_PATCH_SIZE = XL_2_SHAPE['patch_size']  # PixArt's default patch size too


class ConfigError(ValueError):
    """A config file or override is missing, unknown, mistyped, out of range, or a loaded config was modified."""


class ReadOnlyConfigError(ConfigError, TypeError):
    """Raised on any attempt to modify a loaded config (a TypeError too, like modifying a tuple)."""


class InertConfigKeyWarning(UserWarning):
    """A config sets one of `INERT_KEYS`, which no code reads, to a value other than the base config's."""


# ---------------------------------------------------------------- the schema

@dataclass(frozen=True)
class Schema:
    """What a config may hold, as the base config says: its values, the type of each top-level key (None: any),
    the keys that may be None (`_may_be_none_`) and the keys of each dict (`_dict_keys_`)."""
    defaults: dict
    types: dict
    may_be_none: tuple
    dict_keys: dict

    @classmethod
    def from_file(cls, path):
        if not os.path.isfile(path):
            raise ConfigError(f'schema (base config) not found: {path}')
        raw = Config.fromfile(str(path)).to_dict()
        defaults = _strip_private(raw)
        types = {key: None if value is None else type(value) for key, value in defaults.items()}
        return cls(defaults, types, tuple(raw.get('_may_be_none_', ())), raw.get('_dict_keys_', {}))

    def choices(self, key):
        """(what selects the keys of dict `key`, {choice: its keys}), or (None, None) for a fixed set of keys."""
        spec = self.dict_keys.get(key)
        if not isinstance(spec, Mapping):
            return None, None
        return spec['per'], {name: keys for name, keys in spec.items() if name != 'per'}

    def keys_of(self, key, data, source_of):
        """The keys dict `key` of `data` may hold (its `type` included), and the choice that selects them."""
        per, choices = self.choices(key)
        if per is None:
            keys = self.dict_keys.get(key)
            return list(keys if keys is not None else self.defaults.get(key) or ()), None
        own_type = per == f'{key}.type'
        if own_type and 'type' not in data[key]:
            raise ConfigError(f'config key {per!r} is missing {_where(source_of(key))}; expected one of '
                              f'{_listing(choices)}')
        choice = data[key]['type'] if own_type else data.get(per)
        if not isinstance(choice, str) or choice not in choices:
            close = difflib.get_close_matches(str(choice), list(choices), n=3, cutoff=0.6)
            hint = f' (did you mean {" or ".join(map(repr, close))}?)' if close else ''
            raise _value_error(per, choice, f'one of {_listing(choices)}{hint}', source_of(per))
        return list(choices[choice]) + (['type'] if own_type else []), choice


def _listing(names):
    return ', '.join(map(repr, names))


# ---------------------------------------------------------------- loading

def load_config(path, cfg_options=None, schema_path=SCHEMA_PATH):
    """Load `path` (resolving `_base_`), apply dotted `cfg_options`, validate, and return a FrozenConfig."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    try:
        data = Config.fromfile(path).to_dict()
    except Exception as err:  # a bad `_base_` path, a syntax error, a dict over a non-dict base value...
        raise ConfigError(f'cannot load config {path}: {type(err).__name__}: {err}') from err
    schema = Schema.from_file(schema_path)
    data = _validate(_strip_private(data), schema, source=path)
    if cfg_options:
        data = _apply_overrides(data, cfg_options, schema, source='--cfg-options')
    _check_values(data, schema, _Sources(path, cfg_options or {}, '--cfg-options'))
    _warn_about_inert_keys(data, schema.defaults, path, cfg_options or {})
    return FrozenConfig(data, filename=path, schema=schema)


def add_cfg_options_argument(parser):
    """Add `--cfg-options KEY=VALUE ...` to an argparse parser; pass `args.cfg_options` to load_config."""
    return parser.add_argument(
        '--cfg-options', nargs='+', action=KeyValueAction, metavar='KEY=VALUE', default=None,
        help='override config fields, e.g. --cfg-options train_batch_size=4 optimizer.lr=1e-4. '
             'Use dotted keys for nested fields; values are Python literals (numbers, True/False, '
             "None, [1,2] lists, ['a','b'] string lists); anything else is taken as a string, spaces "
             'kept. Keys, types and ranges are '
             'checked against configs/PixArt_xl2_internal.py.')


class KeyValueAction(argparse.Action):
    """Parse `KEY=VALUE` items into a dict; values are Python literals, else strings (kept verbatim:
    mmengine's DictAction would strip spaces, which mangles prompts and paths)."""

    def __call__(self, parser, namespace, values, option_string=None):
        options = {}
        for item in values:
            key, sep, raw = item.partition('=')
            if not sep or not key:
                parser.error(f'{option_string} expects KEY=VALUE items, got {item!r}')
            try:
                options[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                options[key] = raw
        setattr(namespace, self.dest, options)


def _warn_about_inert_keys(data, base, path, cfg_options):
    for key in INERT_KEYS:
        if key in data and key in base and data[key] != base[key]:
            where = _where('--cfg-options' if key in cfg_options else path)
            warnings.warn(f'config key {key!r} {where} is {data[key]!r}, but no code reads it: it has no effect '
                          f'(the base value is {base[key]!r})', InertConfigKeyWarning, stacklevel=3)


def _strip_private(data):
    """Drop mmengine's `_`-prefixed top-level keys (e.g. `_base_`) and its bookkeeping keys in dicts."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in _MMENGINE_PRIVATE_KEYS}
        if isinstance(value, (list, tuple)):
            return type(value)(clean(v) for v in value)
        return value
    return {k: clean(v) for k, v in data.items() if not str(k).startswith('_')}


# ---------------------------------------------------------------- keys and types

def _where(source):
    """'in configs/x.py', 'from --cfg-options' or 'from with_overrides()'."""
    return f'from {source}' if source in ('--cfg-options', 'with_overrides()') else f'in {source}'


class _Sources:
    """Where the value of a dotted key was set: by an override of it, of a key above or below it, else the file."""

    def __init__(self, file, overrides, override_source):
        self.file = file if file is not None else 'a config made in code'
        self.overrides = {str(k) for k in overrides}
        self.override_source = override_source

    def __call__(self, dotted):
        parts = dotted.split('.')
        above = {'.'.join(parts[:i]) for i in range(1, len(parts) + 1)}
        if above & self.overrides or any(k.startswith(dotted + '.') for k in self.overrides):
            return self.override_source
        return self.file


def _unknown_key_error(key, valid, source):
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
    if close:
        hint = 'did you mean ' + ' or '.join(repr(c) for c in close) + '?'
    else:
        hint = 'the valid keys are those of the base config'
    return ConfigError(f'unknown config key {key!r} {_where(source)}; {hint}')


def _unknown_nested_key_error(key, sub, allowed, choice, schema, source):
    dotted = f'{key}.{sub}'
    takes = f'{choice + " takes" if choice else key + " holds"} {_listing(sorted(allowed))}'
    others = [name for name, keys in (schema.choices(key)[1] or {}).items() if sub in keys]
    close = difflib.get_close_matches(str(sub), allowed, n=3, cutoff=0.6)
    if others:
        hint = f'only {" and ".join(others)} {"takes" if len(others) == 1 else "take"} it; {takes}'
    elif sub in schema.types:
        hint = f'it has its own config key {sub!r}: set that instead'
    elif close:
        hint = 'did you mean ' + ' or '.join(repr(f'{key}.{c}') for c in close) + '?'
    else:
        hint = takes
    return ConfigError(f'unknown config key {dotted!r} {_where(source)}; {hint}')


def _check_type(key, value, expected, source, may_be_none=()):
    """Return `value` (an int promoted to float for float fields) or raise a ConfigError. The keys of
    `may_be_none` may also be None, which switches them off."""
    if expected is None or (value is None and key in may_be_none):
        return value
    if expected is dict and value is None:
        raise ConfigError(f'config key {key!r} {_where(source)} is None; expected a dict (only '
                          f'{_listing(may_be_none)} may be None)')
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (list, tuple):
        ok = isinstance(value, (list, tuple))
    elif expected is int or expected is float:
        ok = isinstance(value, expected) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if ok:
        return value
    wanted = 'list or tuple' if expected in (list, tuple) else expected.__name__
    raise ConfigError(f'config key {key!r} {_where(source)} has value {value!r} '
                      f'of type {type(value).__name__}; expected {wanted}')


def _validate(data, schema, source):
    """Check every top-level key and type against the schema; return the (possibly promoted) values."""
    checked = {}
    for key, value in data.items():
        if key not in schema.types:
            raise _unknown_key_error(key, schema.types, source)
        checked[key] = _check_type(key, value, schema.types[key], source, schema.may_be_none)
    return checked


def _apply_overrides(data, overrides, schema, source):
    """Return a copy of `data` with dotted `overrides` set; a value replaces its target (no dict merge). The
    nested keys are checked afterwards, with the values (`_check_values`)."""
    data = _thaw(data)
    for dotted, value in overrides.items():
        parts = str(dotted).split('.')
        if parts[0] not in schema.types:
            raise _unknown_key_error(parts[0], schema.types, source)
        if len(parts) == 1:
            data[parts[0]] = _check_type(parts[0], _thaw(value), schema.types[parts[0]], source, schema.may_be_none)
            continue
        node = data
        for depth, part in enumerate(parts[:-1]):
            if depth > 0 and part not in node:  # a level below a dict: refused by the key check that follows
                node[part] = {}
            if not isinstance(node.get(part), dict):
                raise ConfigError(f'cannot set {dotted!r} {_where(source)}: {".".join(parts[:depth + 1])!r} '
                                  f'is of type {type(node.get(part)).__name__}, not a dict')
            node = node[part]
        node[parts[-1]] = _thaw(value)
    return data


# ---------------------------------------------------------------- values

class _Rule(NamedTuple):
    accepts: Callable  # value -> bool
    expected: str      # what the error message says is accepted


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low, meaning=''):
    """An integer key (the schema checks the type) of at least `low`."""
    return _Rule(lambda v: _is_int(v) and v >= low, f'at least {low}{meaning}')


def _integer(low):
    """A nested integer of at least `low` (nested values have no type from the schema)."""
    return _Rule(lambda v: _is_int(v) and v >= low, f'an integer, at least {low}')


def _real(low=None, high=None, low_open=False, high_open=False, meaning=''):
    """A finite number in the given interval."""
    def accepts(v):
        return (_is_real(v) and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))
    if low is not None and high is not None:
        text = f'a number in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
    elif low is not None:
        text = f'a number {">" if low_open else ">="} {low}'
    else:
        text = 'a number'
    return _Rule(accepts, text + meaning)


def _or_none(rule, note):
    return _Rule(lambda v: v is None or rule.accepts(v), f'None or {rule.expected} ({note})')


def _one_of(*choices):
    return _Rule(lambda v: any(v == c and type(v) is type(c) for c in choices), f'one of {_listing(choices)}')


def _exactly(value, why):
    return _Rule(lambda v: v == value and type(v) is type(value), f'{value!r}: {why}')


def _strings(non_empty_list=False):
    """A list of strings (one string too where `non_empty_list`, as the datasets take it)."""
    if non_empty_list:
        return _Rule(lambda v: (isinstance(v, str) and v) or (isinstance(v, (list, tuple)) and v and all(
            isinstance(x, str) and x for x in v)), 'a non-empty list of file names')
    return _Rule(lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v),
                 'a list of non-empty strings')


def _numbers(count, text, accepts):
    """A list or tuple of `count` finite numbers, each accepted by `accepts`."""
    return _Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == count and all(_is_real(x) and accepts(x)
                                                                                 for x in v), text)


_FLAG = _Rule(lambda v: isinstance(v, bool), 'True or False')
_PROMPT = _Rule(lambda v: isinstance(v, str) and v.strip() != '', "a non-empty prompt such as 'a photo of sks dog'")
_PROMPTS = _Rule(lambda v: (isinstance(v, str) and v.strip() != '') or (
    isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) and x.strip() != '' for x in v)),
    "a non-empty prompt such as 'a photo of dog', or a non-empty list of them")
_PATH = _Rule(lambda v: isinstance(v, str) and v != '', 'a non-empty string')
_UNUSED = 'a released key the reference never applies (windowed attention / relative positions)'
_RESUME = ('a resume restores the whole training state; start from chosen weights with load_from / --load-from '
           'instead')

# What each key's value may be beyond its type. A dotted key names a key of a dict; a rule given as a dict
# depends on the dict's `type` (see `_dict_keys_` in the base config). The INERT_KEYS have no rule: nothing reads
# them. image_size and a few combinations are checked in `_check_combinations`.
VALUE_RULES = {
    'image_list_json': _strings(),
    'image_list_txt': _or_none(_strings(), 'None: no SA-1B lists'),
    'train_batch_size': _at_least(1),
    'num_workers': _at_least(0, ' (0: load the data in the main process)'),
    'model_max_length': _at_least(1),
    'caption_channels': _at_least(1),
    'aspect_ratio_type': _or_none(_one_of(*table_names()), 'None: the ASPECT_RATIO_<image_size> table'),
    'lewei_scale': _real(0, low_open=True),
    'window_block_indexes': _Rule(lambda v: len(v) == 0, f'[]: {_UNUSED}'),
    'window_size': _exactly(0, _UNUSED),
    'use_rel_pos': _exactly(False, _UNUSED),
    'class_dropout_prob': _real(0, 1, meaning=' (a probability)'),
    'controlnet': _FLAG,
    'copy_blocks_num': _at_least(1, ' (copy j feeds base block j+1: at most depth - 1, checked by training)'),
    'control_condition': _one_of('canny', 'hed'),
    'lcm': _FLAG,
    'loss_type': _one_of('huber', 'l2'),
    'huber_c': _real(0, low_open=True),
    'num_ddim_timesteps': _Rule(lambda v: 1 <= v <= DIFFUSION_STEPS,
                                f'between 1 and {DIFFUSION_STEPS} (steps of the DDIM grid over the {DIFFUSION_STEPS})'),
    'ema_decay': _real(0, 1, high_open=True, meaning=' (0: the target network is the student itself)'),
    'train_sampling_steps': _Rule(lambda v: 2 <= v <= DIFFUSION_STEPS,
                                  f'between 2 and {DIFFUSION_STEPS} (a respacing of the {DIFFUSION_STEPS} steps)'),
    'min_snr_gamma': _or_none(_real(0, low_open=True), 'None: the plain MSE'),
    'cfg_scale': _real(0, meaning=' (1: no guidance)'),
    'num_epochs': _at_least(1),
    'gradient_accumulation_steps': _at_least(1),
    'gradient_clip': _or_none(_real(0), 'None or 0: no clipping'),
    'gc_step': _at_least(1),
    'mixed_precision': _one_of('no', 'fp16', 'bf16'),
    'ema_rate': _real(0, 1, high_open=True, meaning=' (at 1 the EMA would keep the initial weights)'),
    'seed': _at_least(0),
    'scale_factor': _real(0, low_open=True),
    'load_from': _or_none(_PATH, 'None: no weights to start from'),
    'save_model_epochs': _at_least(0, ' (0: no checkpoints by epoch)'),
    'save_model_steps': _at_least(0, ' (0: no checkpoints by step)'),
    'max_steps': _or_none(_at_least(1), 'None: num_epochs decides'),
    'keep_last_n': _or_none(_at_least(0), 'None or 0: keep every checkpoint'),
    'max_nonfinite_steps': _at_least(1),
    'eval_interval': _at_least(0, ' (0: no validation grids)'),
    'validation_prompts': _strings(),
    'validation_steps': _at_least(2, ' (the validation grids sample with DPM-Solver++ of order 2)'),
    'log_interval': _at_least(1),
    'work_dir': _PATH,
    'data.root': _Rule(lambda v: isinstance(v, str), 'a folder name under data_root (a string)'),
    'data.image_list_json': _strings(non_empty_list=True),
    'data.image_list_txt': _strings(non_empty_list=True),
    'data.transform': _PATH,
    'data.load_vae_feat': _FLAG,
    'data.load_t5_feat': _FLAG,
    'data.cache_items': _FLAG,
    'optimizer.lr': _real(0, low_open=True),
    'optimizer.weight_decay': _real(0),
    'optimizer.eps': {'AdamW': _real(0, low_open=True),
                      'CAME': _numbers(2, 'a pair (eps1, eps2) of numbers > 0, e.g. (1e-30, 1e-16)', lambda x: x > 0)},
    'optimizer.betas': {'AdamW': _numbers(2, 'two numbers in [0, 1), e.g. (0.9, 0.999)', lambda x: 0 <= x < 1),
                        'CAME': _numbers(3, 'three numbers in [0, 1), e.g. (0.9, 0.999, 0.9999)',
                                         lambda x: 0 <= x < 1)},
    'optimizer.amsgrad': _FLAG,
    'optimizer.clip_threshold': _real(0, low_open=True),
    'lr_schedule_args.num_warmup_steps': _integer(0),
    'auto_lr.rule': _one_of('sqrt', 'linear'),
    'auto_lr.base_batch_size': _integer(1),
    'resume_from.checkpoint': _or_none(_PATH, 'None: start fresh'),
    'resume_from.load_ema': _exactly(False, _RESUME),
    'resume_from.resume_optimizer': _exactly(True, _RESUME),
    'resume_from.resume_lr_scheduler': _exactly(True, _RESUME),
    **{f'model_kwargs.{key}': _integer(1) for key in ('patch_size', 'in_channels', 'hidden_size', 'depth',
                                                       'num_heads')},
    'model_kwargs.mlp_ratio': _real(0, low_open=True),
    'model_kwargs.drop_path': _real(0, 1, high_open=True),
    'model_kwargs.trim_captions': _FLAG,
    'model_kwargs.pack_captions': _FLAG,
    'model_kwargs.fused_modulation': _FLAG,
    'dreambooth.instance_data_dir': _PATH,
    'dreambooth.instance_prompt': _PROMPT,
    'dreambooth.with_prior_preservation': _FLAG,
    'dreambooth.class_prompt': _or_none(_PROMPTS, 'None: no prior preservation'),
    'dreambooth.class_data_dir': _or_none(_PATH, 'None: a folder of the cache'),
    'dreambooth.num_class_images': _integer(1),
    'dreambooth.prior_loss_weight': _real(0),
    'dreambooth.sample_batch_size': _integer(1),
    'dreambooth.class_sampler': _PATH,  # one of the registered samplers: `_check_combinations`
    'dreambooth.class_sampling_steps': _integer(1),
    'dreambooth.class_cfg_scale': _real(0, meaning=' (1: no guidance)'),
    'dreambooth.cache_dir': _or_none(_PATH, 'None: work_dir/dreambooth_cache'),
}


def _value_error(key, value, expected, source):
    return ConfigError(f'config key {key!r} is {value!r}; expected {expected}; set {_where(source)}')


def _apply_rule(rule, key, value, source_of, choice=None):
    if isinstance(rule, Mapping):
        rule = rule.get(choice)
    if rule is not None and not rule.accepts(value):
        raise _value_error(key, value, rule.expected, source_of(key))


def _check_values(data, schema, source_of):
    """The keys of every dict, every value's range and the combinations of keys; `source_of(dotted key)` says
    where a value was set, for the error."""
    for key, value in data.items():
        if schema.types.get(key) is not dict or value is None:
            continue
        allowed, choice = schema.keys_of(key, data, source_of)
        for sub in value:
            if sub not in allowed:
                raise _unknown_nested_key_error(key, sub, allowed, choice, schema, source_of(f'{key}.{sub}'))
            if sub != 'type':
                _apply_rule(VALUE_RULES.get(f'{key}.{sub}'), f'{key}.{sub}', value[sub], source_of, choice)
    for key, value in data.items():
        _apply_rule(VALUE_RULES.get(key), key, value, source_of)
    _check_combinations(data, source_of)


def _check_combinations(data, source_of):
    """Values that are each valid but cannot go together (what multi_scale needs is checked by training, which
    alone reads it: diffusion/train/checks.py)."""
    patch = data['model_kwargs'].get('patch_size', DEFAULT_PATCH_SIZE)
    factor = VAE_DOWNSAMPLE * patch
    if data['image_size'] < factor or data['image_size'] % factor:
        raise _value_error('image_size', data['image_size'], f'a multiple of {factor} (VAE factor {VAE_DOWNSAMPLE} '
                           f'x patch size {patch}), at least {factor}', source_of('image_size'))
    dataset = data['data']['type']
    default_table = f'ASPECT_RATIO_{data["image_size"]}'
    if dataset == 'InternalDataMS' and not data['aspect_ratio_type'] and default_table not in table_names():
        raise _value_error('aspect_ratio_type', None, f'a bucket table: InternalDataMS at image_size '
                           f'{data["image_size"]} has no default {default_table}', source_of('aspect_ratio_type'))
    if data['snr_loss'] and data['min_snr_gamma'] is not None:
        raise _value_error('min_snr_gamma', data['min_snr_gamma'], 'None when snr_loss=True (both reweight the '
                           'MSE; choose one)', source_of('min_snr_gamma'))
    if data['learn_sigma'] and not data['pred_sigma']:
        raise _value_error('learn_sigma', True, 'False when pred_sigma=False (the variance is learned from the '
                           "model's extra output channels)", source_of('learn_sigma'))
    if data.get('lora') is not None:  # its keys and ranges are its reader's (LoraSettings documents each)
        from diffusion.model.lora import LoraSettings
        try:
            LoraSettings.from_config(data['lora'])
        except ConfigError as err:
            raise ConfigError(f"{err} ({_where(source_of('lora'))})") from None
    if data.get('dreambooth'):
        _check_dreambooth(data, source_of)
    if data['lcm'] and data['train_sampling_steps'] != DIFFUSION_STEPS:
        raise _value_error('train_sampling_steps', data['train_sampling_steps'],
                           f'{DIFFUSION_STEPS} with lcm=True (the distillation and the LCM sampler work on the '
                           f'{DIFFUSION_STEPS} original timesteps)', source_of('train_sampling_steps'))


def _check_dreambooth(data, source_of):
    """What the DreamBooth keys need of each other and of the data settings (their ranges are VALUE_RULES')."""
    settings = data['dreambooth']
    for key, expected in (('instance_data_dir', "the folder of instance images, e.g. 'dog6' (under data_root)"),
                          ('instance_prompt', "the prompt of the instance images, e.g. 'a photo of sks dog'")):
        if key not in settings:
            raise ConfigError(f'config key {"dreambooth." + key!r} is missing {_where(source_of("dreambooth"))}; '
                              f'expected {expected}')
    if settings.get('with_prior_preservation') and settings.get('class_prompt') is None:
        raise _value_error('dreambooth.class_prompt', None, "the prompt of the class images (e.g. 'a photo of dog') "
                           'when dreambooth.with_prior_preservation=True', source_of('dreambooth.class_prompt'))
    from diffusion.sampling import SAMPLERS
    sampler = settings.get('class_sampler', 'dpm-solver')
    if sampler not in SAMPLERS:
        raise _value_error('dreambooth.class_sampler', sampler, f'one of {_listing(SAMPLERS)}',
                           source_of('dreambooth.class_sampler'))
    if not data['data'].get('load_vae_feat', True):
        raise _value_error('data.load_vae_feat', False, 'True with dreambooth (it caches the VAE features of its '
                           'images itself)', source_of('data.load_vae_feat'))


# ---------------------------------------------------------------- read-only views
# The views subclass dict and list so that `isinstance(x, dict/list)` and `==` against plain values
# keep working in code written for mmengine configs; only the mutating methods are blocked.

def _freeze(value):
    if isinstance(value, Mapping):
        return FrozenDict(value)
    if isinstance(value, list):
        return FrozenList(_freeze(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_thaw(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_thaw(v) for v in value)
    return copy.deepcopy(value)


def _read_only(self, *args, **kwargs):
    raise ReadOnlyConfigError(f'cannot modify {type(self).__name__}: {_READ_ONLY}')


class FrozenList(list):
    """A list from a loaded config: reads like a list, cannot be changed."""

    append = extend = insert = remove = pop = clear = sort = reverse = _read_only
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only

    def __reduce__(self):  # the default rebuilds the list with append(), which is blocked
        return FrozenList, (list(self),)


class FrozenDict(dict):
    """A dict from a loaded config with attribute access (`d.lr`); nested dicts and lists are frozen too.

    Method names (`keys`, `items`, `get`, ...) win over keys of the same name: use `d['items']` then.
    """

    def __init__(self, data=()):
        super().__init__((k, _freeze(v)) for k, v in dict(data).items())

    def __getattr__(self, name):
        if name.startswith('_'):  # keeps pickle/copy from probing keys for dunder/private names
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f'config has no key {name!r}') from None

    def __setattr__(self, name, value):
        raise ReadOnlyConfigError(f'cannot set {name!r}: {_READ_ONLY}')

    def __delattr__(self, name):
        raise ReadOnlyConfigError(f'cannot delete {name!r}: {_READ_ONLY}')

    def __setitem__(self, key, value):
        raise ReadOnlyConfigError(f'cannot set {key!r}: {_READ_ONLY}')

    def __delitem__(self, key):
        raise ReadOnlyConfigError(f'cannot delete {key!r}: {_READ_ONLY}')

    update = setdefault = pop = popitem = clear = __ior__ = _read_only

    def __reduce__(self):  # the default rebuilds the dict with __setitem__, which is blocked
        return type(self), (self.to_dict(),)

    def to_dict(self):
        """A deep, plain, mutable copy (dicts and lists)."""
        return _thaw(self)


class FrozenConfig(FrozenDict):
    """A validated, read-only config: `cfg.optimizer.lr`, `cfg['model']`, `cfg.get(key, default)`."""

    def __init__(self, data, filename=None, schema=None):
        super().__init__(data)
        object.__setattr__(self, '_filename', None if filename is None else str(filename))
        object.__setattr__(self, '_schema', schema if schema is not None else Schema.from_file(SCHEMA_PATH))

    @property
    def filename(self):
        """Path of the file the config was loaded from."""
        return self._filename

    @property
    def pretty_text(self):
        """The merged config as python config text (no `_base_`), as mmengine formats it."""
        return Config(self.to_dict()).pretty_text

    def dump(self, path):
        """Write the merged config as a loadable python config file, atomically."""
        atomic_write_text(path, self.pretty_text)

    def with_overrides(self, overrides):
        """A new validated config with dotted `overrides` applied; this one is left unchanged."""
        overrides = dict(overrides)
        data = _apply_overrides(self.to_dict(), overrides, self._schema, source='with_overrides()')
        _check_values(data, self._schema, _Sources(self._filename, overrides, 'with_overrides()'))
        return FrozenConfig(data, filename=self._filename, schema=self._schema)

    def __reduce__(self):
        return FrozenConfig, (self.to_dict(), self._filename, self._schema)

    def __repr__(self):
        return f'FrozenConfig(filename={self._filename!r}, {dict.__repr__(self)})'
