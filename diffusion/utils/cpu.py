"""How many CPU threads to give torch on a machine other processes may share."""
import os
import time

PROC_STAT = '/proc/stat'


def _cpu_times():
    """(busy, total) jiffies summed over all cores, from /proc/stat; None where it does not exist."""
    try:
        with open(PROC_STAT) as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cores(interval=0.5):
    """Cores other work keeps busy: the lesser of the 1-minute load average and the busy cores measured over
    the next `interval` seconds (Linux /proc/stat). Each alone misleads: the load average still counts a
    process that just ended (a pipeline's previous stage), a short sample counts a command that happens to
    run at that instant; a competing job that lasts shows in both."""
    load = os.getloadavg()[0]
    before = _cpu_times()
    if before is None:
        return load
    time.sleep(interval)
    after = _cpu_times()
    busy, total = after[0] - before[0], after[1] - before[1]
    return min(load, (os.cpu_count() or 1) * busy / total if total > 0 else 0.0)


def idle_cpu_threads(interval=0.5):
    """CPU threads worth using now: OMP_NUM_THREADS if set, else the cores that other work leaves idle (at
    least 1). On a shared machine torch's default (every core) makes its threads wait on each other: 5x slower,
    measured on 2 cores."""
    if os.environ.get('OMP_NUM_THREADS', '').isdigit() and int(os.environ['OMP_NUM_THREADS']) > 0:
        return int(os.environ['OMP_NUM_THREADS'])
    cores = os.cpu_count() or 1
    return max(1, min(cores, round(cores - busy_cores(interval))))


# The thread count of the toy recipe's published figures (the project's machines have 2 cores). CPU results are
# bitwise reproducible for a fixed thread count only: reductions and matrix products split their sums by thread.
RECIPE_THREADS = 2


def pin_cpu_numerics(threads):
    """Make this process's CPU results depend on its inputs, seeds and `threads` only, not on how busy the
    machine is: exactly `threads` intra-op threads (never a count chosen from the idle cores) and torch's
    deterministic algorithms. Bitwise equality also needs the same CPU kernel family (torch picks AVX-512 or
    AVX2 kernels by the processor) and the same torch build. Returns `threads`."""
    import torch

    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return threads


def numerics_record(threads, seed=None):
    """What decides a pinned run's figures besides its inputs (pin_cpu_numerics): the record the toy proofs write
    into their metrics.json, so a figure from another thread count, kernel family or torch build is seen as such."""
    import torch

    record = {"threads": threads, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if seed is not None:
        record["seed"] = seed
    return record
