"""Load, override, validate and freeze configs (mmengine python config files with `_base_`).

The base config `configs/PixArt_xl2_internal.py` is the schema: every top-level key of a config must be
defined there, with a value of the same type. A loaded config is read-only; change it with
`--cfg-options key=value` on the command line or `cfg.with_overrides({...})` in code. The keys in `INERT_KEYS`
are accepted but do nothing; a value other than the base config's draws an `InertConfigKeyWarning` naming it.
"""
import argparse
import ast
import copy
import difflib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from mmengine.config import Config

from diffusion.utils.fileio import atomic_write_text

SCHEMA_PATH = Path(__file__).resolve().parents[2] / 'configs' / 'PixArt_xl2_internal.py'
# Bookkeeping keys mmengine may leave inside dicts; they are not config fields.
_MMENGINE_PRIVATE_KEYS = ('_scope_', '_delete_')
_READ_ONLY = 'the config is read-only after loading; use --cfg-options KEY=VALUE or cfg.with_overrides({...})'
# Keys of the reference's base config that no code here reads (its token-masking experiment, evaluation runs and
# remote storage). They are accepted so that the released configs load as they are.
INERT_KEYS = ('mask_type', 'num_group_tokens', 'mask_loss_coef', 'load_mask_index', 'eval_batch_size', 'valid_num',
              'eval_sampling_steps', 'save_image_epochs', 'tensorboard_mox_interval', 's3_work_dir')


class ConfigError(ValueError):
    """A config file or override is missing, unknown, mistyped, or a loaded config was modified."""


class ReadOnlyConfigError(ConfigError, TypeError):
    """Raised on any attempt to modify a loaded config (a TypeError too, like modifying a tuple)."""


class InertConfigKeyWarning(UserWarning):
    """A config sets one of `INERT_KEYS`, which no code reads, to a value other than the base config's."""


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
    base = _load_base(schema_path)
    schema = _schema_of(base)
    data = _validate(_strip_private(data), schema, source=path)
    if cfg_options:
        data = _apply_overrides(data, cfg_options, schema, source='--cfg-options')
    _warn_about_inert_keys(data, base, path, cfg_options or {})
    return FrozenConfig(data, filename=path, schema=schema)


def add_cfg_options_argument(parser):
    """Add `--cfg-options KEY=VALUE ...` to an argparse parser; pass `args.cfg_options` to load_config."""
    return parser.add_argument(
        '--cfg-options', nargs='+', action=KeyValueAction, metavar='KEY=VALUE', default=None,
        help='override config fields, e.g. --cfg-options train_batch_size=4 optimizer.lr=1e-4. '
             'Use dotted keys for nested fields; values are Python literals (numbers, True/False, '
             "None, [1,2] lists, ['a','b'] string lists); anything else is taken as a string, spaces "
             'kept. Keys and types are '
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


def _load_base(schema_path):
    """The base config's values (the schema's defaults)."""
    if not os.path.isfile(schema_path):
        raise ConfigError(f'schema (base config) not found: {schema_path}')
    return _strip_private(Config.fromfile(str(schema_path)).to_dict())


def _schema_of(base):
    """Map each base key to its base value's type; None means any type is accepted."""
    return {key: None if value is None else type(value) for key, value in base.items()}


def _load_schema(schema_path):
    return _schema_of(_load_base(schema_path))


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


# ---------------------------------------------------------------- validation

def _where(source):
    """'in configs/x.py', 'from --cfg-options' or 'from with_overrides()'."""
    return f'from {source}' if source in ('--cfg-options', 'with_overrides()') else f'in {source}'


def _unknown_key_error(key, schema, source):
    close = difflib.get_close_matches(key, list(schema), n=3, cutoff=0.6)
    if close:
        hint = 'did you mean ' + ' or '.join(repr(c) for c in close) + '?'
    else:
        hint = 'the valid keys are those of the base config'
    return ConfigError(f'unknown config key {key!r} {_where(source)}; {hint}')


def _check_type(key, value, expected, source):
    """Return `value` (an int promoted to float for float fields) or raise a ConfigError. A dict-valued
    option may be None, which switches it off (mmengine merges a child's `dict()` into the base's dict, so
    an empty dict could not)."""
    if expected is None or (expected is dict and value is None):
        return value
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
        if key not in schema:
            raise _unknown_key_error(key, schema, source)
        checked[key] = _check_type(key, value, schema[key], source)
    return checked


def _apply_overrides(data, overrides, schema, source):
    """Return a copy of `data` with dotted `overrides` set; a value replaces its target (no dict merge)."""
    data = _thaw(data)
    for dotted, value in overrides.items():
        parts = str(dotted).split('.')
        if parts[0] not in schema:
            raise _unknown_key_error(parts[0], schema, source)
        if len(parts) == 1:
            data[parts[0]] = _check_type(parts[0], _thaw(value), schema[parts[0]], source)
            continue
        node = data
        for depth, part in enumerate(parts[:-1]):
            if depth > 0 and part not in node:  # nested dict contents are free-form: create the level
                node[part] = {}
            if not isinstance(node.get(part), dict):
                raise ConfigError(f'cannot set {dotted!r} {_where(source)}: {".".join(parts[:depth + 1])!r} '
                                  f'is of type {type(node.get(part)).__name__}, not a dict')
            node = node[part]
        node[parts[-1]] = _thaw(value)
    return data


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
        object.__setattr__(self, '_schema', schema if schema is not None else _load_schema(SCHEMA_PATH))

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
        data = _apply_overrides(self.to_dict(), dict(overrides), self._schema, source='with_overrides()')
        return FrozenConfig(data, filename=self._filename, schema=self._schema)

    def __reduce__(self):
        return FrozenConfig, (self.to_dict(), self._filename, self._schema)

    def __repr__(self):
        return f'FrozenConfig(filename={self._filename!r}, {dict.__repr__(self)})'
