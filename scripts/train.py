"""Train (or fine-tune, or resume) a PixArt model from a config.

One process:            python scripts/train.py CONFIG --work-dir DIR
Several (one machine):  python -m torch.distributed.launch --nproc_per_node=N scripts/train.py CONFIG --work-dir DIR
                        torchrun --nproc_per_node=N scripts/train.py CONFIG --work-dir DIR
                        accelerate launch --num_processes N scripts/train.py CONFIG --work-dir DIR   (GPUs)
Several machines:       torchrun --nnodes=M --node_rank=R --master_addr=HOST --master_port=PORT \\
                            --nproc_per_node=N scripts/train.py CONFIG --work-dir DIR   (on every machine)
Without a GPU the processes talk over gloo, so multi-process training also runs on CPUs (launch it with
torchrun or torch.distributed.launch there: accelerate launch starts one process on a machine without GPUs).

A run owns its work dir: a second run there (or a fresh one beside another run's checkpoints) is refused, and
nothing is written before the start-up checks pass. A failure after training started saves the last completed step
first; the exit status is non-zero and the last line names the cause and where that checkpoint is.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse

from diffusion.data.errors import DataError
from diffusion.model_zoo import resolve_model_argument
from diffusion.train.core import TrainingError, TrainOptions, train
from diffusion.train.flavour import flavour_from_config
from diffusion.train.workdir import RUNS_DIR, WorkDirError
from diffusion.utils.checkpoint import CheckpointError
from diffusion.utils.config import ConfigError, add_cfg_options_argument, load_config
from diffusion.utils.fileio import WriteError

# errors whose message says all (no traceback); others get theirs unless the training core already logged it
EXPECTED_ERRORS = (ConfigError, CheckpointError, DataError, TrainingError, FileNotFoundError, WorkDirError,
                   WriteError)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="training config, e.g. configs/pixart_config/PixArt_toy_shapes.py")
    parser.add_argument("--work-dir", "--work_dir", dest="work_dir",
                        help="where checkpoints, logs, TensorBoard events, validation grids and the merged config "
                             "go (default: the config's work_dir)")
    parser.add_argument("--resume-from", "--resume_from", dest="resume_from", metavar="CKPT|auto",
                        help="continue a run exactly (weights, EMA, optimizer, schedule, RNG, data position) from a "
                             "checkpoint, or 'auto' for the newest complete one of the most recently started run "
                             "in the work dir")
    parser.add_argument("--allow-used-work-dir", "--allow_used_work_dir", dest="allow_used_work_dir",
                        action="store_true",
                        help="start a fresh run (or branch off an older checkpoint) in a work dir that holds another "
                             f"run's checkpoints: it writes in WORK_DIR/{RUNS_DIR}/<run id>/ and no existing file is "
                             "touched (without it such a start is refused)")
    parser.add_argument("--load-from", "--load_from", dest="load_from", metavar="CKPT",
                        help="initialise the weights from a checkpoint (released .pth included), a diffusers "
                             "transformer or PixArtAlphaPipeline folder, or a named model (PixArt-XL-2-512x512, ...: "
                             "tools/download.py --list; downloaded on first use); non-strict, with a report of keys "
                             "that did not match; training state starts fresh (an LCM run's teacher: read again, "
                             "strictly, at every start, resumes included)")
    parser.add_argument("--report-to", "--report_to", dest="report_to", default="tensorboard",
                        help="experiment tracker for accelerate: tensorboard (default), none, or another tracker "
                             "accelerate supports (wandb, ...)")
    parser.add_argument("--debug", action="store_true",
                        help="log every step and load data in the main process (num_workers=0)")
    parser.add_argument("--local-rank", "--local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by torch.distributed.launch; the env var is used
    add_cfg_options_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.cfg_options)
        load_from = args.load_from or cfg.load_from
        if load_from:  # a named model (or its conventional path) is fetched first; every rank finds it on disk
            load_from = str(resolve_model_argument(load_from)[0])
        options = TrainOptions(work_dir=args.work_dir or cfg.work_dir,
                               resume_from=args.resume_from or cfg.resume_from.get("checkpoint"),
                               load_from=load_from, report_to=args.report_to,
                               debug=args.debug, allow_used_work_dir=args.allow_used_work_dir)
        result = train(cfg, options, flavour_from_config(cfg))  # LCM, DreamBooth, LoRA, ControlNet: as the config says
    except Exception as err:
        if not isinstance(err, EXPECTED_ERRORS) and not getattr(err, "__notes__", None):
            raise  # a failure before training started that no check names: the traceback is the report
        sys.exit(error_line(err))
    print(f"training {'stopped' if result.stopped_by_signal else 'finished'} at step {result.global_step}; "
          f"last checkpoint {result.last_checkpoint}; logs in {result.work_dir}")


def error_line(err):
    """The cause, and what the training core noted (the emergency checkpoint), in one line."""
    cause = str(err) if isinstance(err, EXPECTED_ERRORS) else f"{type(err).__name__}: {err}"
    return "; ".join([f"error: {cause}", *getattr(err, "__notes__", [])])


if __name__ == "__main__":
    main()
