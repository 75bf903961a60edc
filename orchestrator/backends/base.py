"""Where workers run: Docker containers or local processes, behind one interface.

`auto` takes Docker when an engine answers and falls back to local processes with a notice;
it never picks `swarm` (services across a swarm's servers), which is named explicitly.
Commands on an existing run take the backend recorded in its `launch.json`, so `status`
never looks for containers of a run that was started as local processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from orchestrator.runs.plan import LaunchPlan
from orchestrator.runs.record import LaunchRecord
from orchestrator.runs.status import WorkerState
from trainer.errors import UserError

if TYPE_CHECKING:
    from orchestrator.runs.ddp import DdpPlan

Write = Callable[[str], None]
DEFAULT_IMAGE = "evolvectl:latest"
# Dataloader workers share batches through /dev/shm; Docker's 64 MB default kills them.
DEFAULT_SHM_SIZE = "8g"
# A crashed worker comes back on its own a few times; its lost generation is retried by the
# journal's leases, so a restart resumes the evolution instead of starting over.
DEFAULT_MAX_RESTARTS = 3
CHOICES = ("auto", "docker", "local", "swarm")


class Backend(Protocol):
    name: str

    def prepare(self, say: Write) -> None:
        """Make workers startable (build the image); called once before `start`."""

    def visible_gpus(self) -> list[int] | None:
        """GPU indices workers can get; [] for none, None when it cannot be known."""

    def start(self, plan: LaunchPlan, say: Write) -> list[str]:
        """Start the run's missing workers, leave live ones alone; returns the keys started."""

    def workers(self, run: str, run_dir: Path) -> list[WorkerState]:
        """Every worker of the run, live or not, sorted by key."""

    def kill(self, run: str, run_dir: Path) -> list[str]:
        """Kill the run's live workers now; returns their keys."""

    def remove_all(self, run: str | None) -> list[str]:
        """Kill and forget every worker of `run`, or of every run; returns their names."""

    def output(self, run: str, run_dir: Path, key: str, write: Write, follow: bool, tail: int | None) -> None:
        """Write a worker's output, then (with `follow`) its live output until it stops or Ctrl-C."""

    def start_ddp(self, plan: DdpPlan, say: Write) -> list[str]:
        """Start the run's DDP training unless it runs; returns ["ddp"] when it was started."""

    def terminate(self, run: str, run_dir: Path) -> list[str]:
        """Ask the run's live workers to finish their epoch or generation and exit; returns their keys."""


@dataclass(frozen=True)
class ContainerLimits:
    """What each worker container may use: `docker run --shm-size`, `--memory` and `--cpus`.
    A CPU quota also sizes the worker's default loader processes (trainer.cpus)."""

    shm_size: str = DEFAULT_SHM_SIZE
    memory: str | None = None  # None: no limit
    cpus: float | None = None  # None: no limit

    def describe(self) -> str:
        """`memory 20g, 4 CPUs`, or "" without limits (shared memory is always set: not named)."""
        return ", ".join(part for part in (f"memory {self.memory}" if self.memory else "",
                                           f"{self.cpus:g} CPUs" if self.cpus else "") if part)


DEFAULT_LIMITS = ContainerLimits()


@dataclass(frozen=True)
class WorkerSettings:
    """How workers are built and run; only `max_restarts` matters to local workers."""

    image: str = DEFAULT_IMAGE
    base_image: str | None = None  # the Dockerfile's default when None
    build: bool = False  # rebuild the image even if the engine has it
    limits: ContainerLimits = DEFAULT_LIMITS
    max_restarts: int = DEFAULT_MAX_RESTARTS
    constraints: tuple[str, ...] = ()  # Swarm placement constraints (swarm only)


def open_backend(choice: str, project: Path, settings: WorkerSettings, say: Write) -> Backend:
    """The backend named by `choice`; `auto` falls back to local processes when no engine answers."""
    from orchestrator.backends.local.backend import LocalBackend

    if choice not in CHOICES:
        raise UserError(f"--backend {choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "local":
        return LocalBackend(project, max_restarts=settings.max_restarts)
    from orchestrator.backends.docker.backend import DockerBackend
    from orchestrator.backends.docker.engine import connect

    try:
        client = connect()
    except UserError as error:
        if choice != "auto":
            raise
        say(f"{error.message.split(';')[0]}: running workers as local processes (--backend local)")
        return LocalBackend(project, max_restarts=settings.max_restarts)
    if choice == "swarm":
        from orchestrator.backends.docker.swarm import SwarmBackend, check_manager

        check_manager(client)
        return SwarmBackend(client, settings.image, settings.base_image, settings.build, settings.limits,
                            settings.max_restarts, settings.constraints, notice=say)
    return DockerBackend(client, settings.image, settings.base_image, settings.build, settings.limits,
                         settings.max_restarts)


def backend_for_run(choice: str, project: Path, run_dir: Path, settings: WorkerSettings, say: Write) -> Backend:
    """For commands on an existing run: its recorded backend unless one is named explicitly."""
    record = LaunchRecord.load(run_dir)
    if choice == "auto" and record is not None:
        choice = record.backend
        if record.image:
            settings = replace(settings, image=record.image)
    return open_backend(choice, project, settings, say)
