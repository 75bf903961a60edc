"""End to end on a real two-node Docker Swarm: one evolution's CPU workers on two nodes, one journal.

A module fixture runs .ci/two-node/setup.sh: this engine becomes the manager of a swarm it makes,
and a second engine in its own network namespace joins it as a worker node. The two engines
share one file system, so the run folder, a host path bind-mounted into every task, is the same
folder on both nodes, as an NFS export is on real servers. teardown.sh always runs afterwards
and leaves this engine in no swarm again. Not covered: GPUs on the second node, and a lock
between two kernels (both nodes take the journal's lock in one kernel here).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import attach_until, cli, docker_unavailable, wait_for, write_data_yaml
from docker.models.services import Service
from swarm_helpers import (
    assert_exact_budget,
    finished,
    leased_to,
    start_arguments,
    status_rows,
    swarm_lock,
    task_states,
    tasks,
)

import docker
from orchestrator.backends.docker.spec import run_labels
from orchestrator.backends.docker.swarm import list_services, remove_services
from orchestrator.evolution.journal import Journal

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / ".ci" / "two-node"
SECOND_SOCKET = "/var/run/docker2.sock"
GENERATIONS = 5
# One `start` per worker, each with its own placement: the second adds only the missing worker.
ON_MANAGER = ("--backend", "swarm", "--constraint", "node.role==manager")
ON_SECOND_NODE = ("--backend", "swarm", "--constraint", "node.role==worker")


@dataclass(frozen=True)
class TwoNodes:
    manager: docker.DockerClient  # this engine: the swarm's manager, which evolvectl talks to
    second: docker.DockerClient  # the second engine, a worker node: to reach its containers directly
    manager_node: str  # node ids
    second_node: str


def run_script(name: str, image: str) -> subprocess.CompletedProcess[str]:
    """One of .ci/two-node's scripts; its output is printed, so that a failing test shows it."""
    environment = dict(os.environ, TN_IMAGES=image, TN_SOCK=SECOND_SOCKET)
    # The image copy takes about two minutes; the limit is far above it.
    result = subprocess.run(["bash", str(SCRIPTS / name)], env=environment, capture_output=True, text=True,
                            check=False, timeout=900)
    print(result.stdout + result.stderr)
    return result


def last_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("[two-node] error:")]
    return (errors or lines or [f"exit code {result.returncode}"])[-1]


def node_id(client: docker.DockerClient) -> str:
    return client.info()["Swarm"]["NodeID"]


@pytest.fixture(scope="module")
def two_nodes(docker_client: docker.DockerClient, worker_image: str) -> Iterator[TwoNodes]:
    """This engine as the manager of a two-node swarm made here; left in no swarm again afterwards."""
    with swarm_lock():
        state = docker_client.info().get("Swarm", {}).get("LocalNodeState", "inactive")
        if state != "inactive":
            # A swarm made elsewhere is someone's: neither joined to nor left here.
            docker_unavailable(f"this engine is already in a swarm (state {state}); the two-node test makes its "
                               "own: leave that swarm first (`docker swarm leave --force`)",
                               fix="the engine must start in no swarm")
        try:
            setup = run_script("setup.sh", worker_image)
            if setup.returncode != 0:
                docker_unavailable(f"two-node swarm setup failed: {last_error(setup)}",
                                   fix="the [two-node] lines above say why")
            second = docker.DockerClient(base_url=f"unix://{SECOND_SOCKET}")
            try:
                yield TwoNodes(docker_client, second, node_id(docker_client), node_id(second))
            finally:
                second.close()
        finally:
            teardown = run_script("teardown.sh", worker_image)
            if teardown.returncode != 0:
                pytest.fail(f"two-node swarm teardown failed: {last_error(teardown)}")


@pytest.fixture
def run_name(two_nodes: TwoNodes) -> Iterator[str]:
    run = f"sw2-{uuid.uuid4().hex[:8]}"
    yield run
    remove_services(two_nodes.manager, run)


@pytest.fixture
def foreign_service(two_nodes: TwoNodes, worker_image: str, run_name: str) -> Iterator[Service]:
    """A service on the second node with the run's labels that is not one of its workers."""
    made = two_nodes.manager.services.create(worker_image, ["sleep", "600"], name=f"not-{run_name}",
                                             labels=run_labels(run_name), constraints=["node.role==worker"])
    yield made
    made.remove()


def wrote_a_result(run_dir: Path, worker: str) -> bool:
    return any(record["status"] == "ok" and record["worker"] == worker for record in Journal(run_dir).read_records())


def test_workers_on_two_nodes_share_one_journal_and_an_exact_budget(
    two_nodes: TwoNodes, worker_image: str, run_name: str, foreign_service: Service, tmp_path: Path
) -> None:
    """cpu0 on the manager, cpu1 on the second node, both writing the journal of one host folder.
    cpu1's container, killed on its node mid-generation, comes back there; the budget stays exact."""
    manager, second = two_nodes.manager, two_nodes.second
    data = write_data_yaml(tmp_path, train=32, val=16, size=64)
    project = tmp_path / "runs"
    run_dir = project / run_name
    where = ("--project", str(project), "--name", run_name)
    names = [f"evolvectl-{run_name}-cpu0", f"evolvectl-{run_name}-cpu1"]
    ttl = ("--lease-ttl", "3")
    first = cli(*start_arguments(worker_image, data, project, run_name, 1, GENERATIONS, *ttl, backend=ON_MANAGER))
    assert first.exit_code == 0 and "started 1 swarm worker(s)" in first.output, first.output
    assert "the swarm has 2 nodes: each needs image" in first.output
    added = cli(*start_arguments(worker_image, data, project, run_name, 2, GENERATIONS, *ttl, backend=ON_SECOND_NODE))
    assert added.exit_code == 0 and "started 1 swarm worker(s), 1 already running" in added.output, added.output

    # The second node's output, followed live through the manager.
    output, errors, exit_code = attach_until(["cpu1", *where], "Epoch", timeout_s=120)
    assert exit_code == 0 and "Generation" in output, errors

    wait_for(lambda: wrote_a_result(run_dir, names[1]) and leased_to(run_dir, names[1]), 180,
             "cpu1 to write a result and hold its next lease")
    [running] = [task for task in tasks(manager, names[1]) if task["Status"]["State"] == "running"]
    second.containers.get(running["Status"]["ContainerStatus"]["ContainerID"]).kill()  # only node 2 has it
    wait_for(lambda: len(tasks(manager, names[1])) == 2, 60, "the swarm to replace the killed task")
    wait_for(lambda: finished(manager, names), 240, "the budget", poll_s=1.0)

    assert [task_states(manager, name) for name in names] == [["complete"], ["failed", "complete"]]
    placed = [{task["NodeID"] for task in tasks(manager, name)} for name in names]
    assert placed == [{two_nodes.manager_node}, {two_nodes.second_node}]  # the replacement stayed on node 2
    ok = assert_exact_budget(run_dir, GENERATIONS)
    assert {record["worker"] for record in ok} == set(names)  # both nodes wrote to the one journal
    expired = [record for record in Journal(run_dir).read_records() if record["status"] == "expired"]
    assert [record["worker"] for record in expired] == [names[1]]  # its lost generation was trained again
    status = cli("status", *where)
    assert f"{GENERATIONS}/{GENERATIONS} generations (100%)" in status.output and "budget reached" in status.output
    rows = status_rows(status.output, ["cpu0", "cpu1"])
    assert {key: row[:3] for key, row in rows.items()} == {"cpu0": ["exited", "(0)", "0"],
                                                          "cpu1": ["exited", "(0)", "1"]}
    assert all(int(row[5]) > 0 for row in rows.values())  # each worker's results, found by its worker id
    hostnames = [manager.nodes.get(node).attrs["Description"]["Hostname"]
                 for node in (two_nodes.manager_node, two_nodes.second_node)]
    assert f"nodes: {' · '.join(sorted([f'{hostnames[0]}: cpu0', f'{hostnames[1]}: cpu1']))}" in status.output
    # The journal's provenance says which node trained each generation.
    assert {record["worker"]: record["host"] for record in ok} == dict(zip(names, hostnames, strict=True))
    logs = cli("logs", "cpu1", *where)  # both of its tasks' output, from node 2 through the manager
    assert logs.exit_code == 0 and logs.output.count("Generation ") >= 2, logs.output
    assert f"Worker {names[1]}: budget reached" in logs.output  # the replacement's last line
    tail = cli("logs", "cpu1", "--tail", "5", *where)  # the last 5 lines of all its tasks, not 5 per task
    assert tail.exit_code == 0 and tail.output.count("\n") == 5 and logs.output.endswith(tail.output)
    assert tail.output.splitlines()[-1].startswith(f"Worker {names[1]}: budget reached")  # in time order

    removed = cli("kill-all", "--run", run_name, "--backend", "swarm")
    assert removed.exit_code == 0 and f"removed 2 worker(s): {', '.join(names)}" in removed.output
    assert list_services(manager, run_name) == []
    [foreign] = tasks(manager, foreign_service.name)  # same run label, not our worker: untouched
    assert foreign["Status"]["State"] == "running" and foreign["NodeID"] == two_nodes.second_node
