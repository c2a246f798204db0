"""Output folders that several runs may write into at the same time (scripts/inference.py's --output-dir).

Images are numbered `NNNN_<name>`: each number is claimed with O_CREAT|O_EXCL and held only when no other file
has it, so concurrent runs interleave numbers and never overwrite an image (two claims of one number at the same
instant may both give it up: a gap, never a shared number); the PNG goes to a temp file that
is renamed over the claimed name. A metadata line is appended with one write on an O_APPEND descriptor, after
its image is in place, so lines of concurrent runs never mix and every line names a complete file.
"""
import io
import json
import os
import random
import re
import time
from pathlib import Path

from diffusion.utils.fileio import atomic_write

_NUMBERED = re.compile(r"(\d+)_")


class OutputError(RuntimeError):
    """An output file that cannot be written (disk full, read-only folder, ...): names the file."""


def _describe(err):
    return err.strerror or str(err)


def prepare_output_dir(path, what="--output-dir"):
    """Create the folder `path` (and its parents) or raise OutputError saying why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{what} {path} exists and is not a folder") from None
    except OSError as err:
        raise OutputError(f"{what} {path}: cannot create the folder ({_describe(err)})") from err
    return path


def next_free_number(out_dir):
    """1 + the highest NNNN_ number of the images in out_dir (0 for a new folder)."""
    numbers = [int(m[1]) for p in Path(out_dir).glob("*.png") if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def _claim(out_dir, number, path):
    """True when `path` (numbered `number`) was created by us and no other file has that number."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    # A rival with another name but the same number (another run, or an earlier one) makes us move on; of two
    # claims made at once the later checker always sees the earlier one, so at most one keeps the number.
    if any(p != path for p in out_dir.glob(f"{number:04d}_*.png")):
        os.unlink(path)
        return False
    return True


def save_numbered_png(out_dir, name_of, image):
    """Write the PIL `image` as out_dir/name_of(n) for the lowest number n no file in out_dir has, atomically;
    returns the path. Never overwrites a file; raises OutputError naming the file it could not write."""
    out_dir = Path(out_dir)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # encoded before the claim: the claimed name is empty only briefly
    data = buffer.getvalue()
    number = next_free_number(out_dir)
    while True:
        path = out_dir / name_of(number)
        try:
            if _claim(out_dir, number, path):
                break
        except OSError as err:
            raise OutputError(f"cannot write {path}: {_describe(err)}") from err
        time.sleep(random.uniform(0, 0.005))  # two runs that backed off together do not retry in lockstep
        number = max(number + 1, next_free_number(out_dir))
    try:
        atomic_write(path, lambda f: f.write(data))
    except BaseException as err:
        path.unlink(missing_ok=True)  # no empty image under a final name
        if isinstance(err, OSError):
            raise OutputError(f"cannot write {path}: {_describe(err)}") from err
        raise
    return path


def append_jsonl(path, record):
    """Append `record` to the JSON-lines file `path` as one line, with one write (valid JSON only: no NaN)."""
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as err:
        raise OutputError(f"cannot append to {path}: {_describe(err)}") from err
    if written != len(line):
        raise OutputError(f"cannot append to {path}: only {written} of {len(line)} bytes written (disk full?)")
