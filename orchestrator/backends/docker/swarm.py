"""The Swarm backend: one evolution over several servers, one replicated service (one task) per worker.

Run on a manager node. Each worker is the container the Docker backend would start, made a
service by `service.service_spec`: same name, labels, command, mounts and environment. The
service's name is the worker's id in the journal, and the swarm restarts a failed task under
it, so a restarted worker resumes under the same identity. The run folder and the dataset are
bind mounts of host paths, which must therefore be the same shared folder on every node.

Only services labelled as our evolution workers are ever listed, scaled or removed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import docker.errors
from docker.models.services import Service

import docker
from orchestrator.backends.base import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_RESTARTS,
    ContainerLimits,
)
from orchestrator.backends.docker.backend import DockerBackend, host_user, worker_specs
from orchestrator.backends.docker.engine import (
    ALIVE_STATES,
    copy_chunks,
    engine_errors,
    list_workers,
)
from orchestrator.backends.docker.service import (
    ServiceSpec,
    advertised_gpus,
    service_spec,
    summarize_tasks,
    time_key,
)
from orchestrator.backends.docker.spec import (
    EVOLVE_ROLE,
    PROJECT_LABEL,
    ROLE_LABEL,
    labelled_key,
    run_labels,
)
from orchestrator.runs.ddp import DdpPlan
from orchestrator.runs.inputs import stage_for_containers
from orchestrator.runs.names import PROJECT
from orchestrator.runs.plan import LaunchPlan
from orchestrator.runs.status import WorkerState
from trainer.errors import UserError

STATUS_LOG_LINES = 40
# How often a followed worker's tasks are checked: following ends when none is left to run.
FOLLOW_POLL_S = 1.0
# Set by `docker stack deploy` on the services of a stack.
STACK_LABEL = "com.docker.stack.namespace"
NOT_ON_SWARM = ("--backend swarm runs evolutions only: train with --backend docker or local, on each host "
                "with --nnodes for several")

Write = Callable[[str], None]


def swarm_role(client: docker.DockerClient) -> str:
    """`manager`, `worker` or `inactive` (or pending, error, locked): this engine's place in a swarm."""
    with engine_errors("asking the Docker engine about its swarm"):
        swarm = client.info().get("Swarm", {})
    if swarm.get("ControlAvailable"):
        return "manager"
    state = swarm.get("LocalNodeState", "inactive")
    return "worker" if state == "active" else state


def check_manager(client: docker.DockerClient) -> None:
    role = swarm_role(client)
    if role == "manager":
        return
    if role == "worker":
        raise UserError("--backend swarm: this Docker engine is a swarm worker, not a manager; "
                        "run evolvectl on a manager node (`docker node ls` there lists the nodes)")
    raise UserError(f"--backend swarm: this Docker engine is not a swarm manager (swarm: {role}); "
                    "run `docker swarm init` here first, then `docker swarm join` on the other servers")


def list_services(client: docker.DockerClient, run: str | None = None) -> list[Service]:
    """Our evolution workers' services (of one run, if given), sorted by name."""
    filters = {"label": [f"{key}={value}" for key, value in run_labels(run).items()]}
    with engine_errors("listing Swarm services"):
        services = client.services.list(filters=filters)
    return sorted((service for service in services if _is_ours(service)), key=lambda service: service.name)


def _is_ours(service: Service) -> bool:
    labels = _labels(service)
    return labels.get(PROJECT_LABEL) == PROJECT and labels.get(ROLE_LABEL) == EVOLVE_ROLE


def _labels(service: Service) -> dict[str, str]:
    return service.attrs.get("Spec", {}).get("Labels") or {}


def _worker_id(service: Service) -> str:
    """The id the service's tasks record in the journal: their `--worker-id`, which is the service's
    name when `start` made it and `evolvectl-<run>-gpu3` in a stack whose service is `<stack>_worker-gpu3`."""
    args = service.attrs.get("Spec", {}).get("TaskTemplate", {}).get("ContainerSpec", {}).get("Args") or []
    marker = args.index("--worker-id") if "--worker-id" in args[:-1] else None
    return args[marker + 1] if marker is not None else service.name


def _stack(service: Service) -> str | None:
    """The stack that `docker stack deploy` made the service in, if any."""
    return _labels(service).get(STACK_LABEL)


def _replicas(service: Service) -> int:
    return int(service.attrs.get("Spec", {}).get("Mode", {}).get("Replicated", {}).get("Replicas", 0))


def remove_services(client: docker.DockerClient, run: str | None = None) -> list[str]:
    """Remove our workers' services (of one run, if given); the swarm stops their tasks. Returns their names."""
    removed = []
    for service in list_services(client, run):
        with engine_errors(f"removing service {service.name}"):
            try:
                service.remove()
            except docker.errors.NotFound:
                continue  # removed meanwhile: that is what we wanted
        removed.append(service.name)
    return removed


def create_service(client: docker.DockerClient, spec: ServiceSpec) -> Service:
    with engine_errors(f"creating service {spec.name}"):
        return client.services.create(**spec.to_create_kwargs())


def swarm_gpus(client: docker.DockerClient) -> list[int]:
    """As many indices as the nodes that take tasks advertise `NVIDIA-GPU` resources: they only name
    workers, since the swarm picks each worker's node and GPU."""
    with engine_errors("listing Swarm nodes"):
        nodes = client.nodes.list()
    return list(range(advertised_gpus([node.attrs for node in nodes])))


def _is_live(service: Service) -> bool:
    """Whether the service has a task running or about to; one scaled to none (`stop --now`) is not."""
    if not _replicas(service):
        return False
    with engine_errors(f"listing the tasks of {service.name}"):
        return summarize_tasks(service.tasks()).state != "exited"


def _still_live(service: Service) -> bool:
    """`_is_live` on the service as it is now (scaled to none meanwhile, or removed)."""
    with engine_errors(f"looking up service {service.name}"):
        try:
            service.reload()
        except docker.errors.NotFound:
            return False  # removed (kill-all): its tasks go with it
    return _is_live(service)


def follow_service_logs(service: Service, write: Write, follow: bool, tail: int | None,
                        live: Callable[[], bool]) -> None:
    """Copy the service's output (all its tasks', in time order; or its last `tail` lines) to `write`.

    With `follow` this returns once `live()` says no task is left to run: the engine's own
    follow never ends. Ctrl-C only stops the copying; the service keeps running.
    """
    if follow:
        chunks = _until_idle(_log_chunks(service, True, "all" if tail is None else tail), live)
    else:
        chunks = _in_time_order(_log_chunks(service, False, "all", timestamps=True), tail)
    copy_chunks(chunks, write, service.name)


def _in_time_order(chunks: Iterable[bytes], tail: int | None) -> Iterator[bytes]:
    """Timestamped lines of several tasks, sorted by time and stripped of the stamps; the last
    `tail` of them. The engine interleaves a service's tasks in no set order, and its own tail
    counts per task: a worker with a restarted task would print `tail` lines for each."""
    stamped = [line.partition(b" ") for line in b"".join(chunks).splitlines(keepends=True)]
    ordered = sorted(stamped, key=lambda parts: time_key(parts[0].decode(errors="replace")))
    kept = ordered if tail is None else ordered[max(len(ordered) - tail, 0):]
    yield b"".join(text for _, _, text in kept)


def _log_chunks(service: Service, follow: bool, tail: int | str, timestamps: bool = False) -> Iterator[bytes]:
    with engine_errors(f"reading logs of {service.name}"):
        return service.logs(stdout=True, stderr=True, follow=follow, tail=tail, timestamps=timestamps)


def _until_idle(chunks: Iterator[bytes], live: Callable[[], bool]) -> Iterator[bytes]:
    """The chunks of a followed stream, read by a daemon thread, until the worker has no live task
    and nothing more arrived for one poll."""
    received: queue.Queue[bytes | Exception | None] = queue.Queue()

    def read() -> None:
        try:
            for chunk in chunks:
                received.put(chunk)
        except Exception as error:  # noqa: BLE001 - whatever ends the stream is raised in the reading thread
            received.put(error)
        received.put(None)

    threading.Thread(target=read, name="service-logs", daemon=True).start()
    idle = False
    while True:
        try:
            item = received.get(timeout=FOLLOW_POLL_S)
        except queue.Empty:
            if idle:
                return
            idle = not live()  # one more poll after the last task ended: its last lines may be in flight
            continue
        if item is None:
            return
        if isinstance(item, Exception):
            raise item
        yield item


def _check_no_stack(run: str, services: Iterable[Service]) -> None:
    """A run deployed as a stack is the stack's: services made beside it would share its worker ids."""
    stacks = sorted({stack for service in services if (stack := _stack(service)) is not None})
    if stacks:
        raise UserError(f"run {run} runs as stack {stacks[0]} (from `evolvectl compose --stack`): to start it again, "
                        f"`docker stack rm {stacks[0]}`, write its stack file again and `docker stack deploy` it")


class SwarmBackend:
    name = "swarm"

    def __init__(
        self,
        client: docker.DockerClient,
        image: str,
        base_image: str | None = None,
        build: bool = False,
        limits: ContainerLimits = DEFAULT_LIMITS,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        constraints: tuple[str, ...] = (),
        notice: Write = lambda text: None,
    ) -> None:
        self.client = client
        self.notice = notice
        self.image = image
        self.limits = limits
        self.max_restarts = max_restarts
        self.constraints = constraints
        self.images = DockerBackend(client, image, base_image, build, limits, max_restarts)

    def prepare(self, say: Write) -> None:
        """Build the image on this node if it lacks it; every other node needs it too.

        `say` shows only the build's steps, so the note about the other nodes goes to `notice`."""
        self.images.prepare(say)
        with engine_errors("listing Swarm nodes"):
            nodes = len(self.client.nodes.list())
        if nodes > 1:
            self.notice(f"the swarm has {nodes} nodes: each needs image {self.image} (build it there, or push "
                        "it to a registry and pass --image REGISTRY/NAME:TAG)")

    def visible_gpus(self) -> list[int] | None:
        return swarm_gpus(self.client)

    def start(self, plan: LaunchPlan, say: Write) -> list[str]:
        """Create the run's missing services; live ones are left alone, ended ones made anew."""
        self._check_no_containers(plan.run)
        existing = {_worker_id(service): service for service in list_services(self.client, plan.run)}
        _check_no_stack(plan.run, existing.values())
        staged = stage_for_containers(plan.options, plan.run, plan.run_dir)
        workers = worker_specs(plan, staged, self.image, host_user(), self.limits, self.max_restarts)
        specs = [service_spec(worker, self.constraints) for worker in workers]
        made: list[Service] = []
        try:
            for slot, spec in zip(plan.slots, specs, strict=True):
                service = existing.get(spec.name)
                if service is not None and _is_live(service):
                    continue
                if service is not None:
                    with engine_errors(f"removing the ended service {spec.name}"):
                        service.remove()
                made.append(self._create(spec))
                say(f"started {slot.key}: service {spec.name}")
        except BaseException:
            for service in made:  # nothing half-started: the services this call made go again
                with engine_errors(f"removing service {service.name}"):
                    service.remove()
            raise
        return [labelled_key(_labels(service), service.name) for service in made]

    def _check_no_containers(self, run: str) -> None:
        """The same worker ids as plain containers and as services would share leases: refuse."""
        alive = [container.name for container in list_workers(self.client, run) if container.status in ALIVE_STATES]
        if alive:
            raise UserError(f"run {run} has live Docker containers ({', '.join(alive)}): stop them first "
                            f"(`evolvectl stop --now --backend docker --name {run}`)")

    def _create(self, spec: ServiceSpec) -> Service:
        with engine_errors(f"creating service {spec.name}"):
            try:
                self.client.services.get(spec.name)
            except docker.errors.NotFound:
                return create_service(self.client, spec)
        raise UserError(f"a service named {spec.name} exists that {PROJECT} did not start; remove or rename it")

    def start_ddp(self, plan: DdpPlan, say: Write) -> list[str]:
        raise UserError(NOT_ON_SWARM)

    def terminate(self, run: str, run_dir: Path) -> list[str]:
        raise UserError(NOT_ON_SWARM)

    def workers(self, run: str, run_dir: Path) -> list[WorkerState]:
        states = []
        hostnames = self._hostnames()
        for service in list_services(self.client, run):
            with engine_errors(f"listing the tasks of {service.name}"):
                summary = summarize_tasks(service.tasks(), _replicas(service))
            failed = summary.exit_code not in (0, None)
            states.append(WorkerState(
                key=labelled_key(_labels(service), service.name),
                worker_id=_worker_id(service),
                state=summary.state,
                restarts=summary.restarts,
                exit_code=summary.exit_code,
                log_tail=self._log_tail(service) if summary.state == "running" or failed else "",
                error=summary.error,
                node=hostnames.get(summary.node_id, summary.node_id) or "",
            ))
        return sorted(states, key=lambda state: state.key)

    def _hostnames(self) -> dict[str, str]:
        """Node id to hostname, the name `docker node ls` shows."""
        with engine_errors("listing Swarm nodes"):
            nodes = self.client.nodes.list()
        return {node.id: node.attrs.get("Description", {}).get("Hostname") or node.id for node in nodes}

    def _log_tail(self, service: Service) -> str:
        with engine_errors(f"reading logs of {service.name}"):
            return b"".join(service.logs(stdout=True, stderr=True, tail=STATUS_LOG_LINES)).decode(errors="replace")

    def kill(self, run: str, run_dir: Path) -> list[str]:
        """Scale the run's live services to no task: the swarm stops them (SIGTERM, then SIGKILL after
        its grace period) and restarts nothing. The services stay, so `status` still lists them."""
        killed = []
        for service in list_services(self.client, run):
            if _is_live(service):
                with engine_errors(f"stopping service {service.name}"):
                    service.scale(0)
                killed.append(labelled_key(_labels(service), service.name))
        return killed

    def remove_all(self, run: str | None) -> list[str]:
        return remove_services(self.client, run)

    def output(self, run: str, run_dir: Path, key: str, write: Write, follow: bool, tail: int | None) -> None:
        """The worker's output (its last `tail` lines), then live until its tasks end or Ctrl-C."""
        service = self._service(run, key)
        follow_service_logs(service, write, follow, tail, live=lambda: _still_live(service))

    def _service(self, run: str, key: str) -> Service:
        services = list_services(self.client, run)
        for service in services:
            if labelled_key(_labels(service), service.name) == key:
                return service
        known = ", ".join(sorted(labelled_key(_labels(service), service.name) for service in services)) or "none"
        raise UserError(f"run {run} has no worker {key}; its workers: {known}")
