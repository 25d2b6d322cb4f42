"""How many CPUs this process may use, so that thread pools do not oversubscribe a shared machine.

``os.cpu_count()`` counts the host's cores, not the ones this process gets: a CPU affinity
mask (``taskset``, a batch scheduler), a cgroup CPU quota (containers, ``cpu.max``) or an
explicit ``OMP_NUM_THREADS`` all give fewer. Torch intra-op threads, GDAL's compression
threads and the aux reader pools are sized from :func:`available_cpus` (the smallest of
those limits), so that their sum stays within what the process may use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cpus", "cgroup_cpu_limit", "omp_threads"]

#: cgroup v2 and v1 quota files (root of this process's cgroup namespace).
CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_limit(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> int | None:
    """CPUs allowed by the cgroup quota (quota / period, rounded up), or None without a quota."""
    try:
        quota, period = v2.read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            return max(1, math.ceil(float(quota) / float(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = (float(p.read_text().strip()) for p in v1)
        if quota_us > 0 and period_us > 0:
            return max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):
        pass
    return None


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive int (its first entry), or None when unset or invalid."""
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def available_cpus(*, respect_omp: bool = True) -> int:
    """The CPUs this process may use: the smallest of the affinity mask, the cgroup quota and
    (with ``respect_omp``) ``OMP_NUM_THREADS``; at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limits = [n, cgroup_cpu_limit()]
    if respect_omp:
        limits.append(omp_threads())
    return max(1, min(v for v in limits if v))
