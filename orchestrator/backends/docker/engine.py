"""Running worker containers with the Docker SDK: connect, build, start, list, follow, kill.

Every engine error that a user can act on leaves this module as a one-line `UserError`
that carries the engine's own explanation. Only containers labelled
`org.evolvectl.project=evolvectl` are ever stopped or removed.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import docker.errors
import requests
from docker.models.containers import Container

import docker
from orchestrator.backends.docker.gpus import NO_GPU_DRIVER
from orchestrator.backends.docker.spec import PROJECT_LABEL, WorkerSpec, run_labels
from orchestrator.runs.names import PROJECT
from trainer.errors import UserError

DOCKERFILE = "docker/Dockerfile"
BUILD_TAIL_LINES = 25
# The classic builder's bookkeeping lines, left out of a failed build's tail.
BUILDER_CHATTER = (" ---> ", "Removing intermediate container")
# Containers in these states are left alone by start_worker: they are (or soon will be) working.
ALIVE_STATES = ("running", "restarting", "paused")

ProgressCallback = Callable[[str], None]


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else "no details"


@contextlib.contextmanager
def engine_errors(action: str) -> Iterator[None]:
    """Turn the SDK's exceptions into `UserError("<action>: <engine's explanation>")`."""
    try:
        yield
    except docker.errors.APIError as error:
        raise UserError(f"{action}: {_first_line(error.explanation or error)}") from error
    except docker.errors.DockerException as error:
        raise UserError(f"{action}: {_first_line(error)}") from error
    except requests.exceptions.RequestException as error:  # the engine went away mid-call
        raise UserError(f"{action}: lost the Docker engine ({_first_line(error)})") from error


def connect() -> docker.DockerClient:
    """A client for the engine named by DOCKER_HOST (or the local socket), checked with a ping."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        raise UserError(
            f"Docker engine unreachable: {_first_line(error)}; start it or use --backend local"
        ) from error
    return client


def engine_host(client: docker.DockerClient) -> str:
    """The host name of the machine the engine runs on, as `docker info` shows it."""
    with engine_errors("reading the engine's host name"):
        return str(client.info().get("Name") or "")


def ensure_image(
    client: docker.DockerClient,
    tag: str,
    context: Path,
    base_image: str | None = None,
    progress_callback: ProgressCallback | None = None,
    build_args: Mapping[str, str] | None = None,
) -> None:
    """Build `tag` from the project's Dockerfile unless the engine already has it."""
    with engine_errors(f"looking up image {tag}"):
        try:
            client.images.get(tag)
            return
        except docker.errors.ImageNotFound:
            pass
    build_image(client, tag, context, base_image, progress_callback, build_args)


def build_image(
    client: docker.DockerClient,
    tag: str,
    context: Path,
    base_image: str | None = None,
    progress_callback: ProgressCallback | None = None,
    build_args: Mapping[str, str] | None = None,
) -> None:
    """Build `tag` from `context`/docker/Dockerfile, streaming the builder's output.

    `base_image` replaces the Dockerfile's default PyTorch image. A failed build raises
    a UserError naming the failing step, followed by the last lines the builder printed.
    """
    if not (context / DOCKERFILE).is_file():
        raise UserError(f"no {DOCKERFILE} under build context '{context}': pass the project's root folder")
    arguments = dict(build_args or {})
    if base_image is not None:
        arguments["BASE_IMAGE"] = base_image
    step = "before the first step"
    recent: collections.deque[str] = collections.deque(maxlen=BUILD_TAIL_LINES)
    with engine_errors(f"building image {tag}"):
        events = client.api.build(
            path=str(context), dockerfile=DOCKERFILE, tag=tag, buildargs=arguments,
            rm=True, forcerm=True, decode=True,
        )
        for event in events:
            text = event.get("stream", "")
            if text and progress_callback is not None:
                progress_callback(text)
            for line in text.splitlines():
                if line.startswith("Step "):
                    step = line.strip()
                if line.strip() and not line.startswith(BUILDER_CHATTER):
                    recent.append(line.rstrip())
            if "error" in event:
                tail = "\n".join(recent)
                raise UserError(f"building image {tag} failed at {step}: {event['error'].strip()}\n{tail}")


def _existing(client: docker.DockerClient, name: str) -> Container | None:
    try:
        return client.containers.get(name)
    except docker.errors.NotFound:
        return None


def start_worker(client: docker.DockerClient, spec: WorkerSpec) -> Container:
    """Start the worker described by `spec`, idempotently.

    A live container of that name is returned untouched (a second `up` does not restart
    running workers); an exited or never-started one is replaced by a fresh container.
    """
    with engine_errors(f"starting {spec.name}"):
        existing = _existing(client, spec.name)
        if existing is not None:
            if existing.labels.get(PROJECT_LABEL) != PROJECT:
                raise UserError(
                    f"a container named {spec.name} exists that {PROJECT} did not start; remove or rename it"
                )
            if existing.status in ALIVE_STATES:
                return existing
            existing.remove(force=True)
        try:
            container = client.containers.create(**spec.to_run_kwargs())
        except docker.errors.ImageNotFound as error:
            raise UserError(
                f"image {spec.image} not found: build it first ({_first_line(error.explanation)})"
            ) from error
        _start(container, spec)
        container.reload()
        return container


def _start(container: Container, spec: WorkerSpec) -> None:
    """Start a created container; a failed start removes it, so no half-made worker remains."""
    try:
        container.start()
    except docker.errors.APIError as error:
        container.remove(force=True)
        explanation = _first_line(error.explanation or error)
        if spec.gpu_ids is not None and NO_GPU_DRIVER in explanation:
            gpus = ",".join(map(str, spec.gpu_ids))
            raise UserError(
                f"{spec.name} needs GPU {gpus} but the Docker engine has no NVIDIA runtime ({explanation}); "
                "install the NVIDIA Container Toolkit or run CPU workers with --cpu-workers N"
            ) from error
        raise


def list_workers(client: docker.DockerClient, run: str | None = None) -> list[Container]:
    """The project's containers (of one run, if given), running or not, sorted by name."""
    filters = {"label": [f"{key}={value}" for key, value in run_labels(run).items()]}
    with engine_errors("listing workers"):
        containers = client.containers.list(all=True, filters=filters)
    return sorted(containers, key=lambda container: container.name)


def kill_all(client: docker.DockerClient, run: str | None = None) -> list[str]:
    """Kill and remove the project's containers (of one run, if given); returns their names.

    The label filter already excludes other containers; the label is checked again before
    each removal so that nothing else can ever be touched.
    """
    removed = []
    for container in list_workers(client, run):
        if container.labels.get(PROJECT_LABEL) != PROJECT:
            continue
        with engine_errors(f"removing {container.name}"):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                continue  # it went away on its own meanwhile: that is what we wanted
        removed.append(container.name)
    return removed


def stream_logs(container: Container, write: Callable[[str], None], follow: bool = True,
                tail: int | None = None) -> None:
    """Copy the container's output (from its start, or its last `tail` lines) to `write` as it comes.

    With `follow` this returns when the container stops. Ctrl-C only stops the copying:
    the container keeps running.
    """
    with engine_errors(f"reading logs of {container.name}"):
        chunks = container.logs(stream=True, follow=follow, tail="all" if tail is None else tail)
    copy_chunks(chunks, write, container.name)


def copy_chunks(chunks: Iterable[bytes], write: Callable[[str], None], name: str) -> None:
    """Decode a log stream into `write` until it ends or Ctrl-C stops the copying (not the worker)."""
    # Chunks can split a multi-byte character; the incremental decoder joins the halves.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        with engine_errors(f"reading logs of {name}"):
            for chunk in chunks:
                write(decoder.decode(chunk))
    except KeyboardInterrupt:
        return
    rest = decoder.decode(b"", final=True)
    if rest:
        write(rest)


def log_tail(container: Container, lines: int = 20) -> str:
    """The last `lines` lines the container printed (stdout and stderr)."""
    with engine_errors(f"reading logs of {container.name}"):
        return container.logs(tail=lines).decode("utf-8", errors="replace")


def wait_worker(container: Container, timeout_s: float | None = None) -> int:
    """Block until the container exits; returns its exit code."""
    with engine_errors(f"waiting for {container.name}"):
        return int(container.wait(timeout=timeout_s)["StatusCode"])
