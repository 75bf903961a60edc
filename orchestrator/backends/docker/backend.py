"""The Docker backend: one detached container per worker, through `container_spec` and `containers`.

Every worker of a run bind-mounts the run folder from the host at `/runs/evolve/<run>` and
runs as the host user, so the host reads the journal directly and owns every file in it.
A DDP training is one container (role `ddp`) with its run folder at `/runs/train/<run>`.
An evolution and a training may share a run name (in different projects): each run sees
only the containers of its own kind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker.errors
from docker.models.containers import Container

import docker
import orchestrator
from orchestrator.backends.base import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_RESTARTS,
    ContainerLimits,
)
from orchestrator.backends.docker.engine import (
    ALIVE_STATES,
    DOCKERFILE,
    build_image,
    engine_errors,
    engine_host,
    kill_all,
    list_workers,
    log_tail,
    start_worker,
    stream_logs,
)
from orchestrator.backends.docker.gpus import visible_gpus
from orchestrator.backends.docker.spec import (
    DDP_ROLE,
    GPU_LABEL,
    ROLE_LABEL,
    WORKER_USER,
    Mount,
    WorkerSpec,
    dataset_mount,
    ddp_spec,
    labelled_key,
    worker_spec,
)
from orchestrator.runs.ddp import DdpPlan
from orchestrator.runs.inputs import (
    StagedInputs,
    container_run_dir,
    stage_for_containers,
)
from orchestrator.runs.names import DDP_KEY
from orchestrator.runs.plan import LaunchPlan, WorkerSlot
from orchestrator.runs.record import is_ddp_run
from orchestrator.runs.status import WorkerState
from trainer.cpus import WORKERS_ON_HOST
from trainer.errors import UserError

PROJECT_ROOT = Path(orchestrator.__file__).resolve().parent.parent
STATUS_LOG_LINES = 40
# Run inside a DDP container by `stop`: SIGTERM to the ranks themselves (see trainer.ranks).
SIGNAL_RANKS = ("python", "-m", "trainer.ranks", "--signal", "TERM")

Write = Callable[[str], None]


def host_user() -> str:
    """`uid:gid` of whoever runs evolvectl, so the files workers write in the run folder are theirs."""
    return f"{os.getuid()}:{os.getgid()}"


def worker_specs(
    plan: LaunchPlan,
    staged: StagedInputs,
    image: str,
    user: str,
    limits: ContainerLimits = DEFAULT_LIMITS,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
) -> list[WorkerSpec]:
    """The containers of a run: its folder bind-mounted read-write, its dataset read-only."""
    arguments = staged.options.arguments(plan.generations)
    run_folder = Mount(str(plan.run_dir), container_run_dir(plan.run), "bind", read_only=False)
    mounts = (run_folder, dataset_mount(staged.dataset_dir)) if staged.dataset_dir else (run_folder,)
    cpu_workers = sum(slot.gpu is None for slot in plan.slots)
    specs = []
    for slot in plan.slots:
        spec = worker_spec(plan.run, slot.gpu, slot.slot, image, plan.run_dir, staged.dataset_dir, arguments,
                           environment=_environment(slot, user, cpu_workers, len(plan.slots)), limits=limits,
                           max_restarts=max_restarts)
        # Only the run's own folder is mounted (at the /runs/evolve/<run> the trainer writes to), not a
        # whole runs volume, so one run's workers cannot touch another's files.
        specs.append(replace(spec, mounts=mounts, user=user))
    return specs


def _environment(slot: WorkerSlot, user: str, cpu_workers: int, workers_on_host: int) -> dict[str, str]:
    environment = {WORKERS_ON_HOST: str(workers_on_host)}  # loader processes share the host's CPUs
    if slot.gpu is not None:
        environment["EVOLVECTL_GPU"] = str(slot.gpu)  # the host's index, for provenance (inside it is GPU 0)
    else:
        environment["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_workers))
    if user != WORKER_USER:
        environment["HOME"] = "/tmp"  # the image's HOME belongs to uid 1000
    return environment


def container_limits(host_config: dict[str, Any]) -> str:
    """`memory 20g, 4 CPUs` from a container's HostConfig; "" when neither is limited."""
    memory, nano_cpus = host_config.get("Memory") or 0, host_config.get("NanoCpus") or 0
    return ContainerLimits(memory=size_text(memory) if memory else None,
                           cpus=nano_cpus / 1e9 if nano_cpus else None).describe()


def size_text(size: int) -> str:
    """Bytes as `docker run --memory` takes them: 21474836480 → 20g, 1536m, 123456b."""
    for unit, scale in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}b"


def worker_key(container: Container) -> str:
    return labelled_key(container.labels, container.name)


class DockerBackend:
    name = "docker"

    def __init__(
        self,
        client: docker.DockerClient,
        image: str,
        base_image: str | None = None,
        build: bool = False,
        limits: ContainerLimits = DEFAULT_LIMITS,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        context: Path = PROJECT_ROOT,
    ) -> None:
        self.client = client
        self.image = image
        self.base_image = base_image
        self.build = build
        self.limits = limits
        self.max_restarts = max_restarts
        self.context = context

    def prepare(self, say: Write) -> None:
        """Build the worker image if the engine lacks it (or always, with `build`)."""
        if not self.build and self._has_image():
            return
        if not (self.context / DOCKERFILE).is_file():
            raise UserError(f"image {self.image} not found and no {DOCKERFILE} under {self.context} to build it "
                            "from; build it yourself or pass --image")
        say(f"building image {self.image} from {DOCKERFILE} (the first build downloads and takes minutes)")
        build_image(self.client, self.image, self.context, self.base_image, say)

    def _has_image(self) -> bool:
        with engine_errors(f"looking up image {self.image}"):
            try:
                self.client.images.get(self.image)
            except docker.errors.ImageNotFound:
                return False
        return True

    def visible_gpus(self) -> list[int] | None:
        return visible_gpus(self.client, probe_image=self.image)

    def start(self, plan: LaunchPlan, say: Write) -> list[str]:
        """Start the run's missing workers; live ones are left alone. Returns the keys started."""
        staged = stage_for_containers(plan.options, plan.run, plan.run_dir)
        host = engine_host(self.client) or None
        specs = [replace(spec, hostname=host)
                 for spec in worker_specs(plan, staged, self.image, host_user(), self.limits, self.max_restarts)]
        alive = {container.name for container in list_workers(self.client, plan.run)
                 if container.status in ALIVE_STATES}
        made: list[Container] = []
        try:
            for slot, spec in zip(plan.slots, specs, strict=True):
                container = start_worker(self.client, spec)
                if spec.name not in alive:
                    made.append(container)
                    say(f"started {slot.key}: container {spec.name}")
        except BaseException:
            for container in made:  # nothing half-started: the containers this call made go again
                with engine_errors(f"removing {container.name}"):
                    container.remove(force=True)
            raise
        return [worker_key(container) for container in made]

    def start_ddp(self, plan: DdpPlan, say: Write) -> list[str]:
        """Start the training's container unless it runs; returns ["ddp"] when it was started."""
        staged = stage_for_containers(plan.options, plan.run, plan.run_dir)
        spec = replace(ddp_spec(plan, staged, self.image, host_user(), self.limits, self.max_restarts),
                       hostname=engine_host(self.client) or None)
        alive = {container.name for container in list_workers(self.client, plan.run)
                 if container.status in ALIVE_STATES}
        start_worker(self.client, spec)
        if spec.name in alive:
            return []
        say(f"started {DDP_KEY}: container {spec.name}" + (f" on GPUs {spec.labels[GPU_LABEL]}" if plan.gpus else ""))
        return [DDP_KEY]

    def _run_containers(self, run: str, run_dir: Path) -> list[Container]:
        """The run's containers of its own kind: a training's, or an evolution's workers."""
        training = is_ddp_run(run_dir)
        return [container for container in list_workers(self.client, run)
                if (container.labels.get(ROLE_LABEL) == DDP_ROLE) == training]

    def workers(self, run: str, run_dir: Path) -> list[WorkerState]:
        states = []
        for container in self._run_containers(run, run_dir):
            attributes = container.attrs
            running = container.status == "running"
            exit_code = None if running else attributes.get("State", {}).get("ExitCode")
            states.append(WorkerState(
                key=worker_key(container),
                worker_id=container.name,
                state=container.status,
                restarts=int(attributes.get("RestartCount", 0)),
                exit_code=exit_code,
                log_tail=log_tail(container, STATUS_LOG_LINES) if running or exit_code not in (0, None) else "",
                limits=container_limits(attributes.get("HostConfig", {})),
            ))
        return sorted(states, key=lambda state: state.key)

    def kill(self, run: str, run_dir: Path) -> list[str]:
        """Kill the run's live containers (stop --now). Docker counts this as a manual stop: no restart."""
        killed = []
        for container in self._run_containers(run, run_dir):
            if container.status in ALIVE_STATES:
                with engine_errors(f"killing {container.name}"):
                    container.stop(timeout=0)
                killed.append(worker_key(container))
        return killed

    def terminate(self, run: str, run_dir: Path) -> list[str]:
        """Ask the run's live containers to finish their epoch, save and exit; returns their keys.

        Their restart policy is dropped first, so that an exit with an error on the way out
        does not start the training again. SIGTERM goes to the ranks themselves when the image
        can find them, else to the container's init, which passes it on.
        """
        asked = []
        for container in self._run_containers(run, run_dir):
            if container.status not in ALIVE_STATES:
                continue
            with engine_errors(f"stopping {container.name}"):
                container.update(restart_policy={"Name": "no", "MaximumRetryCount": 0})
                if container.status != "running":
                    container.stop(timeout=0)  # between attempts (or paused): no epoch in progress to finish
                elif container.exec_run(list(SIGNAL_RANKS)).exit_code != 0:
                    container.kill(signal="SIGTERM")
            asked.append(worker_key(container))
        return asked

    def remove_all(self, run: str | None) -> list[str]:
        return kill_all(self.client, run)

    def output(self, run: str, run_dir: Path, key: str, write: Write, follow: bool, tail: int | None) -> None:
        """The worker's output (its last `tail` lines), then live until it stops or Ctrl-C."""
        stream_logs(self._container(run, run_dir, key), write, follow=follow, tail=tail)  # Ctrl-C detaches

    def _container(self, run: str, run_dir: Path, key: str) -> Container:
        containers = self._run_containers(run, run_dir)
        for container in containers:
            if worker_key(container) == key:
                return container
        known = ", ".join(sorted(worker_key(container) for container in containers)) or "none"
        raise UserError(f"run {run} has no worker {key}; its workers: {known}")

