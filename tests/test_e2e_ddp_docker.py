"""End to end on a real Docker engine: `evolvectl ddp --cpu-procs 2` trains one tiny model in one container.

The image is the real docker/Dockerfile built on the local PyTorch base (conftest's
`worker_image`); the two processes meet through torchrun and talk over gloo on CPU.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import cli, wait_for, write_data_yaml

import docker
from orchestrator.backends.docker.engine import kill_all, list_workers
from orchestrator.cli.commands import main
from orchestrator.runs.status import read_results

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def run_name(docker_client: docker.DockerClient) -> Iterator[str]:
    run = f"e2e-ddp-{uuid.uuid4().hex[:8]}"
    yield run
    kill_all(docker_client, run)


def ddp_start(tmp_path: Path, image: str, run: str, *settings: str) -> tuple[tuple[str, ...], tuple[str, ...], Path]:
    """The `evolvectl ddp` command on 2 CPU processes and a tiny data set; its --project/--name; its run folder."""
    (tmp_path / "tiny").mkdir()
    data = write_data_yaml(tmp_path / "tiny", train=32, val=16, size=64)
    project = tmp_path / "runs"
    where = ("--project", str(project), "--name", run)
    start = ("ddp", "--backend", "docker", "--image", image, "--cpu-procs", "2", "--data", str(data),
             "--imgsz", "64", "--batch-size", "8", *settings, *where, "--", "--noautoanchor")
    return start, where, project / run


def test_a_ddp_training_in_one_cpu_container(
    docker_client: docker.DockerClient, worker_image: str, run_name: str, tmp_path: Path
) -> None:
    start, where, run_dir = ddp_start(tmp_path, worker_image, run_name, "--cfg", "yolov5n", "--epochs", "2",
                                      "--workers", "0")

    started = cli(*start)
    assert started.exit_code == 0 and "DDP training started (2 processes)" in started.output, started.output
    container = docker_client.containers.get(f"evolvectl-{run_name}-ddp")
    attributes = container.attrs
    assert container.labels["org.evolvectl.role"] == "ddp"
    assert attributes["HostConfig"]["DeviceRequests"] in (None, [])
    assert attributes["HostConfig"]["RestartPolicy"]["Name"] == "on-failure"
    assert attributes["Config"]["Entrypoint"][:2] == ["sh", "-c"]
    mounts = {mount["Destination"]: mount for mount in attributes["Mounts"]}
    assert mounts[f"/runs/train/{run_name}"]["RW"] is True and mounts["/datasets/data"]["RW"] is False

    # Both ranks run, as children of torchrun, where `evolvectl stop` would find them.
    wait_for(lambda: "Epoch" in container.logs().decode(), 90, "training to start")
    found = container.exec_run(["python", "-m", "trainer.ranks", "--signal", "0"])
    assert found.exit_code == 0 and len(found.output.split()) == 2, found.output

    wait_for(lambda: docker_client.containers.get(container.id).status == "exited", 120, "the training to end")
    container.reload()
    assert container.attrs["State"]["ExitCode"] == 0 and container.attrs["RestartCount"] == 0
    logs = container.logs().decode()
    assert "batch 8 (4 per process × 2)" in logs and "Training yolov5n for 2 epochs" in logs
    assert logs.count("Results saved to") == 1, logs[-3000:]  # rank 0 alone writes and reports
    assert [int(row["epoch"]) for row in read_results(run_dir)] == [0, 1]
    for weights in ("last.pt", "best.pt"):
        assert os.stat(run_dir / "weights" / weights).st_uid == os.getuid()  # on the host, owned by its user

    status = cli("status", *where)
    assert ("2/2 epochs (100%)" in status.output and "training finished" in status.output
            and "exited (0)" in status.output)
    assert "Results saved to" in cli("logs", "ddp", *where).output
    again = CliRunner().invoke(main, list(start))
    assert again.exit_code != 0 and f"run {run_name} already trained its 2 epochs" in again.output

    removed = cli("kill-all", "--run", run_name, "--backend", "docker")
    assert removed.exit_code == 0 and f"removed 1 worker(s): evolvectl-{run_name}-ddp" in removed.output
    assert list_workers(docker_client, run_name) == []


def test_stop_lets_the_container_finish_its_epoch_and_ddp_resumes_it(
    docker_client: docker.DockerClient, worker_image: str, run_name: str, tmp_path: Path
) -> None:
    start, where, run_dir = ddp_start(tmp_path, worker_image, run_name, "--epochs", "40", "--workers", "1")
    assert cli(*start).exit_code == 0
    container = docker_client.containers.get(f"evolvectl-{run_name}-ddp")
    wait_for(lambda: len(read_results(run_dir)) >= 1, 120, "the first epoch")

    stopping = cli("stop", *where)
    assert "the training finishes its current epoch" in stopping.output, stopping.output
    wait_for(lambda: docker_client.containers.get(container.id).status == "exited", 90, "the container to stop")
    container.reload()
    logs = container.logs().decode()
    assert container.attrs["State"]["ExitCode"] == 0, logs[-3000:]
    assert "Stopped after epoch" in logs and "SIGTERM" not in logs  # the ranks were told, not torchrun
    done = len(read_results(run_dir))
    assert 1 <= done < 40 and (run_dir / "weights" / "last.pt").is_file()

    resumed = cli(*start)
    assert f"resuming after epoch {done}" in resumed.output, resumed.output
    container = docker_client.containers.get(f"evolvectl-{run_name}-ddp")
    wait_for(lambda: f"Resuming from epoch {done + 1} of 40" in container.logs().decode(), 90, "the resumed training")
    assert "killed ddp" in cli("stop", "--now", *where).output
    container.reload()
    assert container.status == "exited"
