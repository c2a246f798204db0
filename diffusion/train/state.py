"""Training checkpoints: what a run needs to continue exactly, written atomically, found again by `auto`.

A checkpoint holds `state_dict`, `state_dict_ema`, `optimizer`, `scheduler` (released key names, SPEC
section 8), plus `scaler`, the run state (`epoch`, `step`, the position in the data order, the non-finite
streak), every rank's RNG states, the config text and `flavour` (its name, EMA copies and own state; checkpoints
written before it count as full training). Files are `work_dir/checkpoints/epoch_{E}_step_{S}.pth`; a name
only ever holds a complete file (temp file then rename), so an interrupted save leaves the previous checkpoints
intact.
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
    for path in reversed(list_checkpoints(work_dir)):
        try:
            obj = read_checkpoint(path)
        except CheckpointError as err:
            log(f"skipping unreadable checkpoint {path}: {err}")
            continue
        missing = [k for k in REQUIRED_KEYS if k not in obj]
        if missing:
            log(f"skipping {path}: not a training checkpoint (lacks {missing})")
            continue
        return path
    return None


def prune_checkpoints(work_dir, keep_last_n):
    """Delete all but the newest `keep_last_n` checkpoints (None or 0 keeps everything)."""
    if not keep_last_n:
        return []
    old = list_checkpoints(work_dir)[:-keep_last_n]
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
