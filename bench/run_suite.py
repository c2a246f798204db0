"""Run a plan of train/sample benchmarks in ONE process (imports and the CUDA context are paid once) and write a
markdown summary and every run's full results (runs.json) into --out after each run, so a run cut short by a
time limit still leaves everything finished so far. Runs that would start after --budget-s seconds are skipped.

    python bench/run_suite.py --plan cpu --threads 1 --out /tmp/cpu        # the CPU results, a few minutes
    python bench/run_suite.py --plan gpu --out $OUT --budget-s 240        # the GPU plan (bench/gpu_run.sh)
    python bench/run_suite.py --plan smoke --out /tmp/smoke               # tiny sizes: checks the GPU plan's code
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import gc
import json
import os
import platform
import time
import traceback

import torch

import bench_sample
import bench_train
from common import DTYPES, diffusers_version, fmt, gib, matmul_peak

# (bench, extra arguments). Ordered by priority: the time budget cuts from the end.
GPU_PLAN = [
    ("train", "--size 256 --batch 64"),
    ("train", "--size 512 --batch 32"),
    ("train", "--size 1024 --batch 8 --with-baseline"),
    ("train", "--size 1024 --batch 8 --grad-ckpt"),
    ("sample", "--size 1024 --caption-len 32 --with-baseline"),
    ("sample", "--size 1024 --caption-len 120"),
    ("train", "--size 1024 --batch 8 --compile"),
    ("sample", "--size 1024 --caption-len 32 --compile"),
    ("train", "--size 256 --batch 64 --grad-ckpt"),
    ("train", "--size 512 --batch 32 --grad-ckpt"),
    ("train", "--size 512 --batch 32 --compile"),
    ("train", "--size 256 --batch 64 --compile"),
]
CPU_PLAN = [
    ("train", "--with-baseline"),
    ("sample", "--caption-len 32 --with-baseline"),
    ("sample", "--caption-len 120 --with-baseline"),
]


def _tiny(args):
    for big, small in (("--size 1024", "--size 128"), ("--size 512", "--size 64"), ("--size 256", "--size 64"),
                       ("--batch 64", "--batch 2"), ("--batch 32", "--batch 2"), ("--batch 8", "--batch 2")):
        args = args.replace(big, small)
    return args


# The GPU plan's code paths at tiny sizes (runs on the CPU too): a check before spending device time.
SMOKE_PLAN = [(bench, _tiny(args)) for bench, args in GPU_PLAN]
# Timing settings per plan and bench, appended to every run's arguments.
TIMING = {
    "gpu": {"train": "--warmup 2 --rounds 4 --calls 2", "sample": "--warmup 1 --rounds 3"},
    "cpu": {"train": "--rounds 6", "sample": "--rounds 3"},  # the whole plan in under 5 minutes here
    "smoke": {"train": "--warmup 1 --rounds 1", "sample": "--warmup 1 --rounds 1 --steps 2"},
}
PLANS = {"gpu": ("xl", GPU_PLAN), "cpu": ("cpu", CPU_PLAN), "smoke": ("cpu", SMOKE_PLAN)}
MODULES = {"train": bench_train, "sample": bench_sample}


def parse_run(bench, extra, preset, device):
    argv = ["--preset", preset] + (["--device", device] if device else []) + extra.split()
    return MODULES[bench].resolve(MODULES[bench].build_parser().parse_args(argv)), argv


def _key(payload):
    c = payload["config"]
    return payload["bench"], c["size"], c["batch"], c.get("grad_ckpt"), c["caption_len"]


def _diffusers_seconds(payload):
    for r in payload["results"]:
        if r["model"] == "diffusers":
            return r["seconds_per_step" if payload["bench"] == "train" else "seconds"]
    return None


def summary_rows(payload, earlier):
    """Table rows of one run. A run without diffusers is compared with the diffusers timing of an earlier run
    of the same setting in this process (same device), marked with '*'."""
    c = payload["config"]
    setting = (f"{c['size']} px b{c['batch']}" + (" ckpt" if c.get("grad_ckpt") else "")
               + (" compiled" if c["compile"] else "") + (" options off" if c["baseline"] else "")
               + (f" prompt {c['caption_len']}" if payload["bench"] == "sample" else ""))
    reference = next((_diffusers_seconds(p) for p in earlier if _key(p) == _key(payload) and _diffusers_seconds(p)),
                     None)
    rows = []
    for r in payload["results"]:
        seconds = r["seconds_per_step" if payload["bench"] == "train" else "seconds"]
        ratio = fmt(r["ratio_vs_diffusers"])
        if ratio is None and reference:
            ratio = f"{fmt(reference / seconds)}*"
        if payload["bench"] == "train":
            pct = None if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.0f}%"
            rows.append(["train", setting, r["model"], f"{fmt(r['images_per_s'])} img/s", ratio,
                         fmt(r.get("speedup_vs_options_off")), fmt(r["tflops"]), pct, gib(r["peak_memory_bytes"])])
        else:
            rows.append(["sample", setting, r["model"], f"{fmt(r['seconds'])} s ({fmt(r['ms_per_step'])} ms/step)",
                         ratio, fmt(r.get("speedup_vs_options_off")), None, None, gib(r["peak_memory_bytes"])])
    return rows


def write_summary(path, header_lines, rows):
    head = ["bench", "setting", "model", "speed", "vs diffusers", "vs options off", "TFLOP/s", "% matmul peak",
            "peak GiB"]
    lines = header_lines + ["", "'*': compared with the diffusers timing of an earlier run of the same setting.",
                            "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", choices=sorted(PLANS), required=True)
    p.add_argument("--out", required=True, help="folder for summary.md and runs.json (every run's full results)")
    p.add_argument("--device", help="override the preset's device (e.g. cpu for the smoke plan)")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no run after this many seconds")
    p.add_argument("--only", type=int, nargs="*", help="indices of the plan to run (default: all)")
    p.add_argument("--threads", type=int, help="CPU threads for torch, passed to every run")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    preset, plan = PLANS[args.plan]
    start = time.perf_counter()
    device = args.device or ("cuda" if preset == "xl" else "cpu")
    header = [f"# bench suite '{args.plan}'", "", f"command: `python {' '.join(sys.argv)}`", "",
              f"torch {torch.__version__}, diffusers {diffusers_version()}, python {platform.python_version()}"]
    if device == "cpu":
        header.append(f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"torch threads {args.threads or torch.get_num_threads()}")
    if device == "cuda":
        peak = matmul_peak("cuda", DTYPES["bf16"])
        header.append(f"device: {torch.cuda.get_device_name()}; bf16 matmul peak measured {peak / 1e12:.0f} TFLOP/s "
                      "(8192^3, random data)")
    rows, payloads = [], []
    text = write_summary(os.path.join(args.out, "summary.md"), header, rows)
    for index, (bench, extra) in enumerate(plan):
        if args.only is not None and index not in args.only:
            continue
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            print(f"[suite] skipping {bench} {extra}: {elapsed:.0f} s elapsed > budget {args.budget_s:.0f} s")
            rows.append([bench, extra, "skipped (time budget)"] + [None] * 6)
            continue
        extra += f" {TIMING[args.plan][bench]}" + (f" --threads {args.threads}" if args.threads else "")
        run_args, argv = parse_run(bench, extra, preset, args.device)
        print(f"\n[suite] {elapsed:.0f} s: {bench} {' '.join(argv)}", flush=True)
        torch._dynamo.reset()  # each run compiles afresh, as in a process of its own
        try:
            payload = MODULES[bench].run(run_args)
            payload["argv"] = [f"bench/bench_{bench}.py"] + argv
            rows += summary_rows(payload, payloads)
            payloads.append(payload)
        except Exception as err:  # one failing run must not lose the others' results
            traceback.print_exc()
            rows.append([bench, extra, f"failed: {type(err).__name__}: {str(err)[:120]}"] + [None] * 6)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        text = write_summary(os.path.join(args.out, "summary.md"), header, rows)
        with open(os.path.join(args.out, "runs.json"), "w") as f:
            json.dump(payloads, f, indent=2)
    print(f"\n[suite] done in {time.perf_counter() - start:.0f} s\n")
    print(text)


if __name__ == "__main__":
    main()
