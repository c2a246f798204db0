"""Atomic file writes: a reader (or a crash) never sees a half-written file under the final name."""
import os
import tempfile
from pathlib import Path


def atomic_write(path, write):
    """Call `write(binary_file)` on a temp file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text):
    return atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def save_png(path, image):
    """Write a PIL image as PNG, atomically."""
    return atomic_write(path, lambda f: image.save(f, format='PNG'))
