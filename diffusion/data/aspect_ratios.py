"""Aspect-ratio bucket tables (SPEC section 4), loaded from the one copy in `aspect_ratios.json`.

A table maps a bucket key, the ratio h/w written as in the release ('0.25' ... '4.0'), to the bucket's pixel
size (h, w). `ASPECT_RATIO_{256,512,1024}` have 40 buckets for training, the `_TEST` variants 33 for inference.
An image goes to the bucket whose ratio is closest to its own h/w (the first such bucket on a tie).
"""
import functools
import json
from pathlib import Path

TABLES_FILE = Path(__file__).with_name('aspect_ratios.json')


@functools.lru_cache(maxsize=None)
def _tables():
    with open(TABLES_FILE, encoding='utf-8') as f:
        raw = json.load(f)
    return {name: tuple((key, (int(hw[0]), int(hw[1]))) for key, hw in table.items())
            for name, table in raw.items()}


def table_names():
    """The names of the bucket tables, e.g. 'ASPECT_RATIO_1024', 'ASPECT_RATIO_1024_TEST'."""
    return sorted(_tables())


def aspect_ratio_table(name):
    """The bucket table `name` as a new dict {ratio key: (h, w)} in increasing ratio order."""
    tables = _tables()
    if name not in tables:
        raise KeyError(f'unknown aspect-ratio table {name!r}; expected one of {", ".join(table_names())}')
    return dict(tables[name])


def closest_bucket(height, width, table):
    """The bucket (key, (h, w)) of `table` whose ratio is closest to height / width."""
    if height <= 0 or width <= 0:
        raise ValueError(f'image size must be positive, got height={height}, width={width}')
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return key, table[key]
