"""Dataset records from annotation files: the json lists of InternalData (SPEC section 7) and the SA-1B
partition txt files. Malformed files and fields raise `AnnotationError` naming the file, record and field."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

from diffusion.data import paths
from diffusion.data.errors import AnnotationError

RATIO_TOLERANCE = 0.02  # relative; a json `ratio` further than this from height/width is an error
SAM_IMAGE_SUFFIX = '.jpg'  # a partition line without a suffix names an SA-1B jpg


@dataclass(frozen=True)
class Record:
    """One image of a dataset. `path` is relative to the dataset's `images/` folder; `prompt`, `height` and
    `width` (original pixels) are None where the annotation does not carry them (SA-1B partitions)."""
    path: str
    source: str  # where the record is listed, for error messages: 'partition/x.json record 3'
    prompt: str = None
    height: int = None
    width: int = None


def _positive_int(value, field, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or value != int(value):
        raise AnnotationError(f'{where}: field {field!r} must be a positive integer, got {value!r}')
    return int(value)


def load_annotation_json(path, display_name=None):
    """Records of an annotation json: a list of {"path", "prompt", "height", "width", "ratio"} objects."""
    path = Path(path)
    name = display_name or str(path)
    try:
        with open(path, encoding='utf-8') as f:
            items = json.load(f)
    except FileNotFoundError:
        raise AnnotationError(f'annotation file {path} is missing') from None
    except json.JSONDecodeError as err:
        raise AnnotationError(f'{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}') from err
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(f'cannot read annotation file {path}: {err}') from err
    if not isinstance(items, list):
        raise AnnotationError(f'{path}: expected a list of records, found a {type(items).__name__}')
    records = []
    for index, item in enumerate(items):
        where = f'{name} record {index}'
        if not isinstance(item, dict):
            raise AnnotationError(f'{where}: expected an object with "path", "prompt", "height", "width", '
                                  f'found {item!r}')
        for field in ('path', 'prompt', 'height', 'width'):
            if field not in item:
                raise AnnotationError(f'{where}: field {field!r} is missing (has {sorted(item)})')
        rel_path, prompt = item['path'], item['prompt']
        if not isinstance(rel_path, str):
            raise AnnotationError(f'{where}: field \'path\' must be a string, got {rel_path!r}')
        try:
            paths.check_relative_path(rel_path)
        except ValueError as err:
            raise AnnotationError(f'{where}: field \'path\': {err}') from None
        if not isinstance(prompt, str):
            raise AnnotationError(f'{where}: field \'prompt\' must be a string, got {prompt!r}')
        height = _positive_int(item['height'], 'height', where)
        width = _positive_int(item['width'], 'width', where)
        ratio = item.get('ratio')
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
                raise AnnotationError(f'{where}: field \'ratio\' must be a number, got {ratio!r}')
            if abs(ratio - height / width) > RATIO_TOLERANCE * height / width:
                raise AnnotationError(f'{where}: field \'ratio\' is {ratio}, but height/width is '
                                      f'{height}/{width} = {height / width:.4f}')
        records.append(Record(path=rel_path, source=where, prompt=prompt, height=height, width=width))
    return records


def load_partition_txt(path, display_name=None):
    """Records of an SA-1B partition file: one image name a line (`sa_1.jpg`, or `sa_1` meaning `sa_1.jpg`)."""
    path = Path(path)
    name = display_name or str(path)
    try:
        lines = path.read_text(encoding='utf-8').splitlines()
    except FileNotFoundError:
        raise AnnotationError(f'partition file {path} is missing') from None
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(f'cannot read partition file {path}: {err}') from err
    records = []
    for line_no, line in enumerate(lines, start=1):
        image = line.strip()
        if not image:  # a blank line (e.g. a trailing newline) lists no image
            continue
        if not Path(image).suffix:
            image += SAM_IMAGE_SUFFIX
        try:
            paths.check_relative_path(image)
        except ValueError as err:
            raise AnnotationError(f'{name} line {line_no}: {err}') from None
        records.append(Record(path=image, source=f'{name} line {line_no}'))
    return records


def load_dataset_records(dataset, names, kind):
    """All records of a dataset folder, in order: `kind` 'json' reads `partition/<name>` annotation lists,
    'txt' SA-1B partition lists. Two records that would share a feature file are an error."""
    if isinstance(names, str):
        names = [names]
    if not names:
        raise AnnotationError(f'no annotation files given for dataset {dataset}')
    loader = {'json': load_annotation_json, 'txt': load_partition_txt}[kind]
    records = []
    for name in names:
        records.extend(loader(paths.annotation_path(dataset, name), display_name=f'{paths.ANNOTATION_DIR}/{name}'))
    try:
        paths.check_unique_feature_stems([(r.path, r.source) for r in records])
    except ValueError as err:
        raise AnnotationError(str(err)) from None
    return records
