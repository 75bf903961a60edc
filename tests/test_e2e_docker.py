"""End to end on a real Docker engine: the CLI runs a tiny evolution in CPU containers, and so does compose.

The worker image is the real docker/Dockerfile built on the local PyTorch base (conftest's
`worker_image`). Every test uses run names of its own and removes only what it made.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker.errors
import pytest
from click.testing import CliRunner
from conftest import attach_until, cli, wait_for, write_data_yaml

import docker
from orchestrator.backends.docker.engine import kill_all, list_workers
from orchestrator.cli.commands import main
from orchestrator.evolution.journal import Journal

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
# Four epochs a generation, so the workers are still training while attach and the restart are tested.
TINY_TRAINING = ("--epochs", "4", "--imgsz", "64", "--batch-size", "8", "--workers", "0")


@pytest.fixture
def run_name(docker_client: docker.DockerClient) -> Iterator[str]:
    run = f"e2e-{uuid.uuid4().hex[:8]}"
    yield run
    kill_all(docker_client, run)


def container(client: docker.DockerClient, name: str) -> docker.models.containers.Container:
    found = client.containers.get(name)
    found.reload()
    return found


def kill_trainer(client: docker.DockerClient, name: str) -> None:
    """SIGKILL the trainer inside the container (a crash, not `docker kill`, which Docker would not restart)."""
    result = container(client, name).exec_run(["sh", "-c", "kill -9 $(cat /proc/1/task/1/children)"])
    assert result.exit_code == 0, result.output


def test_cli_evolution_in_cpu_containers(
    docker_client: docker.DockerClient, worker_image: str, base_image: str, run_name: str, tmp_path: Path
) -> None:
    data = write_data_yaml(tmp_path, train=32, val=16, size=64)
    project = tmp_path / "runs"
    run_dir = project / run_name
    where = ("--project", str(project), "--name", run_name)
    # Ten generations: enough work that cpu0 still trains when `attach` starts, on a busy machine too.
    start = ("start", "--backend", "docker", "--image", worker_image, "--cpu-workers", "2", "--generations", "10",
             "--data", str(data), *TINY_TRAINING, *where, "--", "--noautoanchor")

    result = cli(*start)
    assert result.exit_code == 0, result.output
    assert "started 2 docker worker(s)" in result.output
    names = [f"evolvectl-{run_name}-cpu0", f"evolvectl-{run_name}-cpu1"]
    first_ids = {name: container(docker_client, name).id for name in names}
    spec = container(docker_client, names[0]).attrs
    mounts = {mount["Destination"]: mount for mount in spec["Mounts"]}
    assert mounts["/datasets/data"]["RW"] is False and mounts[f"/runs/evolve/{run_name}"]["RW"] is True
    assert spec["HostConfig"]["RestartPolicy"]["Name"] == "on-failure"
    assert spec["HostConfig"]["DeviceRequests"] in (None, [])  # CPU workers ask for no device

    again = cli(*start)  # resuming a running run duplicates nothing
    assert again.exit_code == 0 and "started 0 docker worker(s), 2 already running" in again.output
    assert {name: container(docker_client, name).id for name in names} == first_ids

    output, errors, exit_code = attach_until(["cpu0", *where], "GPU_mem", timeout_s=120)
    assert exit_code == 0, errors
    assert "Generation" in output and "Epoch" in output
    assert "detached from cpu0; it keeps running" in errors
    assert container(docker_client, names[0]).status == "running"

    wait_for(lambda: "Generation" in container(docker_client, names[1]).logs().decode(), 120, "cpu1 to train")
    kill_trainer(docker_client, names[1])
    wait_for(lambda: container(docker_client, names[1]).attrs["RestartCount"] >= 1, 60, "cpu1 to restart")
    status = cli("status", *where)
    assert status.exit_code == 0 and "docker workers of" in status.output

    wait_for(lambda: all(container(docker_client, name).status == "exited" for name in names), 300, "the budget")
    lines = (run_dir / "evolve.csv").read_text().splitlines()
    assert len(lines) == 11 and sum(line.lstrip().startswith("metrics/precision") for line in lines) == 1
    assert [container(docker_client, name).attrs["State"]["ExitCode"] for name in names] == [0, 0]
    assert container(docker_client, names[1]).attrs["RestartCount"] == 1
    expired = [record for record in Journal(run_dir).read_records() if record["status"] == "expired"]
    assert [record["worker"] for record in expired] == [names[1]]  # its lost generation was trained again
    # Provenance names the machine that trained each generation, not a container id.
    assert ({record["host"] for record in Journal(run_dir).read_records() if "host" in record}
            == {docker_client.info()["Name"]})
    status = cli("status", *where)
    assert "10/10 generations (100%)" in status.output and "budget reached" in status.output
    results = cli("results", *where)
    assert "Top 5 of 10 generations" in results.output and str(run_dir / "hyp_evolve.yaml") in results.output
    assert os.stat(run_dir / "evolve.csv").st_uid == os.getuid()  # the host user owns what workers wrote

    foreign = docker_client.containers.run(base_image, ["sleep", "300"], detach=True,
                                           name=f"not-{run_name}", labels={"org.evolvectl.run": run_name})
    try:
        removed = cli("kill-all", "--run", run_name, "--backend", "docker")
        assert removed.exit_code == 0 and "removed 2 worker(s)" in removed.output
        assert list_workers(docker_client, run_name) == []
        assert container(docker_client, foreign.name).status == "running"
    finally:
        foreign.remove(force=True)


@pytest.mark.faults
def test_a_paused_container_past_its_lease_has_its_late_result_dropped(
    docker_client: docker.DockerClient, worker_image: str, run_name: str, tmp_path: Path
) -> None:
    """`docker pause` freezes a worker (and its heartbeat) mid-generation; another takes its slot;
    unpaused, it finishes training and its result is recorded as stale, not as a row."""
    data = write_data_yaml(tmp_path, train=32, val=16, size=64)
    project = tmp_path / "runs"
    run_dir = project / run_name
    names = [f"evolvectl-{run_name}-cpu0", f"evolvectl-{run_name}-cpu1"]
    result = cli("start", "--backend", "docker", "--image", worker_image, "--cpu-workers", "2", "--generations",
                 "4", "--data", str(data), *TINY_TRAINING, "--project", str(project), "--name", run_name,
                 "--memory", "2g", "--cpus", "1.5", "--", "--noautoanchor", "--lease-ttl", "3")
    assert result.exit_code == 0, result.output
    host = container(docker_client, names[0]).attrs["HostConfig"]  # the limits reach the engine and status
    assert (host["Memory"], host["NanoCpus"]) == (2 * 1024**3, 1_500_000_000)
    status = cli("status", "--project", str(project), "--name", run_name)
    assert "each limited to memory 2g, 1.5 CPUs" in " ".join(status.output.split()), status.output

    def leased_to(worker: str) -> bool:
        state = Journal(run_dir).read_state() or {}
        return any(lease["worker"] == worker for lease in state.get("leases", {}).values())

    wait_for(lambda: leased_to(names[1]), 180, "cpu1 to hold a lease")
    paused = container(docker_client, names[1])
    paused.pause()
    try:
        wait_for(lambda: any(record["status"] == "expired" for record in Journal(run_dir).read_records()), 180,
                 "cpu0 to take over the paused worker's slot", poll_s=0.2)
    finally:
        paused.unpause()
    wait_for(lambda: all(container(docker_client, name).status == "exited" for name in names), 300, "the budget")
    records = Journal(run_dir).read_records()
    [expired] = [record for record in records if record["status"] == "expired"]
    [stale] = [record for record in records if record["status"] == "stale"]
    assert expired["worker"] == stale["worker"] == names[1] and expired["claim"] == stale["claim"]
    ok = [record for record in records if record["status"] == "ok"]
    assert sorted(record["row"] for record in ok) == [0, 1, 2, 3] and len({record["claim"] for record in ok}) == 4
    assert len(Journal(run_dir).read_population()) == 4
    assert [container(docker_client, name).attrs["State"]["ExitCode"] for name in names] == [0, 0]


def test_a_failed_start_removes_the_workers_it_made(
    docker_client: docker.DockerClient, worker_image: str, base_image: str, run_name: str, tmp_path: Path
) -> None:
    data = write_data_yaml(tmp_path, train=32, val=16, size=64)
    squatter = docker_client.containers.create(base_image, ["sleep", "300"], name=f"evolvectl-{run_name}-cpu2")
    try:
        result = CliRunner().invoke(main, ["start", "--backend", "docker", "--image", worker_image, "--cpu-workers",
                                           "4", "--data", str(data), "--project", str(tmp_path / "runs"),
                                           "--name", run_name])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert result.output.strip().splitlines()[-1].startswith(
            f"Error: a container named evolvectl-{run_name}-cpu2 exists that evolvectl did not start")
        assert list_workers(docker_client, run_name) == []  # cpu0 and cpu1 were removed again
        squatter.reload()  # untouched
    finally:
        squatter.remove(force=True)


def test_docker_compose_up_reaches_its_budget(worker_image: str, tmp_path: Path) -> None:
    project = f"evolvectl-e2e-{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o755)  # compose workers run as uid 1000
    tmp_path.chmod(0o755)
    write_data_yaml(runs, train=32, val=16, size=64, root="/runs/datasets/tiny")
    environment = dict(
        os.environ, EVOLVECTL_RUNS=str(runs), EVOLVECTL_IMAGE=worker_image, EVOLVECTL_RUN="composed",
        EVOLVECTL_GENERATIONS="2", EVOLVECTL_CPU_WORKERS="2", EVOLVECTL_DATA="/runs/data.yaml", EVOLVECTL_EPOCHS="1",
        EVOLVECTL_IMGSZ="64", EVOLVECTL_BATCH_SIZE="8", EVOLVECTL_DATALOADER_WORKERS="0",
    )
    compose = ["docker", "compose", "-f", str(ROOT / "compose.yaml"), "-p", project]
    try:
        up = subprocess.run([*compose, "up", "--no-build"], env=environment, capture_output=True, text=True,
                            timeout=240)
        lines = (runs / "evolve" / "composed" / "evolve.csv").read_text().splitlines()
        assert len(lines) == 3, up.stdout[-3000:] + up.stderr[-3000:]
        assert up.returncode == 0
        assert "worker-1 exited with code 0" in up.stdout and "worker-2 exited with code 0" in up.stdout
    finally:
        subprocess.run([*compose, "down"], env=environment, capture_output=True, timeout=120)


def test_gpus_on_an_engine_without_nvidia_runtime(
    docker_client: docker.DockerClient, worker_image: str, run_name: str, tmp_path: Path
) -> None:
    if "nvidia" in docker_client.info().get("Runtimes", {}):
        pytest.skip("this engine has an NVIDIA runtime")
    result = CliRunner().invoke(main, ["start", "--backend", "docker", "--image", worker_image, "--gpus", "0",
                                       "--project", str(tmp_path / "runs"), "--name", run_name])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: --gpus 0: the Docker engine cannot hand out GPUs (no NVIDIA runtime: install the NVIDIA Container "
        "Toolkit); run CPU workers with --cpu-workers N")
    assert list_workers(docker_client, run_name) == []


def test_a_failed_image_build_names_its_step(docker_client: docker.DockerClient, base_image: str,
                                             tmp_path: Path) -> None:
    from orchestrator.backends.docker.backend import DockerBackend
    from trainer.errors import UserError

    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo about-to-fail && exit 4\n")
    messages: list[str] = []
    backend = DockerBackend(docker_client, f"evolvectl-broken:{uuid.uuid4().hex[:8]}", context=tmp_path)
    with pytest.raises(UserError, match=r"failed at Step 2/2 : RUN echo about-to-fail && exit 4"):
        backend.prepare(messages.append)
    assert messages[0].startswith("building image evolvectl-broken:")
