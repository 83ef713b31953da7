"""The CPU cores this process may use, for sizing thread pools (validation, conversion, tf.data).

A container limited to 2 CPUs of a 64-core Kubernetes node sees 64 cores in ``os.cpu_count()`` and in
its CPU affinity (a CFS quota does not change the affinity), so pools sized from either would start 32
times too many threads; ``available_cores`` caps the affinity by the cgroup's CPU quota.
"""

from __future__ import annotations

import math
import os


def available_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPU cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a pod's CPU limit).

    ``os.cpu_count()`` counts the machine's cores, which in a container limited to 2 CPUs of a 64-core
    node would start 32 times too many decoding threads.
    """
    cores = affinity_cores()
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def affinity_cores() -> int:
    """The cores this process may be scheduled on (what TensorFlow sizes its thread pools by)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_cpu_quota(root: str) -> float | None:
    """The CPU limit in cores from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; None when unlimited."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = (f.read().split() + ["100000"])[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None

