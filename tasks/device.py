"""Where work runs, in which precision, and on how many CPU threads: one rule for every stage, so 'auto'
means the same everywhere.

CPU threads: torch's default is one intra-op thread per core, which is right on an idle machine. Beside
busy processes it is not: torch's OpenMP threads spin at each barrier waiting for a sibling the kernel
has descheduled for a neighbour, burning CPU the neighbours need and losing time beyond the CPU share the
run gets (docs/BENCHMARKS.md "Load"; tests/helpers.py ``one_thread``). ``cpu_threads`` leaves the cores
other processes keep busy to them. ``use_free_cores`` applies it through ``OMP_NUM_THREADS``
before torch is imported (torch reads it once, at import), so it is decided when the command starts, before
this process adds load of its own, and a user's own ``OMP_NUM_THREADS`` always wins. Light: torch is
imported by the functions that need it, so the CLI can call this before any command loads torch.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

THREADS_ENV = "OMP_NUM_THREADS"  # read by torch's OpenMP pool (and OpenBLAS/MKL) when they load
_SAMPLES, _SAMPLE_GAP_S = 3, 0.01  # runnable counts read a few times: one reading catches a passing process


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU; anything else ('cpu', 'cuda:1', ...) as given."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_bf16(mixed_precision: str, device: torch.device) -> bool:
    """'bf16' always, 'auto' on CUDA only (CPUs run fp32 faster than emulated bf16), 'no' never."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def autocast(mixed_precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where ``use_bf16`` says so (weights stay fp32), else a no-op context."""
    import torch

    if use_bf16(mixed_precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (a container's cpuset), capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError), open("/sys/fs/cgroup/cpu.max") as f:
        quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cores)


def busy_elsewhere() -> float:
    """Cores other processes keep busy now: the smaller of the 1-minute load average and the count of runnable
    threads (less this one), so a burst that just ended (the load average) or a process passing by (one
    reading) does not count, while neighbours that have been busy a while and still are do. 0 where unknown."""
    try:
        load1 = os.getloadavg()[0]
        counts = []
        for i in range(_SAMPLES):
            if i:
                time.sleep(_SAMPLE_GAP_S)
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)  # "running/total": this reader runs
    except (AttributeError, OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, min(load1, statistics.median(counts)))


def cpu_threads(cores: int | None = None, busy: float | None = None) -> int:
    """Intra-op threads for this process: the usable cores less those busy elsewhere (rounded), at least one.
    2 cores: idle 2; one or two busy neighbours 1."""
    cores = usable_cores() if cores is None else cores
    busy = busy_elsewhere() if busy is None else busy
    return max(1, min(cores, cores - int(busy + 0.5)))


def use_free_cores() -> int | None:
    """Set ``OMP_NUM_THREADS`` to ``cpu_threads()`` unless it is set already; the count set, or None. Call it
    before torch is imported: later, torch's pool is sized already and this changes nothing."""
    if os.environ.get(THREADS_ENV):
        return None
    threads = cpu_threads()
    os.environ[THREADS_ENV] = str(threads)
    return threads
