"""`evolvectl compose --stack`: a stack file for `docker stack deploy`, one Swarm service per worker.

Each service is `service.ServiceSpec.to_create_kwargs()` — what `start --backend swarm` hands the
engine — written in the compose-file keys that `docker stack deploy` honours (file format 3.8):
the same command, worker id, environment, mounts, service labels, restart policy, resources and
placement. The worker id is in the command (`--worker-id evolvectl-<run>-gpu3`), not taken from
the service's name, so a task the swarm restarts resumes under it whatever the stack is called.
Stack files have no `build`, `container_name`, `restart` or `shm_size`: the image must exist on
every node, and /dev/shm is a tmpfs mount, as for the Swarm backend's services.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.backends.docker.backend import size_text
from orchestrator.backends.docker.compose import project_name, service_key, service_name
from orchestrator.backends.docker.service import ServiceSpec, check_service_name
from orchestrator.runs.plan import WorkerSlot

# Read by `docker stack deploy` from Docker 19.03 on, with every key written here.
STACK_FILE_VERSION = "3.8"

HEADER = """\
# Written by `evolvectl compose --stack` for run {run}: one Swarm service per worker.
# Deploy it from a swarm manager. Every node needs image {image}, and the run folder and the
# dataset at the same paths (a shared mount). For an image built on each node rather than pulled
# from a registry, add --resolve-image never to the deploy command.
{commands}
# To resume a stopped run: `docker stack rm {stack}`, the same `evolvectl compose --stack` again, then deploy.
"""


def stack_name(run: str) -> str:
    """`evolvectl-<run>`: the stack the file's header deploys, named as compose names the project."""
    return project_name(run)


def check_stack_names(run: str, slots: Sequence[WorkerSlot]) -> None:
    """Refuse, before anything is written, a run the swarm cannot name the services of: the worker
    ids (which `start --backend swarm` uses as service names) and `<stack>_worker-gpu3`."""
    for slot in slots:
        check_service_name(slot.worker_id(run))
        check_service_name(f"{stack_name(run)}_{service_key(slot.key)}")


def stack_service(spec: ServiceSpec) -> dict[str, Any]:
    """One worker's service, from the settings the Swarm backend creates it with."""
    settings = spec.to_create_kwargs()
    service: dict[str, Any] = {"image": settings.pop("image")}
    if "command" in settings:
        service["entrypoint"] = settings.pop("command")  # a service's command replaces the entrypoint
    service.update({
        "command": settings.pop("args"),
        "environment": settings.pop("env"),
        "volumes": [_volume(mount) for mount in settings.pop("mounts")],
        "user": settings.pop("user"),
        "working_dir": settings.pop("workdir"),
        "hostname": settings.pop("hostname"),
        "init": settings.pop("init"),
    })
    mode = settings.pop("mode")
    deploy: dict[str, Any] = {
        "mode": mode.mode,
        "replicas": mode.replicas,
        "labels": settings.pop("labels"),  # on the service, not its task containers, as the Swarm backend does
        "restart_policy": _restart_policy(settings.pop("restart_policy")),
    }
    constraints = settings.pop("constraints")
    if constraints:
        deploy["placement"] = {"constraints": constraints}
    if "resources" in settings:
        deploy["resources"] = _resources(settings.pop("resources"))
    service["deploy"] = deploy
    settings.pop("name")  # the stack names its services `<stack>_<key>`
    if settings:  # a setting the Swarm backend gained that this file would silently drop
        raise NotImplementedError(f"stack files do not carry {', '.join(sorted(settings))} yet")
    return service


def _volume(mount: Mapping[str, Any]) -> dict[str, Any]:
    """A Docker SDK mount in the compose file's long volume syntax."""
    volume: dict[str, Any] = {"type": mount["Type"]}
    if mount.get("Source"):
        volume["source"] = mount["Source"]
    volume["target"] = mount["Target"]
    if "TmpfsOptions" in mount:
        volume["tmpfs"] = {"size": mount["TmpfsOptions"]["SizeBytes"]}
    else:
        volume["read_only"] = bool(mount.get("ReadOnly"))
    return volume


def _restart_policy(policy: Mapping[str, Any]) -> dict[str, Any]:
    written: dict[str, Any] = {"condition": policy["Condition"], "delay": _duration(policy["Delay"])}
    if policy["Condition"] != "none":
        written["max_attempts"] = policy["MaxAttempts"]
        written["window"] = _duration(policy["Window"])
    return written


def _duration(nanoseconds: int) -> str:
    """`0s`, `5s`, `1500ms`: a Go duration, as compose files write them."""
    if nanoseconds % 10**9 == 0:
        return f"{nanoseconds // 10**9}s"
    return f"{nanoseconds // 10**6}ms" if nanoseconds % 10**6 == 0 else f"{nanoseconds}ns"


def _resources(resources: Mapping[str, Any]) -> dict[str, Any]:
    """Limits as `--memory` / `--cpus` read; a GPU worker's reserved `NVIDIA-GPU` generic resources."""
    written: dict[str, Any] = {}
    limits = resources.get("Limits") or {}
    if limits:
        written["limits"] = {}
        if "NanoCPUs" in limits:
            written["limits"]["cpus"] = f"{limits['NanoCPUs'] / 1e9:g}"
        if "MemoryBytes" in limits:
            written["limits"]["memory"] = size_text(limits["MemoryBytes"])
    generic = (resources.get("Reservations") or {}).get("GenericResources") or []
    if generic:
        written["reservations"] = {"generic_resources": [
            {"discrete_resource_spec": {"kind": item["DiscreteResourceSpec"]["Kind"],
                                        "value": item["DiscreteResourceSpec"]["Value"]}}
            for item in generic
        ]}
    return written


def stack_document(specs: Sequence[ServiceSpec]) -> dict[str, Any]:
    """The whole file: one service per worker, keyed `worker-gpu3` / `worker-cpu0` as in compose files."""
    return {"version": STACK_FILE_VERSION,
            "services": {service_name(spec.worker): stack_service(spec) for spec in specs}}


def write_stack_file(path: Path, run: str, where: str, document: Mapping[str, Any]) -> None:
    """The file with its header: how to deploy, watch, stop and remove it (`where`: `--name <run>` and so on)."""
    stack = stack_name(run)
    commands = [
        (f"docker stack deploy -c {path.name} {stack}", "start"),
        (f"evolvectl status {where}", f"progress (`docker stack ps {stack}`: the tasks)"),
        (f"evolvectl stop {where}", "workers exit after their current generation"),
        (f"docker stack rm {stack}", "remove the services and their network (the run folder stays)"),
    ]
    width = max(len(command) for command, _ in commands)
    lines = "\n".join(f"#   {command:<{width}}   {what}" for command, what in commands)
    image = next(iter(document["services"].values()))["image"]
    header = HEADER.format(run=run, image=image, commands=lines, stack=stack)
    path.write_text(header + yaml.safe_dump(dict(document), sort_keys=False, width=120))
