"""`evolvectl compose`: a Docker Compose file with one service per worker, from the same specs as `start`.

Each GPU worker's service reserves exactly its own GPU through
`deploy.resources.reservations.devices`, the Compose form of `--gpus '"device=3"'`.
`docker compose -f <file> up -d` then starts the same containers `evolvectl start` would:
same names, labels, mounts and restart policy, so status, attach, stop and kill-all work on them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.backends.docker.engine import DOCKERFILE
from orchestrator.backends.docker.spec import WorkerSpec

HEADER = """\
# Written by `evolvectl compose` for run {run}: one service per worker.
#   docker compose -f {file} up -d      start (builds {image} if missing)
#   evolvectl status --name {run}       progress; `evolvectl attach gpu0` to watch a worker
#   docker compose -f {file} down       remove the containers (the run folder stays)
"""


def project_name(run: str) -> str:
    """Compose project names allow only lowercase letters, digits, '-' and '_'."""
    return "evolvectl-" + re.sub(r"[^a-z0-9_-]", "-", run.lower())


def service_key(worker_key: str) -> str:
    """`worker-gpu3` / `worker-cpu0`: a worker's service in compose and stack files."""
    return "worker-" + worker_key


def service_name(spec: WorkerSpec) -> str:
    """The service of a worker container (its name without the project and run prefix)."""
    return service_key(spec.name.rsplit("-", 1)[-1])


def compose_service(spec: WorkerSpec, build: dict[str, Any] | None) -> dict[str, Any]:
    """One worker container as a Compose service."""
    service: dict[str, Any] = {"image": spec.image}
    if build is not None:
        service["build"] = build
    service.update({
        "container_name": spec.name,
        "command": list(spec.command),
        "environment": dict(spec.environment),
        "volumes": [
            {"type": mount.kind, "source": mount.source, "target": mount.target, "read_only": mount.read_only}
            for mount in spec.mounts
        ],
        "labels": dict(spec.labels),
        "shm_size": spec.limits.shm_size,
        "restart": f"on-failure:{spec.max_restarts}",
        "init": True,
        "user": spec.user,
        "working_dir": spec.working_dir,
    })
    if spec.limits.memory is not None:
        service["mem_limit"] = spec.limits.memory
    if spec.limits.cpus is not None:
        service["cpus"] = spec.limits.cpus
    if spec.entrypoint is not None:
        service["entrypoint"] = list(spec.entrypoint)
    if spec.gpu_ids is not None:
        device = {"driver": "nvidia", "device_ids": [str(gpu) for gpu in spec.gpu_ids], "capabilities": ["gpu"]}
        service["deploy"] = {"resources": {"reservations": {"devices": [device]}}}
    return service


def compose_document(run: str, specs: Sequence[WorkerSpec], context: Path | None, base_image: str | None) -> dict:
    """The whole file: a project named after the run, one service per spec.

    With a build `context`, every service can build the image (Compose builds it once and
    reuses the cache); without one the image must exist already.
    """
    build: dict[str, Any] | None = None
    if context is not None:
        build = {"context": str(context), "dockerfile": DOCKERFILE}
        if base_image is not None:
            build["args"] = {"BASE_IMAGE": base_image}
    services = {service_name(spec): compose_service(spec, build) for spec in specs}
    return {"name": project_name(run), "services": services}


def write_compose_file(path: Path, run: str, document: dict) -> None:
    image = next(iter(document["services"].values()))["image"]
    header = HEADER.format(run=run, file=path.name, image=image)
    path.write_text(header + yaml.safe_dump(document, sort_keys=False, width=120))
