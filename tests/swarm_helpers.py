"""What the end-to-end tests on a real Docker Swarm share: a run's `start` arguments, its services'
tasks, the exact-budget check, and the lock that keeps two test sessions off one engine's swarm."""

from __future__ import annotations

import fcntl
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import docker_unavailable
from docker.models.services import Service

import docker
from orchestrator.evolution.journal import Journal

# As tests/test_e2e_docker.py: four epochs a generation, so a worker is still training when it is killed.
TINY_TRAINING = ("--epochs", "4", "--imgsz", "64", "--batch-size", "8", "--workers", "0")
GATEWAY_NETWORK = "docker_gwbridge"  # made by the engine for the first task of a swarm
# Held for as long as a test fixture keeps this engine in a swarm it made or checked.
SWARM_LOCK = Path(tempfile.gettempdir()) / "evolvectl-swarm-test.lock"


@contextmanager
def swarm_lock(timeout_s: float = 900.0) -> Iterator[None]:
    """This engine's swarm, for one test session at a time: another session that tests on the same
    engine waits here instead of reusing a swarm it did not make, or leaving it under this one."""
    with SWARM_LOCK.open("a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    docker_unavailable(f"another test session kept this engine's swarm for {timeout_s:.0f} s "
                                       f"(lock {SWARM_LOCK})")
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def service(client: docker.DockerClient, name: str) -> Service:
    return client.services.get(name)


def tasks(client: docker.DockerClient, name: str) -> list[dict[str, Any]]:
    return sorted(service(client, name).tasks(), key=lambda task: task["CreatedAt"])


def task_states(client: docker.DockerClient, name: str) -> list[str]:
    return [task["Status"]["State"] for task in tasks(client, name)]


def leased_to(run_dir: Path, worker: str) -> bool:
    state = Journal(run_dir).read_state() or {}
    return any(lease["worker"] == worker for lease in state.get("leases", {}).values())


def finished(client: docker.DockerClient, names: list[str]) -> bool:
    return all(task_states(client, name)[-1] in ("complete", "failed", "shutdown", "rejected") for name in names)


def start_arguments(image: str, data: Path, project: Path, run: str, workers: int, generations: int,
                    *extra: str, backend: tuple[str, ...] = ("--backend", "swarm")) -> list[str]:
    return ["start", *backend, "--image", image, "--cpu-workers", str(workers), "--generations",
            str(generations), "--data", str(data), *TINY_TRAINING, "--project", str(project), "--name", run,
            "--", "--noautoanchor", *extra]


def ok_records(run_dir: Path) -> list[dict[str, Any]]:
    """The journal's results, after checking that evolve.csv holds exactly their rows under one header."""
    lines = (run_dir / "evolve.csv").read_text().splitlines()
    ok = [record for record in Journal(run_dir).read_records() if record["status"] == "ok"]
    assert len(lines) == len(ok) + 1 and sum(line.lstrip().startswith("metrics/precision") for line in lines) == 1
    return ok


def assert_exact_budget(run_dir: Path, generations: int) -> list[dict[str, Any]]:
    """Rows 0..generations-1, each from its own claim: nothing lost, nothing trained twice. Returns them."""
    ok = ok_records(run_dir)
    assert sorted(record["row"] for record in ok) == list(range(generations))
    assert len({record["claim"] for record in ok}) == generations
    return ok


def status_rows(output: str, keys: list[str]) -> dict[str, list[str]]:
    """The cells of `status`'s worker table, by worker key."""
    return {cells[0]: cells[1:] for cells in map(str.split, output.splitlines()) if cells[:1] and cells[0] in keys}
