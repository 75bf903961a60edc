"""The container runner against a real Docker engine (CPU workers: no GPU runtime is needed)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker.errors
import pytest

import docker
from orchestrator.backends.docker.engine import (
    build_image,
    connect,
    kill_all,
    list_workers,
    log_tail,
    start_worker,
    stream_logs,
    wait_worker,
)
from orchestrator.backends.docker.gpus import visible_gpus
from orchestrator.backends.docker.spec import WorkerSpec, worker_spec
from trainer.errors import UserError

SLEEP = ("sleep", "300")


@pytest.fixture
def run_name(docker_client: docker.DockerClient) -> Iterator[str]:
    """A run name of its own per test; its containers and volume are removed afterwards."""
    run = f"test-{uuid.uuid4().hex[:8]}"
    yield run
    kill_all(docker_client, run)
    with contextlib.suppress(docker.errors.NotFound):
        docker_client.volumes.get(run).remove(force=True)


def sleeper(run: str, slot: int, image: str) -> WorkerSpec:
    """A CPU worker of `run` that only sleeps, so it stays running until killed."""
    spec = worker_spec(run, None, slot, image, run_volume=run, dataset_dir=None, trainer_args=[])
    return dataclasses.replace(spec, entrypoint=SLEEP, command=())


def test_connect_names_the_unreachable_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/missing.sock")
    with pytest.raises(UserError, match="Docker engine unreachable: .*use --backend local"):
        connect()


@pytest.mark.docker
@pytest.mark.slow
def test_worker_image_runs_the_trainer(docker_client: docker.DockerClient, worker_image: str, run_name: str) -> None:
    spec = worker_spec(run_name, None, 0, worker_image, run_volume=run_name, dataset_dir=None, trainer_args=[])
    container = start_worker(docker_client, dataclasses.replace(spec, command=("--help",)))
    assert wait_worker(container, timeout_s=120) == 0
    output: list[str] = []
    stream_logs(container, output.append)
    text = "".join(output)
    assert "Usage:" in text and "--evolve" in text and "--worker-id" in text
    assert "--evolve" in log_tail(container, lines=200)


@pytest.mark.docker
@pytest.mark.slow
def test_worker_image_layout(docker_client: docker.DockerClient, worker_image: str, run_name: str) -> None:
    """Non-root user, writable HOME and run volume, bundled configs found, torch importable."""
    probe = (
        "import os, pathlib, torch, trainer.paths as paths; "
        "pathlib.Path('/runs/evolve').mkdir(); pathlib.Path(os.environ['HOME'], 'x').touch(); "
        "print(os.getuid(), os.getcwd(), paths.CONFIGS, (paths.CONFIGS / 'hyps').is_dir())"
    )
    spec = worker_spec(run_name, None, 0, worker_image, run_volume=run_name, dataset_dir=None, trainer_args=[])
    container = start_worker(docker_client, dataclasses.replace(spec, entrypoint=("python", "-c", probe), command=()))
    exit_code = wait_worker(container, timeout_s=120)
    output = log_tail(container, lines=50)
    assert exit_code == 0, output
    assert output.split() == ["1000", "/workspace", "/opt/evolvectl/configs", "True"]


@pytest.mark.docker
def test_kill_all_removes_only_our_containers(docker_client: docker.DockerClient, base_image: str,
                                              run_name: str) -> None:
    ours = [start_worker(docker_client, sleeper(run_name, slot, base_image)) for slot in (0, 1)]
    foreign = docker_client.containers.run(base_image, list(SLEEP), detach=True, name=f"foreign-{run_name}")
    try:
        assert [container.name for container in list_workers(docker_client, run_name)] == [
            f"evolvectl-{run_name}-cpu0", f"evolvectl-{run_name}-cpu1",
        ]
        removed = kill_all(docker_client, run_name)
        assert sorted(removed) == sorted(container.name for container in ours)
        assert list_workers(docker_client, run_name) == []
        foreign.reload()
        assert foreign.status == "running"
    finally:
        foreign.remove(force=True)


@pytest.mark.docker
def test_start_worker_is_idempotent(docker_client: docker.DockerClient, base_image: str, run_name: str) -> None:
    spec = sleeper(run_name, 0, base_image)
    first = start_worker(docker_client, spec)
    assert first.status == "running"
    assert start_worker(docker_client, spec).id == first.id  # running: left alone
    first.stop(timeout=0)
    replacement = start_worker(docker_client, spec)
    assert replacement.id != first.id and replacement.status == "running"
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(first.id)  # the exited one was removed, not kept beside


@pytest.mark.docker
def test_ctrl_c_stops_following_logs_but_not_the_worker(
    docker_client: docker.DockerClient, base_image: str, run_name: str
) -> None:
    spec = dataclasses.replace(sleeper(run_name, 0, base_image), entrypoint=("sh", "-c", "echo hello; sleep 300"))
    container = start_worker(docker_client, spec)
    received: list[str] = []

    def write_then_interrupt(text: str) -> None:
        received.append(text)
        raise KeyboardInterrupt  # what Ctrl-C does while the logs are followed

    stream_logs(container, write_then_interrupt)
    assert received == ["hello\n"]
    container.reload()
    assert container.status == "running"


@pytest.mark.docker
def test_start_worker_refuses_a_foreign_container_of_that_name(
    docker_client: docker.DockerClient, base_image: str, run_name: str
) -> None:
    spec = sleeper(run_name, 0, base_image)
    foreign = docker_client.containers.create(base_image, list(SLEEP), name=spec.name)
    try:
        with pytest.raises(UserError, match="did not start"):
            start_worker(docker_client, spec)
        foreign.reload()  # still there, untouched
    finally:
        foreign.remove(force=True)


@pytest.mark.docker
def test_gpu_worker_without_nvidia_runtime_suggests_cpu_workers(
    docker_client: docker.DockerClient, base_image: str, run_name: str
) -> None:
    if "nvidia" in docker_client.info().get("Runtimes", {}):
        pytest.skip("this engine has an NVIDIA runtime")
    assert visible_gpus(docker_client) == []
    assert visible_gpus(docker_client, probe_image=base_image) == []
    spec = worker_spec(run_name, 0, 0, base_image, run_volume=run_name, dataset_dir=None, trainer_args=[])
    with pytest.raises(UserError, match=r"needs GPU 0 .*--cpu-workers N"):
        start_worker(docker_client, dataclasses.replace(spec, entrypoint=SLEEP, command=()))
    assert list_workers(docker_client, run_name) == []  # the failed container was not left behind
    probes = [c for c in list_workers(docker_client) if c.labels.get("org.evolvectl.role") == "gpu-probe"]
    assert probes == []  # nor the probe's


@pytest.mark.docker
def test_failed_build_shows_the_failing_step(docker_client: docker.DockerClient, base_image: str,
                                             tmp_path: Path) -> None:
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN echo about-to-fail && exit 3\n"  # no step succeeds: no layer is left
    )
    with pytest.raises(UserError) as raised:
        build_image(docker_client, f"evolvectl-broken:{os.getpid()}", tmp_path)
    message = raised.value.message
    assert "failed at Step 2/2 : RUN echo about-to-fail && exit 3" in message
    assert "returned a non-zero code: 3" in message
    assert message.splitlines()[-1] == "about-to-fail"
