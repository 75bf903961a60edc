"""Which GPUs the Docker engine can hand out to containers."""

from __future__ import annotations

import docker.errors
import docker.types
import requests

import docker
from orchestrator.backends.docker.spec import PROJECT_LABEL, ROLE_LABEL
from orchestrator.runs.names import PROJECT

NVIDIA_RUNTIME = "nvidia"
# What Docker answers when no installed driver (NVIDIA Container Toolkit) serves `--gpus`.
NO_GPU_DRIVER = "could not select device driver"


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
