"""A run owns its work dir: where it writes there, the lock that keeps a second run out, and nothing written before
every start-up check has passed.

Layout. The first run in a work dir writes there: `checkpoints/`, `config.py`, `train_log.log`, `vis/` and
TensorBoard's `pixart/`. A run that would write over or beside another run's checkpoints (a fresh start in a used
work dir, or a resume from a checkpoint that is not the newest of its run) is refused, unless started with
`allow_used_work_dir` (`--allow-used-work-dir`): it then gets a run dir of its own, `work_dir/runs/<run id>/`, with
the same layout, and no existing file is touched. A run dir only ever holds one lineage (a run and its resumes), so
pruning it (`keep_last_n`) never removes another run's checkpoint. `--resume-from auto` resumes the newest complete
checkpoint of the most recently started run that has one (run ids begin with their UTC start time).

The lock `work_dir/train.lock` (created with O_EXCL; JSON with the holder's pid, host and start time) keeps a second
run out while one trains, whatever its run dir. A lock whose process is gone (same host, no such pid) is taken over
with a warning; one from another host is reported with how to remove it. The main process takes it, the other ranks
follow, and it is released on exit (normal, error, or a signal the loop handles).
"""
import contextlib
import datetime
import itertools
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from diffusion.train.state import CHECKPOINT_DIR, list_checkpoints, read_resumable_checkpoint
from diffusion.utils.fileio import WriteError, atomic_write_text, is_temp_file, writing

RUNS_DIR = "runs"
LOCK_FILE = "train.lock"
CONFIG_FILE = "config.py"
LOG_FILE = "train_log.log"
# folders of a run dir that atomic writes go to (and a killed one leaves its temp file in)
_WRITTEN_FOLDERS = (".", CHECKPOINT_DIR, "vis")


class WorkDirError(RuntimeError):
    """The work dir cannot take this run: another run's checkpoints or lock are there."""


def new_run_id():
    """UTC start time (so ids sort by start) and a random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def run_dirs(work_dir):
    """The run dirs of a work dir, oldest first: the work dir itself, then `runs/<run id>/` by id."""
    work_dir = Path(work_dir)
    runs = work_dir / RUNS_DIR
    later = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.name) if runs.is_dir() else []
    return [work_dir, *later]


def checkpoints_by_run(work_dir):
    """run dir -> its checkpoints (oldest first), for the run dirs that hold any."""
    found = {run_dir: list_checkpoints(run_dir) for run_dir in run_dirs(work_dir)}
    return {run_dir: paths for run_dir, paths in found.items() if paths}


def read_newest_checkpoint(work_dir, log=print):
    """(path, contents) of `--resume-from auto`'s checkpoint: the newest complete one of the most recently started
    run that has one; (None, None) when there is none."""
    for run_dir in reversed(run_dirs(work_dir)):
        path, checkpoint = read_resumable_checkpoint(run_dir, log)
        if path is not None:
            return path, checkpoint
        if list_checkpoints(run_dir):
            log(f"no resumable checkpoint in {run_dir / CHECKPOINT_DIR}; trying the run started before it")
    return None, None


# ---------------------------------------------------------------- where a run writes

@dataclass(frozen=True)
class RunDir:
    """Where a run writes and who it is, decided from what the work dir holds before anything is written."""
    work_dir: Path
    path: Path               # the work dir itself for its first run, else work_dir/runs/<run_id>
    run_id: str              # a resume keeps its checkpoint's id (its lineage); a fresh run or branch gets a new one
    parent: str = None       # a branch: the checkpoint of another lineage it starts from
    seen: tuple = ()         # every checkpoint in the work dir when the run was placed, checked again under the lock

    @property
    def checkpoints(self):
        return self.path / CHECKPOINT_DIR

    @property
    def log_file(self):
        return self.path / LOG_FILE


def place_run(work_dir, resume_path=None, resumed_run_id=None, allow_used=False):
    """Decide where a run writes, reading the work dir only. A fresh run writes in the work dir when no run dir
    there holds a checkpoint. A resume continues in the run dir of its checkpoint when that checkpoint is the newest
    there, or in an unused work dir (keeping the checkpoint's run id). Anything else would write over or beside
    another run's checkpoints: refused with WorkDirError, unless `allow_used`, which gives it a run dir of its own."""
    work_dir = Path(work_dir)
    used = checkpoints_by_run(work_dir)
    seen = _snapshot(used)
    lineage = resumed_run_id or new_run_id()
    if resume_path is not None:
        home = _run_dir_holding(work_dir, resume_path)
        if home is not None:
            newer = _newer_than(resume_path, used.get(home, []))
            if not newer:
                return RunDir(work_dir, home, lineage, seen=seen)
            problem = (f"{resume_path} is not the newest checkpoint of its run: continuing it there would write over "
                       f"{_names(newer)}")
        elif not used:
            return RunDir(work_dir, work_dir, lineage, seen=seen)
        else:
            problem = f"{work_dir} holds checkpoints of another run ({_summary(used)})"
    elif not used:
        return RunDir(work_dir, work_dir, lineage, seen=seen)
    else:
        problem = f"{work_dir} already holds checkpoints of another run ({_summary(used)})"
    if not allow_used:
        raise WorkDirError(
            f"{problem}. Continue that run with --resume-from auto, train in a new --work-dir, or pass "
            f"--allow-used-work-dir to start this run in a folder of its own, {work_dir / RUNS_DIR}/<run id>/ "
            "(no existing file is touched)")
    run_id = new_run_id()
    return RunDir(work_dir, work_dir / RUNS_DIR / run_id, run_id, parent=str(resume_path) if resume_path else None,
                  seen=seen)


def _run_dir_holding(work_dir, checkpoint):
    checkpoint = Path(checkpoint).resolve()
    for run_dir in run_dirs(work_dir):
        if checkpoint.parent == (run_dir / CHECKPOINT_DIR).resolve():
            return run_dir
    return None


def _newer_than(checkpoint, found):
    """The checkpoints of `found` (oldest first) that sort after `checkpoint`; all of them if it is not listed."""
    names = [path.name for path in found]
    name = Path(checkpoint).name
    return found[names.index(name) + 1:] if name in names else list(found)


def _snapshot(used):
    return tuple(sorted(str(path) for paths in used.values() for path in paths))


def _names(paths, limit=3):
    shown = ", ".join(str(p) for p in paths[-limit:])
    return f"{shown} and {len(paths) - limit} more" if len(paths) > limit else shown


def _summary(used):
    return "; ".join(f"{len(paths)} in {run_dir / CHECKPOINT_DIR}, newest {paths[-1].name}"
                     for run_dir, paths in used.items())


# ---------------------------------------------------------------- the lock

@dataclass(frozen=True)
class LockHolder:
    """Who holds a work dir's lock, as its lock file says."""
    path: Path
    pid: int
    host: str
    started: str
    text: str                # the file's contents, to take over only the lock that was read

    def __str__(self):
        return f"pid {self.pid} on host {self.host} since {self.started}"

    @property
    def is_stale(self):
        """The holder ran on this host and its process is gone."""
        return self.host == socket.gethostname() and not _process_alive(self.pid)

    def refusal(self):
        work_dir = self.path.parent
        if self.host != socket.gethostname():
            return WorkDirError(
                f"{work_dir} is in use by a training run: {self} (lock file {self.path}). That host is not this one "
                f"({socket.gethostname()}), so whether the run is alive cannot be checked from here: if no training "
                f"run uses {work_dir} there, delete {self.path} and start again")
        return WorkDirError(f"{work_dir} is in use by a training run: {self} (lock file {self.path}); wait for it to "
                            "finish or stop it, or train in another --work-dir")


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_lock(work_dir, attempts=10):
    """The holder of a work dir's lock, or None when there is none. A lock that stays unreadable (a holder writes it
    within microseconds of creating it) is an error saying how to remove it."""
    path = Path(work_dir) / LOCK_FILE
    for attempt in range(attempts):
        try:
            text = path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            info = json.loads(text)
            return LockHolder(path, int(info["pid"]), str(info["host"]), str(info["started"]), text)
        except (ValueError, KeyError, TypeError) as err:
            problem = err
        time.sleep(0.1)
    raise WorkDirError(f"{path} exists but is not a readable training lock ({type(problem).__name__}: {problem}); "
                       f"if no training run uses {path.parent}, delete it and start again")


def check_unlocked(work_dir):
    """Refuse now, before minutes of building, if a live run holds the work dir (a stale lock is taken over later)."""
    holder = read_lock(work_dir)
    if holder is not None and not holder.is_stale:
        raise holder.refusal()


class WorkDirLock:
    """This process's hold on a work dir; `release()` (or leaving the `with` block) gives it back."""

    def __init__(self, path, text):
        self.path, self.text = path, text

    @classmethod
    def acquire(cls, work_dir, run_id, log=print):
        work_dir = Path(work_dir)
        path = work_dir / LOCK_FILE
        with writing(work_dir):
            work_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run": run_id,
                           "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        for attempt in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(work_dir)
                if holder is not None and not holder.is_stale:
                    raise holder.refusal() from None
                if holder is not None:
                    log(f"taking over the stale lock {path}: it names {holder}, and no such process runs on this "
                        "host (a run that was killed)")
                    _remove_if_unchanged(path, holder.text)
                continue
            except OSError as err:
                raise WriteError(path, err) from err
            try:
                with writing(path):
                    os.write(fd, text.encode())
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            os.close(fd)
            return cls(path, text)
        raise WorkDirError(f"could not take the lock {path}: other processes keep creating it")

    def release(self):
        """Remove the lock file if it is still this process's (never another run's)."""
        with contextlib.suppress(OSError):
            if self.path.read_text() == self.text:
                self.path.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _remove_if_unchanged(path, text):
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            path.unlink()


# ---------------------------------------------------------------- under the lock

def check_unchanged(run_dir):
    """Under the lock: the work dir still holds the checkpoints it held when the run was placed."""
    now = _snapshot(checkpoints_by_run(run_dir.work_dir))
    if now != run_dir.seen:
        added = sorted(set(now) - set(run_dir.seen))
        removed = sorted(set(run_dir.seen) - set(now))
        raise WorkDirError(f"the checkpoints in {run_dir.work_dir} changed while this run was starting (new: "
                           f"{added or 'none'}; gone: {removed or 'none'}); start it again")


def remove_stale_temp_files(work_dir, log=print):
    """Delete the temp files that killed atomic writes left in the work dir's run dirs (under the lock, so no live
    run's); returns them."""
    removed = []
    for run_dir in run_dirs(work_dir):
        for folder in (run_dir / name for name in _WRITTEN_FOLDERS):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if is_temp_file(path) and path.is_file():
                    size = path.stat().st_size
                    path.unlink()
                    removed.append(path)
                    log(f"removed {path} ({size / 2**20:.1f} MiB), the temp file of a save that was interrupted")
    return removed


def write_config(run_dir, text, start_step):
    """Write the run's merged config without overwriting an earlier one: `config.py` at the run dir's first start;
    a later start whose config is in none of the run dir's config files writes `config_step_<S>.py` (S: the step
    it starts from; `_2`, `_3`, ... if taken). Returns the file that holds `text`."""
    run_dir = Path(run_dir)
    for path in sorted(run_dir.glob("config*.py")):
        if path.read_text() == text:
            return path
    names = itertools.chain([CONFIG_FILE, f"config_step_{start_step}.py"],
                            (f"config_step_{start_step}_{n}.py" for n in itertools.count(2)))
    return atomic_write_text(next(run_dir / name for name in names if not (run_dir / name).exists()), text)
