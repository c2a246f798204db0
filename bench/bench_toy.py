"""The toy recipe's speed, so that a regression shows: training steps/s of configs/pixart_config/PixArt_toy_shapes.py
through the one training core, and the share of each quickstart stage.

  python bench/bench_toy.py                                   # 300 steps on the quickstart's features, 2 threads
  python bench/bench_toy.py --metrics output/quickstart/metrics.json   # also the stage shares of a quickstart run

Needs the toy dataset and its features (python scripts/quickstart.py makes them). The training runs in a fresh
temporary work dir with the quickstart's pinned threads; the first --warmup steps (data cache filling, first
allocations) are timed apart from the rest. Prints a table and, with --json, writes it. Times only: nothing here
decides a figure, and no test asserts one.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import tempfile
import time

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/pixart_config/PixArt_toy_shapes.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="timed training steps after the warm-up (default 300)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps, timed apart (default 50)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 2, as the quickstart)")
    parser.add_argument("--metrics", help="a quickstart metrics.json: print the share of each stage")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be 1 or more")
    return args


def train_steps_per_second(steps, warmup, threads):
    """(warm-up steps/s, steady steps/s): two runs of the core, the second resuming the first's checkpoint."""
    from diffusion.train.core import TrainOptions, train
    from diffusion.utils.config import load_config
    cfg = load_config(CONFIG, {"data_root": str(REPO / "data"), "eval_interval": 0, "save_model_epochs": 0,
                               "log_interval": 10 ** 9})
    dataset = REPO / cfg.data_root / cfg.data.root
    if not (dataset / "caption_feature_wmask").is_dir():
        raise SystemExit(f"error: no toy features under {dataset}: run python scripts/quickstart.py first")
    rates = []
    with tempfile.TemporaryDirectory() as work_dir:
        for total in (warmup, warmup + steps):
            started = time.perf_counter()
            train(cfg.with_overrides({"max_steps": total}),
                  TrainOptions(work_dir=work_dir, resume_from="auto", report_to="none"))
            done = total if not rates else steps
            rates.append(done / (time.perf_counter() - started))
    return rates


def stage_shares(metrics_path):
    metrics = json.loads(Path(metrics_path).read_text())
    timings = metrics["timings_s"]
    total = sum(timings.values())
    return {name.removesuffix("_s"): (seconds, seconds / total) for name, seconds in timings.items()}, metrics


def main(argv=None):
    args = parse_args(argv)
    from diffusion.utils.cpu import RECIPE_THREADS, pin_cpu_numerics
    threads = pin_cpu_numerics(args.threads or RECIPE_THREADS)
    warm, steady = train_steps_per_second(args.steps, args.warmup, threads)
    result = {"threads": threads, "warmup_steps": args.warmup, "steps": args.steps,
              "warmup_steps_per_s": round(warm, 2), "steps_per_s": round(steady, 2)}
    print(f"toy training ({threads} threads): {steady:.2f} steps/s over {args.steps} steps "
          f"({warm:.2f} steps/s over the first {args.warmup}, with start-up)")
    if args.metrics:
        shares, metrics = stage_shares(args.metrics)
        result["stages"] = {name: {"s": seconds, "share": round(share, 3)} for name, (seconds, share) in shares.items()}
        print(f"\nstages of {args.metrics} (seed {metrics.get('numerics', {}).get('seed')}):")
        print(f"{'stage':12s}{'seconds':>10s}{'share':>8s}")
        for name, (seconds, share) in shares.items():
            print(f"{name:12s}{seconds:10.1f}{share:8.1%}")
        if "train" in shares and metrics.get("train_steps"):
            print(f"quickstart training: {metrics['train_steps'] / shares['train'][0]:.2f} steps/s "
                  f"({metrics['train_steps']} steps, checkpoint writes and start-up included)")
    if args.json:
        from diffusion.utils.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
