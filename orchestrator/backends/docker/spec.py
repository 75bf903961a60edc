"""What one worker container looks like, as plain data: built without an engine, run by `engine`.

Inside every container the layout is fixed, whatever the host looks like:
- `/runs` is the run volume (read-write): every worker of a run writes to `/runs/evolve/<run>`.
- `/datasets/<name>` is the dataset folder (read-only). With the working directory at
  `/workspace`, a YOLOv5-style data YAML that says `path: ../datasets/<name>` finds it.
- The one GPU a worker gets is its device 0, because the engine exposes only that GPU
  (and a DDP job's n GPUs are its devices 0 to n-1).

Evolution workers run the evolution entry point (`python -m orchestrator.evolution`); a DDP
job runs the trainer through a one-line shell wrapper that resumes from its own last.pt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import docker.types
import docker.utils
from docker.errors import DockerException

from orchestrator.backends.base import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_RESTARTS,
    ContainerLimits,
)
from orchestrator.runs.ddp import (
    CHECKPOINT,
    DdpPlan,
    job_command,
    job_environment,
    resuming,
)
from orchestrator.runs.inputs import (
    RUNS_DIR,
    StagedInputs,
    container_dataset_path,
    container_run_dir,
)
from orchestrator.runs.names import (
    DDP_KEY,
    PROJECT,
    check_run_name,
    ddp_name,
    worker_name,
)
from orchestrator.runs.plan import TrainerOptions

PROJECT_LABEL = "org.evolvectl.project"
RUN_LABEL = "org.evolvectl.run"
GPU_LABEL = "org.evolvectl.gpu"
SLOT_LABEL = "org.evolvectl.slot"
ROLE_LABEL = "org.evolvectl.role"
EVOLVE_ROLE = "evolve-worker"
# One DDP training job (`evolvectl ddp`): one worker per host, whatever its GPU count.
DDP_ROLE = "ddp"
WORKDIR = "/workspace"
WORKER_USER = "1000:1000"
# Evolution workers run the evolution entry point; the image's own entrypoint is the trainer.
EVOLUTION_ENTRYPOINT = ("python", "-m", "orchestrator.evolution")


def memory_bytes(text: str) -> int:
    """A size as `docker run --shm-size` takes it (`8g`, `512m`, bytes), by the Docker SDK's own
    parser; 0 for text it cannot read."""
    try:
        return int(docker.utils.parse_bytes(text))
    except DockerException:
        return 0


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
    limits: ContainerLimits = DEFAULT_LIMITS
    max_restarts: int = DEFAULT_MAX_RESTARTS
    working_dir: str = WORKDIR
    user: str = WORKER_USER
    entrypoint: tuple[str, ...] | None = None  # None: the image's own (`python -m trainer`)
    network_mode: str | None = None  # None: Docker's default bridge; "host" for a DDP job across hosts
    # The engine's host name, so the journal's provenance (`host`) names the machine rather than the
    # container id Docker would give; unset with host networking, which has the host's already.
    hostname: str | None = None

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
            "shm_size": self.limits.shm_size,
            "restart_policy": {"Name": "on-failure", "MaximumRetryCount": self.max_restarts},
            "working_dir": self.working_dir,
            "user": self.user,
            # A real init reaps dataloader processes and forwards `docker stop`'s SIGTERM.
            "init": True,
        }
        if self.limits.memory is not None:
            kwargs["mem_limit"] = self.limits.memory
        if self.limits.cpus is not None:
            kwargs["nano_cpus"] = round(self.limits.cpus * 1e9)
        if self.gpu_ids is not None:
            kwargs["device_requests"] = self.device_requests()
        if self.entrypoint is not None:
            kwargs["entrypoint"] = list(self.entrypoint)
        if self.network_mode is not None:
            kwargs["network_mode"] = self.network_mode
        elif self.hostname is not None:
            kwargs["hostname"] = self.hostname
        return kwargs


def labelled_key(labels: Mapping[str, str], name: str) -> str:
    """`gpu3`, `cpu0` or `ddp`: a worker's key from its labels (`name` for compose replicas, which have no slot)."""
    if labels.get(ROLE_LABEL) == DDP_ROLE:
        return DDP_KEY
    gpu = labels.get(GPU_LABEL, "")
    if gpu.isdigit():
        return f"gpu{gpu}"
    slot = labels.get(SLOT_LABEL)
    return f"cpu{slot}" if slot is not None else name


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
    limits: ContainerLimits = DEFAULT_LIMITS,
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
        limits=limits,
        max_restarts=max_restarts,
        entrypoint=EVOLUTION_ENTRYPOINT,
    )


def container_training_dir(run: str) -> str:
    """Where the job's container sees the run folder, and writes its outputs."""
    return f"{RUNS_DIR}/train/{check_run_name(run)}"


def ddp_spec(
    plan: DdpPlan,
    staged: StagedInputs,
    image: str,
    user: str = WORKER_USER,
    limits: ContainerLimits = DEFAULT_LIMITS,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
) -> WorkerSpec:
    """The container of a DDP job: all its GPUs in one device request, the run folder read-write."""
    inside = container_training_dir(plan.run)
    options = _rebased(staged.options, container_run_dir(plan.run), inside)
    devices = ",".join(str(index) for index in range(len(plan.gpus))) if plan.gpus else "cpu"
    run_folder = Mount(str(plan.run_dir), inside, "bind", read_only=False)
    mounts = (run_folder, dataset_mount(staged.dataset_dir)) if staged.dataset_dir else (run_folder,)
    labels = {**run_labels(plan.run), ROLE_LABEL: DDP_ROLE, GPU_LABEL: ",".join(map(str, plan.gpus)) or "cpu"}
    return WorkerSpec(
        image=image,
        name=ddp_name(plan.run),
        command=tuple(job_command(plan, options, f"{RUNS_DIR}/train", devices, "python")),
        environment=_job_environment(plan, user),
        mounts=mounts,
        gpu_ids=plan.gpus or None,
        labels=labels,
        limits=limits,
        max_restarts=max_restarts,
        user=user,
        entrypoint=resuming(f"{inside}/{CHECKPOINT}"),
        network_mode="host" if plan.rendezvous.multi_node else None,
    )


def _rebased(options: TrainerOptions, old: str, new: str) -> TrainerOptions:
    """Staging names files under the evolution's mount point; a training's folder is mounted elsewhere."""
    paths = {name: new + value[len(old):] for name in ("data", "cfg", "hyp")
             if isinstance(value := getattr(options, name), str) and value.startswith(old + "/")}
    return replace(options, **paths)


def _job_environment(plan: DdpPlan, user: str) -> dict[str, str]:
    """The job's environment, with a writable HOME for a foreign uid (the image's belongs to uid 1000)."""
    return {**job_environment(plan), **({"HOME": "/tmp"} if user != WORKER_USER else {})}
