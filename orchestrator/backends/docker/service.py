"""What one worker looks like as a Docker Swarm service, as plain data; and a service's tasks read back.

A service is built from the same `WorkerSpec` the Docker backend runs as a container, so the
command, mounts, environment, user and labels are the same. What differs:
- one replica, restarted on failure at most `max_restarts` times (Swarm reads 0 attempts as
  "no limit", so no restarts is the `none` condition);
- a GPU worker asks the swarm for one `NVIDIA-GPU` generic resource instead of naming a device:
  the swarm picks the node and the GPU;
- `/dev/shm` is a tmpfs of `--shm-size`, since services have no `--shm-size`;
- the labels go on the service, not on its task containers, so that the Docker backend (which
  finds workers by container label) never touches containers that the swarm would replace.

Built and read without an engine; `swarm` creates the services, `stack` writes them to a stack file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import docker.types

from orchestrator.backends.docker.spec import WorkerSpec, memory_bytes
from trainer.errors import UserError

# A Swarm template: each task's container is named after the node it runs on.
NODE_HOSTNAME = "{{.Node.Hostname}}"
# The generic resource that NVIDIA's Swarm set-up advertises for each GPU of a node.
GPU_RESOURCE = "NVIDIA-GPU"
SHM_DIR = "/dev/shm"
# Swarm's rule for service names: a DNS name component.
_SERVICE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")
# `node.labels.gpu==true`, `node.hostname!=web1`: a key, == or !=, a value.
_CONSTRAINT = re.compile(r"\s*[A-Za-z][\w.-]*\s*(==|!=)\s*\S.*")
# Task states before its container runs, and after it ends (Swarm's names).
PENDING_TASK_STATES = ("new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting")
ENDED_TASK_STATES = ("complete", "failed", "shutdown", "rejected", "orphaned", "remove")


def check_constraint(text: str) -> str:
    """A placement constraint as `docker service create --constraint` takes it."""
    if not _CONSTRAINT.fullmatch(text):
        raise UserError(f"--constraint {text!r}: write KEY==VALUE or KEY!=VALUE, e.g. node.labels.gpu==true")
    return text.strip()


def check_service_name(name: str) -> str:
    if not _SERVICE_NAME.fullmatch(name):
        raise UserError(f"{name!r} cannot name a Swarm service (a DNS name: letters, digits, '-' and '_', "
                        "at most 63 characters): pick a run name without '.', or a shorter one")
    return name


@dataclass(frozen=True)
class ServiceSpec:
    """One worker as a replicated service of one task, placed by `constraints`."""

    worker: WorkerSpec
    constraints: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.worker.name

    def restart_policy(self) -> docker.types.RestartPolicy:
        if self.worker.max_restarts == 0:
            return docker.types.RestartPolicy(condition="none")
        return docker.types.RestartPolicy(condition="on-failure", max_attempts=self.worker.max_restarts)

    def resources(self) -> docker.types.Resources | None:
        """One `NVIDIA-GPU` reserved per GPU the worker uses, and `--memory` / `--cpus` as limits;
        None when there is nothing to ask for."""
        limits = self.worker.limits
        settings: dict[str, Any] = {}
        if self.worker.gpu_ids is not None:
            settings["generic_resources"] = {GPU_RESOURCE: len(self.worker.gpu_ids)}
        if limits.memory is not None:
            settings["mem_limit"] = memory_bytes(limits.memory)
        if limits.cpus is not None:
            settings["cpu_limit"] = round(limits.cpus * 1e9)
        return docker.types.Resources(**settings) if settings else None

    def mounts(self) -> list[docker.types.Mount]:
        shm = docker.types.Mount(SHM_DIR, None, type="tmpfs", tmpfs_size=memory_bytes(self.worker.limits.shm_size))
        return [mount.to_docker() for mount in self.worker.mounts] + [shm]

    def to_create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `client.services.create(**kwargs)`."""
        worker = self.worker
        kwargs: dict[str, Any] = {
            "image": worker.image,
            "name": check_service_name(worker.name),
            "args": list(worker.command),
            "env": dict(worker.environment),
            "mounts": self.mounts(),
            "labels": dict(worker.labels),
            "user": worker.user,
            "workdir": worker.working_dir,
            "init": True,  # reaps dataloader processes and passes the swarm's SIGTERM on
            # The node's name as the container's, so the journal's provenance (`host`) says where
            # each generation ran; a task's container would otherwise be named by its random id.
            "hostname": NODE_HOSTNAME,
            "restart_policy": self.restart_policy(),
            "constraints": list(self.constraints),
            "mode": docker.types.ServiceMode("replicated", replicas=1),
        }
        if worker.entrypoint is not None:
            kwargs["command"] = list(worker.entrypoint)  # a service's command replaces the entrypoint
        resources = self.resources()
        if resources is not None:
            kwargs["resources"] = resources
        return kwargs


def service_spec(worker: WorkerSpec, constraints: Sequence[str] = ()) -> ServiceSpec:
    """The service of a worker the Docker backend would run as a container.

    The swarm, not evolvectl, picks a GPU worker's node and GPU, so its number only names it:
    EVOLVECTL_GPU (the host's GPU index, for provenance) is left out rather than recorded wrong.
    """
    environment = {key: value for key, value in worker.environment.items() if key != "EVOLVECTL_GPU"}
    return ServiceSpec(replace(worker, environment=environment),
                       tuple(check_constraint(text) for text in constraints))


@dataclass(frozen=True)
class TaskSummary:
    """A service's worker, as the tasks the swarm ran for it tell."""

    state: str  # running, starting, restarting or exited: the states the other backends report
    restarts: int
    exit_code: int | None
    error: str | None  # the swarm's reason for a task that got no container (unschedulable, rejected)
    node_id: str | None = None  # the node the latest task was placed on; None before the swarm placed it


def time_key(stamp: str) -> tuple[str, str]:
    """A sort key for the engine's times: RFC 3339 in UTC with nanoseconds, trailing zeros trimmed."""
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    return seconds, fraction.ljust(9, "0")


def _created(task: Mapping[str, Any]) -> tuple[str, str]:
    return time_key(str(task.get("CreatedAt", "")))


def _exit_code(task: Mapping[str, Any]) -> int | None:
    container = task.get("Status", {}).get("ContainerStatus") or {}
    return int(container.get("ExitCode", 0)) if container.get("ContainerID") else None


def summarize_tasks(tasks: Sequence[Mapping[str, Any]], replicas: int = 1) -> TaskSummary:
    """Map a one-replica service's tasks (Swarm keeps its last few) onto a worker's state.

    A failed task's replacement is created at once (and waits out the restart delay), so a
    latest task that has ended means the swarm gave up, or the worker finished or was stopped.
    """
    if not tasks:
        return TaskSummary("starting" if replicas else "exited", 0, None, None)
    ordered = sorted(tasks, key=_created)
    latest, restarts = ordered[-1], len(ordered) - 1
    node_id = latest.get("NodeID") or None
    status = latest.get("Status", {})
    task_state = status.get("State", "")
    has_container = bool((status.get("ContainerStatus") or {}).get("ContainerID"))
    error = None if has_container else status.get("Err") or None
    if task_state == "running":
        return TaskSummary("running", restarts, None, None, node_id)
    if task_state in PENDING_TASK_STATES:
        ended = [task for task in ordered[:-1] if _exit_code(task) is not None]
        previous = _exit_code(ended[-1]) if ended else None
        return TaskSummary("restarting" if restarts else "starting", restarts, previous, error, node_id)
    return TaskSummary("exited", restarts, _exit_code(latest), error, node_id)


def advertised_gpus(nodes: Sequence[Mapping[str, Any]]) -> int:
    """The `NVIDIA-GPU` resources that ready, active nodes advertise (down or drained ones take no task)."""
    count = 0
    for node in nodes:
        if node.get("Status", {}).get("State") != "ready" or node.get("Spec", {}).get("Availability") != "active":
            continue
        for resource in node.get("Description", {}).get("Resources", {}).get("GenericResources") or []:
            named, discrete = resource.get("NamedResourceSpec", {}), resource.get("DiscreteResourceSpec", {})
            if named.get("Kind") == GPU_RESOURCE:
                count += 1  # one GPU by its UUID, as NVIDIA's set-up advertises them
            elif discrete.get("Kind") == GPU_RESOURCE:
                count += int(discrete.get("Value", 0))
    return count
