"""End to end on a real single-node Docker Swarm: CPU workers as services of the real worker image.

A module fixture makes this engine a swarm manager (`docker swarm init`) when it is in no
swarm, and leaves the swarm afterwards only if it made it. Two nodes: test_e2e_swarm_two_node.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from conftest import attach_until, cli, docker_unavailable, wait_for, write_data_yaml
from swarm_helpers import (
    GATEWAY_NETWORK,
    TINY_TRAINING,
    assert_exact_budget,
    finished,
    leased_to,
    service,
    start_arguments,
    status_rows,
    swarm_lock,
    task_states,
    tasks,
)

import docker
from orchestrator.backends.docker.swarm import list_services, remove_services
from orchestrator.evolution.journal import Journal

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def swarm(docker_client: docker.DockerClient) -> Iterator[docker.DockerClient]:
    """This engine as a single-node swarm manager; a swarm made here is left again, with the network it made."""
    with swarm_lock():
        state = docker_client.info().get("Swarm", {})
        if state.get("LocalNodeState") == "active" and not state.get("ControlAvailable"):
            pytest.skip("this engine is a swarm worker; the tests need a manager")
        made = state.get("LocalNodeState") != "active"
        if not made and (nodes := len(docker_client.nodes.list())) > 1:
            # Tasks would land on the other nodes, which may lack the image or the test's folders.
            docker_unavailable(f"this engine is a manager of a swarm of {nodes} nodes; the single-node tests need "
                               "it alone (left from .ci/two-node/setup.sh? run .ci/two-node/teardown.sh)",
                               fix="the engine must start in no swarm")
        had_gateway = bool(docker_client.networks.list(names=[GATEWAY_NETWORK]))
        if made:
            docker_client.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
        try:
            yield docker_client
        finally:
            if made:
                docker_client.swarm.leave(force=True)
                if not had_gateway:
                    for network in docker_client.networks.list(names=[GATEWAY_NETWORK]):
                        network.remove()


@pytest.fixture
def run_name(swarm: docker.DockerClient) -> Iterator[str]:
    run = f"sw-{uuid.uuid4().hex[:8]}"
    yield run
    remove_services(swarm, run)


def test_two_cpu_services_reach_an_exact_budget(
    swarm: docker.DockerClient, worker_image: str, run_name: str, tmp_path: Path
) -> None:
    data = write_data_yaml(tmp_path, train=32, val=16, size=64)
    project = tmp_path / "runs"
    run_dir = project / run_name
    names = [f"evolvectl-{run_name}-cpu0", f"evolvectl-{run_name}-cpu1"]
    result = cli(*start_arguments(worker_image, data, project, run_name, 2, 4))
    assert result.exit_code == 0, result.output
    assert "started 2 swarm worker(s)" in result.output
    assert [item.name for item in list_services(swarm, run_name)] == names
    template = service(swarm, names[0]).attrs["Spec"]["TaskTemplate"]
    assert template["RestartPolicy"]["Condition"] == "on-failure" and not template.get("Resources")
    mounts = {mount["Target"]: mount for mount in template["ContainerSpec"]["Mounts"]}
    assert mounts[f"/runs/evolve/{run_name}"]["Source"] == str(run_dir)
    assert not mounts[f"/runs/evolve/{run_name}"].get("ReadOnly") and mounts["/datasets/data"]["ReadOnly"]

    wait_for(lambda: finished(swarm, names), 240, "the budget", poll_s=1.0)
    assert [task_states(swarm, name) for name in names] == [["complete"], ["complete"]]
    ok = assert_exact_budget(run_dir, 4)
    assert {record["worker"] for record in ok} <= set(names)  # the service names are the worker ids
    assert os.stat(run_dir / "evolve.csv").st_uid == os.getuid()  # the host user owns what workers wrote
    results = cli("results", "--project", str(project), "--name", run_name)
    assert "Top 4 of 4 generations" in results.output and str(run_dir / "hyp_evolve.yaml") in results.output


@pytest.mark.faults
def test_a_killed_task_is_replaced_and_the_budget_stays_exact(
    swarm: docker.DockerClient, worker_image: str, run_name: str, tmp_path: Path
) -> None:
    """A task's container killed mid-generation: the swarm starts a new task under the same worker id,
    the lost generation is trained again, and the budget stays exact."""
    data = write_data_yaml(tmp_path, train=32, val=16, size=64)
    project = tmp_path / "runs"
    run_dir = project / run_name
    names = [f"evolvectl-{run_name}-cpu0", f"evolvectl-{run_name}-cpu1"]
    result = cli(*start_arguments(worker_image, data, project, run_name, 2, 4, "--lease-ttl", "3"))
    assert result.exit_code == 0, result.output

    wait_for(lambda: leased_to(run_dir, names[1]), 180, "cpu1 to hold a lease")
    [running] = [task for task in tasks(swarm, names[1]) if task["Status"]["State"] == "running"]
    swarm.containers.get(running["Status"]["ContainerStatus"]["ContainerID"]).kill()
    wait_for(lambda: len(tasks(swarm, names[1])) == 2, 60, "the swarm to replace the killed task")
    status = cli("status", "--project", str(project), "--name", run_name)
    assert status.exit_code == 0 and "swarm workers of" in status.output
    wait_for(lambda: finished(swarm, names), 240, "the budget", poll_s=1.0)

    assert [task_states(swarm, name) for name in names] == [["complete"], ["failed", "complete"]]
    assert tasks(swarm, names[1])[0]["Status"]["ContainerStatus"]["ExitCode"] == 137
    assert_exact_budget(run_dir, 4)
    expired = [record for record in Journal(run_dir).read_records() if record["status"] == "expired"]
    assert [record["worker"] for record in expired] == [names[1]]  # its lost generation was trained again
    status = cli("status", "--project", str(project), "--name", run_name)
    assert "4/4 generations (100%)" in status.output and "budget reached" in status.output
    rows = {key: row[:3] for key, row in status_rows(status.output, ["cpu0", "cpu1"]).items()}
    assert rows == {"cpu0": ["exited", "(0)", "0"], "cpu1": ["exited", "(0)", "1"]}  # state, exit code, restarts


def test_status_logs_attach_stop_and_kill_all_on_the_swarm(
    swarm: docker.DockerClient, worker_image: str, base_image: str, run_name: str, tmp_path: Path
) -> None:
    data = write_data_yaml(tmp_path, train=32, val=16, size=64)
    project = tmp_path / "runs"
    where = ("--project", str(project), "--name", run_name)
    name = f"evolvectl-{run_name}-cpu0"
    result = cli(*start_arguments(worker_image, data, project, run_name, 1, 50))
    assert result.exit_code == 0, result.output
    again = cli(*start_arguments(worker_image, data, project, run_name, 1, 50))  # a live service is left alone
    assert "started 0 swarm worker(s), 1 already running" in again.output
    assert len(tasks(swarm, name)) == 1

    output, errors, exit_code = attach_until(["cpu0", *where], "Epoch", timeout_s=120)
    assert exit_code == 0, errors
    assert "Generation" in output and "detached from cpu0; it keeps running" in errors
    status = cli("status", *where)
    assert status.exit_code == 0 and "swarm workers of" in status.output and "running" in status.output

    stopped = cli("stop", *where)
    assert "workers exit after their current generation" in stopped.output
    # attach follows until the worker's last task ends, then returns by itself.
    followed = subprocess.run([sys.executable, "-m", "orchestrator", "attach", "cpu0", *where], check=False,
                              capture_output=True, text=True, timeout=180, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "cpu0 is exited (exit code 0)" in followed.stderr, followed.stderr
    assert task_states(swarm, name) == ["complete"]  # a stopped worker is not restarted
    logs = cli("logs", "cpu0", "--tail", "5", *where)
    assert logs.exit_code == 0 and logs.output.count("\n") <= 5 and logs.output.strip()
    status = cli("status", *where)
    assert "exited (0)" in status.output

    foreign = swarm.services.create(base_image, ["sleep", "300"], name=f"not-{run_name}",
                                    labels={"org.evolvectl.project": "evolvectl", "org.evolvectl.run": run_name})
    try:
        removed = cli("kill-all", "--run", run_name, "--backend", "swarm")
        assert removed.exit_code == 0 and f"removed 1 worker(s): {name}" in removed.output
        assert list_services(swarm, run_name) == []
        with pytest.raises(docker.errors.NotFound):
            service(swarm, name)
        assert service(swarm, foreign.name).name == foreign.name  # same run label, not our worker: untouched
    finally:
        foreign.remove()


def test_a_worker_no_node_takes_waits_with_the_reason_until_stopped_now(
    swarm: docker.DockerClient, worker_image: str, run_name: str, tmp_path: Path
) -> None:
    data = write_data_yaml(tmp_path, train=32, val=16, size=64)
    project = tmp_path / "runs"
    where = ("--project", str(project), "--name", run_name)
    name = f"evolvectl-{run_name}-cpu0"
    placed = ("--backend", "swarm", "--constraint", "node.labels.evolvectl-test==nowhere")
    result = cli(*start_arguments(worker_image, data, project, run_name, 1, 4, backend=placed))
    assert result.exit_code == 0, result.output
    assert service(swarm, name).attrs["Spec"]["TaskTemplate"]["Placement"]["Constraints"] == [
        "node.labels.evolvectl-test==nowhere"]
    wait_for(lambda: "cpu0 waits: no suitable node" in cli("status", *where).output, 30, "the scheduler's reason")

    killed = cli("stop", "--now", *where)
    assert killed.exit_code == 0 and "killed cpu0" in killed.output
    assert service(swarm, name).attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
    wait_for(lambda: " exited " in cli("status", *where).output, 30, "cpu0 to be reported exited")

    # `start` without --backend resumes a swarm run on the swarm (auto alone never picks it).
    resumed = cli(*start_arguments(worker_image, data, project, run_name, 1, 4, backend=()))
    assert "started 1 swarm worker(s)" in resumed.output, resumed.output
    template = service(swarm, name).attrs["Spec"]["TaskTemplate"]
    assert not template.get("Placement", {}).get("Constraints")


def docker_stack(*arguments: str) -> subprocess.CompletedProcess:
    """The docker command's `stack` subcommand, as a user types it."""
    return subprocess.run(["docker", "stack", *arguments], capture_output=True, text=True, check=False, timeout=180)


@pytest.fixture
def stack_command() -> None:
    if shutil.which("docker") is None or subprocess.run(["docker", "stack", "--help"], capture_output=True,
                                                        check=False).returncode != 0:
        pytest.skip("the docker command has no `stack` subcommand")


def stack_containers(client: docker.DockerClient, stack: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"com.docker.stack.namespace={stack}"})


def test_a_stack_file_deploys_the_swarm_backends_workers_and_reaches_an_exact_budget(
    swarm: docker.DockerClient, worker_image: str, run_name: str, tmp_path: Path, stack_command: None
) -> None:
    """`compose --stack` then `docker stack deploy`: the workers of `start --backend swarm`, under the
    same worker ids (a task killed mid-generation comes back as its worker), seen by status and kill-all."""
    data = write_data_yaml(tmp_path, train=32, val=16, size=64)
    project = tmp_path / "runs"
    run_dir = project / run_name
    where = ("--project", str(project), "--name", run_name)
    stack_file = tmp_path / "stack.yaml"
    written = cli("compose", "--stack", "--image", worker_image, "--cpu-workers", "2", "--generations", "4",
                  "--data", str(data), *TINY_TRAINING, *where, "--output", str(stack_file), "--",
                  "--noautoanchor", "--lease-ttl", "3")
    assert written.exit_code == 0, written.output
    stack = f"evolvectl-{run_name}"
    names = [f"{stack}_worker-cpu0", f"{stack}_worker-cpu1"]
    worker_ids = [f"evolvectl-{run_name}-cpu0", f"evolvectl-{run_name}-cpu1"]
    try:
        # The image is this engine's own build: never resolved on a registry.
        deployed = docker_stack("deploy", "--resolve-image", "never", "-c", str(stack_file), stack)
        assert deployed.returncode == 0, deployed.stderr
        assert [item.name for item in list_services(swarm, run_name)] == names  # ours, by their labels
        template = service(swarm, names[0]).attrs["Spec"]["TaskTemplate"]
        policy = template["RestartPolicy"]
        assert (policy["Condition"], policy["MaxAttempts"]) == ("on-failure", 3) and not template.get("Resources")
        assert template["ContainerSpec"]["Init"] is True
        mounts = {mount["Target"]: mount for mount in template["ContainerSpec"]["Mounts"]}
        assert mounts[f"/runs/evolve/{run_name}"]["Source"] == str(run_dir) and mounts["/datasets/data"]["ReadOnly"]
        refused = cli(*start_arguments(worker_image, data, project, run_name, 2, 4))
        assert refused.exit_code == 2 and f"runs as stack {stack}" in refused.output

        wait_for(lambda: leased_to(run_dir, worker_ids[1]), 180, "cpu1 to hold a lease")
        [running] = [task for task in tasks(swarm, names[1]) if task["Status"]["State"] == "running"]
        swarm.containers.get(running["Status"]["ContainerStatus"]["ContainerID"]).kill()
        wait_for(lambda: len(tasks(swarm, names[1])) == 2, 60, "the swarm to replace the killed task")
        wait_for(lambda: finished(swarm, names), 240, "the budget", poll_s=1.0)

        assert [task_states(swarm, name) for name in names] == [["complete"], ["failed", "complete"]]
        ok = assert_exact_budget(run_dir, 4)
        assert {record["worker"] for record in ok} <= set(worker_ids)
        expired = [record for record in Journal(run_dir).read_records() if record["status"] == "expired"]
        assert [record["worker"] for record in expired] == [worker_ids[1]]  # the restarted task was cpu1 again
        status = cli("status", *where)
        assert "swarm workers of" in status.output and "4/4 generations (100%)" in status.output
        rows = status_rows(status.output, ["cpu0", "cpu1"])
        assert {key: row[:3] for key, row in rows.items()} == {"cpu0": ["exited", "(0)", "0"],
                                                              "cpu1": ["exited", "(0)", "1"]}
        assert sum(int(row[5]) for row in rows.values()) == 4  # each worker's results, found by its worker id

        removed = cli("kill-all", "--run", run_name, "--backend", "swarm")
        assert f"removed 2 worker(s): {', '.join(names)}" in removed.output
        assert list_services(swarm, run_name) == []
    finally:
        # kill-all leaves the stack's network; `docker stack rm` removes it once no task container uses it.
        wait_for(lambda: not stack_containers(swarm, stack), 60, "the stack's containers to go")
        removed_stack = docker_stack("rm", "--detach=false", stack)
        assert removed_stack.returncode == 0, removed_stack.stderr
    assert stack not in docker_stack("ls", "--format", "{{.Name}}").stdout.split()
    assert not swarm.networks.list(names=[f"{stack}_default"])
