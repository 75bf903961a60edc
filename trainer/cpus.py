"""How many dataloader processes a training process should start on this machine.

Each process of a training starts `--workers` loader processes. Left to a fixed 8, two CPU
workers on a 2-core machine run 16 loaders and 8 GPU workers on one host run 64, all fighting
for the same cores. As in YOLOv5, the default is capped by the CPUs this process may use,
shared among the processes on the host, and by the batch per process:

    min(8, CPUs available / processes sharing them, batch per process)

- CPUs available: the process's CPU affinity, and the container's CPU quota (cgroup v2
  `cpu.max`, v1 `cpu.cfs_quota_us`) where one is set.
- Processes sharing them: the evolution workers on this host (`EVOLVECTL_WORKERS_ON_HOST`, set
  by evolvectl's backends) times the DDP processes on this node (`LOCAL_WORLD_SIZE`, set by
  torchrun).

An explicit `--workers N` is used as given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

MAX_LOADER_WORKERS = 8
WORKERS_ON_HOST = "EVOLVECTL_WORKERS_ON_HOST"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def default_loader_workers(batch_per_process: int, environ: Mapping[str, str] | None = None,
                           cgroup: Path | None = None) -> int:
    """Loader processes for one training process when --workers is not given."""
    environ = os.environ if environ is None else environ
    sharing = _positive(environ.get(WORKERS_ON_HOST)) * _positive(environ.get("LOCAL_WORLD_SIZE"))
    share = available_cpus(cgroup) // sharing
    return max(0, min(MAX_LOADER_WORKERS, share, batch_per_process if batch_per_process > 1 else 0))


def available_cpus(cgroup: Path | None = None) -> int:
    """The CPUs this process may run on, at most its cgroup's quota (rounded down, at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup)
    return max(1, min(cpus, math.floor(quota))) if quota is not None else cpus


def cgroup_cpu_quota(cgroup: Path | None = None) -> float | None:
    """The container's CPU limit in CPUs (`docker run --cpus 2.5` gives 2.5), or None when unlimited
    or unreadable."""
    cgroup = CGROUP_ROOT if cgroup is None else cgroup
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "250000 100000"
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()  # cgroup v1: -1 when unlimited
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = float(quota), float(period)
    except ValueError:  # "max"
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _positive(text: str | None) -> int:
    try:
        return max(1, int(text)) if text else 1
    except ValueError:
        return 1
