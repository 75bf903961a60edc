"""What one worker container looks like, as plain data: built without an engine, run by `containers`.

Inside every container the layout is fixed, whatever the host looks like:
- `/runs` is the run volume (read-write): every worker of a run writes to `/runs/evolve/<run>`.
- `/datasets/<name>` is the dataset folder (read-only). With the working directory at
  `/workspace`, a YOLOv5-style data YAML that says `path: ../datasets/<name>` finds it.
- The one GPU a worker gets is its device 0, because the engine exposes only that GPU
  (and a DDP job's n GPUs are its devices 0 to n-1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.types

from trainer.errors import UserError

PROJECT = "evolvectl"
PROJECT_LABEL = "org.evolvectl.project"
RUN_LABEL = "org.evolvectl.run"
GPU_LABEL = "org.evolvectl.gpu"
SLOT_LABEL = "org.evolvectl.slot"
ROLE_LABEL = "org.evolvectl.role"
EVOLVE_ROLE = "evolve-worker"
# One DDP training job (`evolvectl ddp`): one worker per host, whatever its GPU count.
DDP_ROLE = "ddp"
DDP_KEY = "ddp"

RUNS_DIR = "/runs"
DATASETS_DIR = "/datasets"
WORKDIR = "/workspace"
WORKER_USER = "1000:1000"

# Dataloader workers share batches through /dev/shm; Docker's 64 MB default kills them.
DEFAULT_SHM_SIZE = "8g"
# A crashed worker comes back on its own a few times; its lost generation is retried by the
# journal's leases, so a restart resumes the evolution instead of starting over.
DEFAULT_MAX_RESTARTS = 3

# Docker's own rule for container names, which embed the run name.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Mount:
    """A host folder (`bind`) or a named Docker volume (`volume`) seen at `target`."""

    source: str
    target: str
    kind: str
    read_only: bool

    def to_docker(self) -> docker.types.Mount:
        return docker.types.Mount(self.target, self.source, type=self.kind, read_only=self.read_only)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything the engine needs to start one worker container."""

    image: str
    name: str
    command: tuple[str, ...]
    environment: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    gpu_ids: tuple[int, ...] | None = None  # None: a CPU worker, no device request at all
    labels: Mapping[str, str] = field(default_factory=dict)
    shm_size: str = DEFAULT_SHM_SIZE
    max_restarts: int = DEFAULT_MAX_RESTARTS
    working_dir: str = WORKDIR
    user: str = WORKER_USER
    entrypoint: tuple[str, ...] | None = None  # None: the image's own (`python -m trainer`)
    network_mode: str | None = None  # None: Docker's default bridge; "host" for a DDP job across hosts

    def device_requests(self) -> list[docker.types.DeviceRequest]:
        """Ask the NVIDIA runtime for exactly these GPUs (`--gpus '"device=3"'`)."""
        if self.gpu_ids is None:
            return []
        device_ids = [str(gpu) for gpu in self.gpu_ids]
        return [docker.types.DeviceRequest(device_ids=device_ids, capabilities=[["gpu"]])]

    def to_run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `client.containers.run(detach=True, **kwargs)` (or `create`)."""
        kwargs: dict[str, Any] = {
            "image": self.image,
            "name": self.name,
            "command": list(self.command),
            "environment": dict(self.environment),
            "mounts": [mount.to_docker() for mount in self.mounts],
            "labels": dict(self.labels),
            "shm_size": self.shm_size,
            "restart_policy": {"Name": "on-failure", "MaximumRetryCount": self.max_restarts},
            "working_dir": self.working_dir,
            "user": self.user,
            # A real init reaps dataloader processes and forwards `docker stop`'s SIGTERM.
            "init": True,
        }
        if self.gpu_ids is not None:
            kwargs["device_requests"] = self.device_requests()
        if self.entrypoint is not None:
            kwargs["entrypoint"] = list(self.entrypoint)
        if self.network_mode is not None:
            kwargs["network_mode"] = self.network_mode
        return kwargs


def check_run_name(run: str) -> str:
    """A run name becomes part of container names, so it must follow Docker's naming rule."""
    if not _NAME_PATTERN.fullmatch(run):
        raise UserError(
            f"run name '{run}' cannot name a container: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    return run


def worker_name(run: str, gpu: int | None, slot: int) -> str:
    """`evolvectl-<run>-gpu<k>` for the worker on GPU k, `evolvectl-<run>-cpu<slot>` otherwise."""
    device = f"gpu{gpu}" if gpu is not None else f"cpu{slot}"
    return f"{PROJECT}-{check_run_name(run)}-{device}"


def ddp_name(run: str) -> str:
    """`evolvectl-<run>-ddp`: the one container of a DDP training on this host."""
    return f"{PROJECT}-{check_run_name(run)}-{DDP_KEY}"


def run_labels(run: str | None = None) -> dict[str, str]:
    """Labels every container of the project (and of one run, if given) carries."""
    labels = {PROJECT_LABEL: PROJECT}
    if run is not None:
        labels[RUN_LABEL] = run
    return labels


def run_mount(run_volume: Path | str) -> Mount:
    """The run storage at /runs: a host folder when given a path, else a named volume."""
    is_path = isinstance(run_volume, Path) or "/" in run_volume
    if is_path:
        return Mount(str(Path(run_volume).absolute()), RUNS_DIR, "bind", read_only=False)
    return Mount(run_volume, RUNS_DIR, "volume", read_only=False)


def dataset_mount(dataset_dir: Path) -> Mount:
    """The dataset folder, read-only, at /datasets/<folder name>."""
    return Mount(str(dataset_dir.absolute()), container_dataset_path(dataset_dir), "bind", read_only=True)


def container_dataset_path(dataset_dir: Path) -> str:
    """Where a worker sees the host's `dataset_dir`."""
    return f"{DATASETS_DIR}/{dataset_dir.absolute().name}"


def worker_spec(
    run: str,
    gpu: int | None,
    slot: int,
    image: str,
    run_volume: Path | str,
    dataset_dir: Path | None,
    trainer_args: list[str],
    environment: Mapping[str, str] | None = None,
    role: str = EVOLVE_ROLE,
    shm_size: str = DEFAULT_SHM_SIZE,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
) -> WorkerSpec:
    """The container of one evolution worker: on GPU `gpu`, or a CPU worker number `slot`.

    Every worker of a run writes into the same `/runs/evolve/<run>` and names itself after
    its container, so the journal can tell workers apart and a restarted container resumes
    under the same identity.
    """
    name = worker_name(run, gpu, slot)
    device = "0" if gpu is not None else "cpu"
    command = (
        "--evolve", *trainer_args,
        "--project", f"{RUNS_DIR}/evolve", "--name", run,
        "--worker-id", name, "--device", device,
    )
    labels = {
        **run_labels(run),
        GPU_LABEL: str(gpu) if gpu is not None else "cpu",
        SLOT_LABEL: str(slot),
        ROLE_LABEL: role,
    }
    mounts = [run_mount(run_volume)]
    if dataset_dir is not None:
        mounts.append(dataset_mount(dataset_dir))
    return WorkerSpec(
        image=image,
        name=name,
        command=command,
        environment=dict(environment or {}),
        mounts=tuple(mounts),
        gpu_ids=(gpu,) if gpu is not None else None,
        labels=labels,
        shm_size=shm_size,
        max_restarts=max_restarts,
    )
