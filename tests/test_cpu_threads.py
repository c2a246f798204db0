"""diffusion.utils.cpu: how many threads the CPU tools take on a machine other work may share."""
import pytest

from diffusion.utils import cpu


def fake_machine(monkeypatch, cores, load, busy_fraction):
    """A machine with `cores`, a 1-minute load average `load`, and `busy_fraction` of all CPU time busy now."""
    ticks = iter([(0, 0), (int(busy_fraction * 1000), 1000)])
    monkeypatch.setattr(cpu.os, 'cpu_count', lambda: cores)
    monkeypatch.setattr(cpu.os, 'getloadavg', lambda: (load, load, load))
    monkeypatch.setattr(cpu, '_cpu_times', lambda: next(ticks))
    monkeypatch.setattr(cpu.time, 'sleep', lambda s: None)
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)


@pytest.mark.parametrize('load, busy_fraction, threads', [
    (0.0, 0.0, 2),   # idle
    (1.9, 0.0, 2),   # the previous stage of a pipeline just ended: the load average still counts it
    (0.1, 0.9, 2),   # a command that happens to run right now
    (1.0, 0.5, 1),   # another job holds a core
    (2.5, 1.0, 1),   # busier than the machine: still one thread
])
def test_threads_left_by_other_work(monkeypatch, load, busy_fraction, threads):
    fake_machine(monkeypatch, 2, load, busy_fraction)
    assert cpu.idle_cpu_threads() == threads


def test_omp_num_threads_wins(monkeypatch):
    fake_machine(monkeypatch, 2, 2.0, 1.0)
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert cpu.idle_cpu_threads() == 3
