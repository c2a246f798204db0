"""Atomic file writes: a reader (or a crash) never sees a half-written file under the final name. A write the file
system refuses (disk full, read-only, no permission) raises `WriteError` naming the path, and leaves no temp file."""
import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path

_TEMP_PREFIX, _TEMP_SUFFIX = ".", ".tmp"
# what tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") creates: 8 characters of its alphabet between
TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


class WriteError(OSError):
    """The file system refused a write: the message names the path and says why in words (the errno is kept)."""

    def __init__(self, path, cause):
        super().__init__(cause.errno, cause.strerror, str(path))
        self.path = Path(path)

    def __str__(self):
        if self.errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"no space left on device while writing {self.path} (nothing was written under that name; "
                    "free some space or choose another directory)")
        if self.errno == errno.EROFS:
            return f"read-only file system: cannot write {self.path}"
        if self.errno in (errno.EACCES, errno.EPERM):
            return f"permission denied: cannot write {self.path}"
        if self.errno == errno.ENOTDIR:
            return f"not a directory: cannot write {self.path} (a part of the path is a file)"
        return f"{self.strerror or 'error ' + str(self.errno)} while writing {self.path}"


def _os_error_in(err):
    """The OSError (with an errno) that `err` is or wraps: torch.save reports a failed write as a RuntimeError
    whose context is the OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def writing(path):
    """Raise file-system failures of the enclosed writes as `WriteError(path)`; other errors pass unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        cause = _os_error_in(err)
        if cause is None:
            raise
        raise WriteError(path, cause) from err


def atomic_write(path, write):
    """Call `write(binary_file)` on a temp file beside `path`, then rename it to `path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f'{_TEMP_PREFIX}{path.name}.', suffix=_TEMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, 'wb') as f:
                write(f)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


def is_temp_file(path):
    """Whether `path` is named like the temp file of an `atomic_write` (left behind by a killed process)."""
    return TEMP_FILE.match(Path(path).name) is not None


def atomic_write_text(path, text):
    return atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def save_png(path, image):
    """Write a PIL image as PNG, atomically."""
    return atomic_write(path, lambda f: image.save(f, format='PNG'))
