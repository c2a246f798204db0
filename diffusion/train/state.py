"""Training checkpoints: what a run needs to continue exactly, written atomically, found again by `auto`.

A checkpoint holds `state_dict`, `state_dict_ema`, `optimizer`, `scheduler` (released key names, SPEC
section 8), plus `scaler`, the run state (`epoch`, `step`, the position in the data order, the non-finite
streak), every rank's RNG states, the config text, `flavour` (its name, EMA copies and own state; checkpoints
written before it count as full training) and `run` (the run's identity, `{"id": ..., "parent": ...}`; checkpoints
written before it have none and still resume). Files are `RUN_DIR/checkpoints/epoch_{E}_step_{S}.pth`, where the run
dir is the work dir for its first run (`diffusion/train/workdir.py`); a name only ever holds a complete file (temp
file then rename), so an interrupted save leaves the previous checkpoints intact. A run dir holds one run's lineage
only, so pruning it touches no other run's files.
"""
import random
import re
from pathlib import Path

import numpy as np
import torch

from diffusion.utils.checkpoint import CheckpointError, atomic_save, read_checkpoint

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^epoch_(\d+)_step_(\d+)\.pth$")
REQUIRED_KEYS = ("state_dict", "state_dict_ema", "optimizer", "scheduler", "epoch", "step")


def checkpoint_path(work_dir, epoch, step):
    return Path(work_dir) / CHECKPOINT_DIR / f"epoch_{epoch}_step_{step}.pth"


def checkpoint_step(path):
    """The global step in a checkpoint's file name (`epoch_E_step_S.pth` -> S)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a training checkpoint (epoch_E_step_S.pth)")
    return int(match.group(2))


def list_checkpoints(work_dir):
    """Complete checkpoints of a run, oldest first (by step, then epoch)."""
    folder = Path(work_dir) / CHECKPOINT_DIR
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(2)), int(match.group(1)), path))
    return [path for _, _, path in sorted(found)]


def find_resumable_checkpoint(work_dir, log=print):
    """The newest checkpoint that reads back and holds a full training state, or None."""
    return read_resumable_checkpoint(work_dir, log)[0]


def read_resumable_checkpoint(run_dir, log=print):
    """(path, contents) of the newest checkpoint of a run dir that reads back and holds a full training state, or
    (None, None); unreadable and incomplete ones are skipped with a message to `log`."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            obj = read_checkpoint(path)
        except CheckpointError as err:
            log(f"skipping unreadable checkpoint {path}: {err}")
            continue
        missing = [k for k in REQUIRED_KEYS if k not in obj]
        if missing:
            log(f"skipping {path}: not a training checkpoint (lacks {missing})")
            continue
        return path, obj
    return None, None


def run_id_of(checkpoint):
    """The id of the run that wrote a loaded checkpoint (None for checkpoints written before run ids)."""
    run = checkpoint.get("run") or {}
    return run.get("id")


def prune_checkpoints(run_dir, keep_last_n, newest=None):
    """Delete the run dir's checkpoints older than its newest `keep_last_n` (None or 0 keeps everything). Only
    those sorting before `newest` (the one just written; default: the newest there) are deleted, so neither it nor
    any checkpoint of a higher step ever is."""
    if keep_last_n is not None and keep_last_n < 0:
        raise ValueError(f"keep_last_n is {keep_last_n}; expected None, 0 (keep every checkpoint) or a positive "
                         "number of checkpoints to keep")
    if not keep_last_n:
        return []
    found = list_checkpoints(run_dir)
    names = [path.name for path in found]
    newest = Path(newest).name if newest is not None else (names[-1] if names else None)
    older = found[:names.index(newest)] if newest in names else []
    old = older[:max(0, len(older) - (keep_last_n - 1))]
    for path in old:
        path.unlink()
    return old


def save_training_checkpoint(path, payload):
    return atomic_save(payload, path)


def load_training_checkpoint(path):
    obj = read_checkpoint(path)
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint: it lacks {missing}; "
                              "use --load-from to start from its weights instead")
    return obj


# ---------------------------------------------------------------- RNG states (weights_only-loadable)

def capture_rng_state():
    """This process's RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value
