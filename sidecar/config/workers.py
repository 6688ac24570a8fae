"""``workers: N | auto``: how many worker processes serve the proxy port (sidecar.workers).

A top-level scalar on ``ConfigFile`` (config/file.py), so its errors read like every
other option's (``workers: …``). ``auto`` is the CPUs this process may use (affinity and a
container's CPU quota, not the host's count), resolved at load.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

__all__ = ["MAX_WORKERS", "WorkerCount", "available_cpus", "resolve_workers"]

MAX_WORKERS = 256
CGROUP2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP1_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a container's
    ``--cpus`` / Kubernetes ``limits.cpu``), not the host's count that ``os.cpu_count`` gives."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    for path, parse in ((CGROUP2_CPU_MAX, _cpu_max), (CGROUP1_QUOTA, _cfs_quota)):
        try:
            quota = parse(path)
        except (OSError, ValueError):
            continue
        if quota is not None:
            n = min(n, max(1, math.ceil(quota)))
            break
    return max(1, n)


def _cpu_max(path: str) -> float | None:
    quota, _, period = Path(path).read_text().strip().partition(" ")  # "max 100000" or "200000 100000"
    return None if quota == "max" else int(quota) / int(period or "100000")


def _cfs_quota(path: str) -> float | None:
    quota = int(Path(path).read_text().strip())
    period = int(Path(path.replace("cfs_quota_us", "cfs_period_us")).read_text().strip())
    return None if quota <= 0 else quota / period


def resolve_workers(value: object) -> int:
    """``auto`` -> the CPUs available; a number must be 1..MAX_WORKERS (ValueError otherwise)."""
    if value == "auto":
        return min(MAX_WORKERS, available_cpus())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"expected a whole number from 1 to {MAX_WORKERS}, or auto; got {value!r}")
    return value


_SCHEMA = {
    "anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_WORKERS}, {"const": "auto"}],
    "description": "worker processes sharing the proxy port; auto: one per CPU",
}
WorkerCount = Annotated[int, BeforeValidator(resolve_workers), WithJsonSchema(_SCHEMA)]
