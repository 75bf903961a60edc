"""Which GPUs to use: parsing `--gpus` and asking the engine what it can hand out."""

from __future__ import annotations

import docker
import docker.errors
import docker.types
import requests

from orchestrator.container_spec import PROJECT, PROJECT_LABEL, ROLE_LABEL
from trainer.errors import UserError

NVIDIA_RUNTIME = "nvidia"
# What Docker answers when no installed driver (NVIDIA Container Toolkit) serves `--gpus`.
NO_GPU_DRIVER = "could not select device driver"


def parse_gpu_spec(spec: str, available: list[int] | None) -> list[int]:
    """GPU indices from `all`, `3`, `0-7`, `0,2,5` or a mix such as `0-2,5`, in ascending order.

    `available` is what the engine can see; None means unknown, so any index is accepted
    and only `all` is refused.
    """
    text = spec.strip()
    if text.lower() == "all":
        if available is None:
            raise UserError("--gpus all: the engine's GPUs are unknown; list them instead, e.g. --gpus 0-3")
        if not available:
            raise UserError("--gpus all: the engine sees no GPUs; run CPU workers with --cpu-workers N")
        return sorted(available)
    chosen: list[int] = []
    for part in text.split(","):
        for gpu in _parse_part(part.strip(), spec):
            if gpu in chosen:
                raise UserError(f"--gpus '{spec}': GPU {gpu} is listed twice")
            chosen.append(gpu)
    if available is not None:
        missing = [gpu for gpu in chosen if gpu not in available]
        if missing:
            seen = ", ".join(map(str, sorted(available))) or "none"
            raise UserError(f"--gpus '{spec}': no GPU {', '.join(map(str, missing))}; the engine sees: {seen}")
    return sorted(chosen)


def _parse_part(part: str, spec: str) -> range:
    """One comma-separated piece: `5` or `0-7`."""
    first, dash, last = part.partition("-")
    bounds = [first, last] if dash else [first]
    if not all(bound.strip().isdigit() for bound in bounds):
        raise UserError(f"--gpus '{spec}': '{part}' is not a GPU index or range; use e.g. 0-3, 0,2,5 or all")
    low, high = int(first), int(last if dash else first)
    if high < low:
        raise UserError(f"--gpus '{spec}': range '{part}' runs backwards; write {high}-{low}")
    return range(low, high + 1)


def visible_gpus(client: docker.DockerClient, probe_image: str | None = None) -> list[int] | None:
    """GPU indices the engine can hand to containers; None when that cannot be known.

    Without `probe_image` this only reads the engine's configuration: an engine set up with
    the NVIDIA Container Toolkit lists an `nvidia` runtime, and then the count is unknown
    (None); without that runtime the answer is [] (engines whose toolkit hook is installed
    but not registered as a runtime are reported as [] too: pass a probe image to be sure).

    With `probe_image` (any image; the toolkit injects `nvidia-smi`) a throwaway container
    asks for every GPU and lists them: [] when the engine refuses GPU requests, None when
    the probe fails for another reason.
    """
    if probe_image is None:
        runtimes = client.info().get("Runtimes", {})
        return None if NVIDIA_RUNTIME in runtimes else []
    return _probe(client, probe_image)


def _probe(client: docker.DockerClient, image: str) -> list[int] | None:
    """Run `nvidia-smi` in a container that asks for every GPU; always removes the container."""
    every_gpu = docker.types.DeviceRequest(count=-1, capabilities=[["gpu", "utility"]])
    try:
        container = client.containers.create(
            image,
            entrypoint=["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            device_requests=[every_gpu],
            labels={PROJECT_LABEL: PROJECT, ROLE_LABEL: "gpu-probe"},
        )
    except docker.errors.ImageNotFound:
        return None
    try:
        container.start()
        exit_code = container.wait(timeout=60)["StatusCode"]
        output = container.logs(stdout=True, stderr=False).decode()
    except docker.errors.APIError as error:
        return [] if NO_GPU_DRIVER in str(error.explanation) else None
    except requests.exceptions.ReadTimeout:  # nvidia-smi hung: the driver is in a bad state
        return None
    finally:
        container.remove(force=True)
    if exit_code != 0:
        return None
    return sorted(int(line) for line in output.split() if line.isdigit())
