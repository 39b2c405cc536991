"""CPU time of the whole machine and of this benchmark, to state what other processes used during a run."""

from __future__ import annotations

import os
import resource


def busy_cpu_s() -> float:
    """CPU seconds used by every process since boot (/proc/stat, all cores; idle and iowait left out)."""
    with open("/proc/stat") as f:
        parts = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished, waited-for children (e.g. benchmark workers, demo runs)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
