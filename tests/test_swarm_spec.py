"""The Swarm backend without an engine: a worker's service spec, its tasks read back, the manager check."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from conftest import assert_one_line_error, invoke

from orchestrator.backends.base import ContainerLimits
from orchestrator.backends.docker import engine, swarm
from orchestrator.backends.docker.backend import worker_specs
from orchestrator.backends.docker.service import (
    ServiceSpec,
    advertised_gpus,
    service_spec,
    summarize_tasks,
)
from orchestrator.backends.docker.spec import GPU_LABEL, SLOT_LABEL, worker_spec
from orchestrator.backends.docker.swarm import check_manager
from orchestrator.runs.inputs import StagedInputs
from orchestrator.runs.plan import LaunchPlan, TrainerOptions, worker_slots
from orchestrator.runs.status import WorkerState, stop_reason
from trainer.cpus import WORKERS_ON_HOST
from trainer.errors import UserError

PROJECT = Path("/shared/runs/evolve")
DATASET = Path("/shared/datasets/coco128")


TWO_GIB_SHM = ContainerLimits("2g")


def make_service(gpu: int | None = 3, max_restarts: int = 3, constraints: tuple[str, ...] = (),
                 limits: ContainerLimits = TWO_GIB_SHM) -> ServiceSpec:
    """As the Swarm backend builds it: the Docker backend's worker spec (one GPU worker, two CPU workers)."""
    plan = LaunchPlan("exp1", PROJECT, tuple(worker_slots([3], 2)), 20, TrainerOptions(epochs=10))
    staged = StagedInputs(plan.options, DATASET)
    workers = {spec.labels[GPU_LABEL] + spec.labels[SLOT_LABEL]: spec for spec in worker_specs(
        plan, staged, "registry.example/evolvectl:1", "1234:1234", limits, max_restarts)}
    return service_spec(workers["30" if gpu is not None else "cpu1"], constraints)


def test_a_gpu_worker_is_one_replica_asking_for_one_gpu() -> None:
    kwargs = make_service(gpu=3).to_create_kwargs()
    assert kwargs["name"] == "evolvectl-exp1-gpu3"
    assert kwargs["image"] == "registry.example/evolvectl:1"
    assert kwargs["mode"] == {"replicated": {"Replicas": 1}}
    assert kwargs["resources"] == {"Reservations": {"GenericResources": [
        {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}}]}}
    assert kwargs["command"] == ["python", "-m", "orchestrator.evolution"]  # the entrypoint
    assert kwargs["args"][-4:] == ["--worker-id", "evolvectl-exp1-gpu3", "--device", "0"]
    assert "EVOLVECTL_GPU" not in kwargs["env"]  # the swarm picks the GPU: its index would be recorded wrong


def test_a_cpu_worker_reserves_nothing() -> None:
    kwargs = make_service(gpu=None).to_create_kwargs()
    assert kwargs["name"] == "evolvectl-exp1-cpu1"
    assert "resources" not in kwargs
    assert kwargs["args"][-4:] == ["--worker-id", "evolvectl-exp1-cpu1", "--device", "cpu"]


def test_labels_are_the_docker_backends_and_go_on_the_service_only() -> None:
    kwargs = make_service(gpu=3).to_create_kwargs()
    assert kwargs["labels"] == {
        "org.evolvectl.project": "evolvectl",
        "org.evolvectl.run": "exp1",
        "org.evolvectl.gpu": "3",
        "org.evolvectl.slot": "0",
        "org.evolvectl.role": "evolve-worker",
    }
    assert "container_labels" not in kwargs  # the Docker backend's kill-all must not reach task containers


def test_mounts_environment_and_user_are_the_docker_backends() -> None:
    kwargs = make_service(gpu=None).to_create_kwargs()
    run_folder, dataset, shm = kwargs["mounts"]
    assert (run_folder["Type"], run_folder["Source"], run_folder["Target"], run_folder["ReadOnly"]) == (
        "bind", str(PROJECT / "exp1"), "/runs/evolve/exp1", False)
    assert (dataset["Type"], dataset["Source"], dataset["Target"], dataset["ReadOnly"]) == (
        "bind", str(DATASET), "/datasets/coco128", True)
    assert (shm["Type"], shm["Target"], shm["TmpfsOptions"]["SizeBytes"]) == ("tmpfs", "/dev/shm", 2 * 1024**3)
    assert kwargs["env"] == {WORKERS_ON_HOST: "3", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2)),
                             "HOME": "/tmp"}
    assert (kwargs["user"], kwargs["workdir"], kwargs["init"]) == ("1234:1234", "/workspace", True)
    assert kwargs["hostname"] == "{{.Node.Hostname}}"  # provenance's `host` names the node, not the task


def test_restart_policy_follows_max_restarts() -> None:
    policy = make_service(max_restarts=3).to_create_kwargs()["restart_policy"]
    assert (policy["Condition"], policy["MaxAttempts"]) == ("on-failure", 3)
    # Swarm reads MaxAttempts 0 as "no limit": no restarts must be the `none` condition.
    assert make_service(max_restarts=0).to_create_kwargs()["restart_policy"]["Condition"] == "none"


def test_constraints_are_checked_and_passed() -> None:
    kwargs = make_service(constraints=("node.labels.gpu==true", " node.role != manager")).to_create_kwargs()
    assert kwargs["constraints"] == ["node.labels.gpu==true", "node.role != manager"]
    assert make_service().to_create_kwargs()["constraints"] == []
    with pytest.raises(UserError, match=r"--constraint 'node.labels.gpu': write KEY==VALUE"):
        make_service(constraints=("node.labels.gpu",))


@pytest.mark.parametrize("run", ["exp.1", "x" * 50])
def test_a_run_name_that_cannot_name_a_service_is_refused(run: str) -> None:
    worker = worker_spec(run, None, 0, "evolvectl:latest", PROJECT / run, None, [])
    with pytest.raises(UserError, match="cannot name a Swarm service"):
        service_spec(worker).to_create_kwargs()


def task(state: str, created: str, exit_code: int | None = None, err: str | None = None) -> dict[str, Any]:
    """A task as the engine lists it; a container only when `exit_code` is given."""
    container = {"ContainerID": "c0ffee" if exit_code is not None else "", "ExitCode": exit_code or 0}
    status: dict[str, Any] = {"State": state, "ContainerStatus": container}
    if err:
        status["Err"] = err
    return {"CreatedAt": created, "Status": status}


@pytest.mark.parametrize(("tasks", "replicas", "expected"), [
    ([], 1, ("starting", 0, None, None)),
    ([], 0, ("exited", 0, None, None)),
    ([task("running", "2026-01-01T00:00:01.5Z", 0)], 1, ("running", 0, None, None)),
    ([task("complete", "2026-01-01T00:00:01Z", 0)], 1, ("exited", 0, 0, None)),
    # The replacement of a failed task waits out the restart delay: restarting, with the last exit code.
    ([task("ready", "2026-01-01T00:00:09.1Z"), task("failed", "2026-01-01T00:00:01.123456789Z", 137)], 1,
     ("restarting", 1, 137, None)),
    # Trailing zeros are trimmed from CreatedAt: .5 is later than .123456789.
    ([task("failed", "2026-01-01T00:00:01.123456789Z", 1), task("running", "2026-01-01T00:00:01.5Z", 0)], 1,
     ("running", 1, None, None)),
    ([task("failed", f"2026-01-01T00:00:0{second}Z", 3) for second in range(4)], 1, ("exited", 3, 3, None)),
    ([task("shutdown", "2026-01-01T00:00:01Z", 137)], 0, ("exited", 0, 137, None)),
    ([task("pending", "2026-01-01T00:00:01Z", err="no suitable node (insufficient resources on 1 node)")], 1,
     ("starting", 0, None, "no suitable node (insufficient resources on 1 node)")),
    ([task("rejected", "2026-01-01T00:00:01Z", err="bind source path does not exist: /shared/runs")], 1,
     ("exited", 0, None, "bind source path does not exist: /shared/runs")),
])
def test_tasks_map_onto_a_workers_state(tasks: list[dict[str, Any]], replicas: int,
                                        expected: tuple[str, int, int | None, str | None]) -> None:
    summary = summarize_tasks(tasks, replicas)
    assert (summary.state, summary.restarts, summary.exit_code, summary.error) == expected


def test_a_workers_node_is_its_latest_tasks() -> None:
    tasks = [dict(task("failed", "2026-01-01T00:00:01Z", 137), NodeID="n2"),
             dict(task("running", "2026-01-01T00:00:09Z", 0), NodeID="n1")]
    assert summarize_tasks(tasks).node_id == "n1"
    assert summarize_tasks([task("pending", "2026-01-01T00:00:01Z")]).node_id is None


@pytest.mark.parametrize(("tail", "expected"), [
    (None, b"one\ntwo\nthree\n"), (2, b"two\nthree\n"), (9, b"one\ntwo\nthree\n"), (0, b""),
])
def test_a_services_logs_are_put_in_time_order_before_the_tail_is_taken(tail: int | None, expected: bytes) -> None:
    """The engine sends a restarted worker's tasks one after another in no set order, each with its own tail."""
    replacement = b"2026-01-01T00:00:09Z three\n"
    killed = b"2026-01-01T00:00:01.123456789Z one\n2026-01-01T00:00:01.5Z two\n"
    assert b"".join(swarm._in_time_order([replacement, killed], tail)) == expected


def test_status_names_the_swarms_reason_for_a_worker_it_cannot_place() -> None:
    waiting = WorkerState("gpu0", "evolvectl-exp1-gpu0", "starting", error="no suitable node")
    assert stop_reason(waiting) == "no suitable node"
    assert stop_reason(WorkerState("gpu0", "evolvectl-exp1-gpu0", "running", error="stale")) is None


class FakeEngine:
    def __init__(self, swarm: dict[str, Any]) -> None:
        self.swarm = swarm

    def info(self) -> dict[str, Any]:
        return {"Swarm": self.swarm}


def test_only_a_manager_runs_the_swarm_backend() -> None:
    check_manager(FakeEngine({"LocalNodeState": "active", "ControlAvailable": True}))
    with pytest.raises(UserError, match=r"swarm worker, not a manager; run evolvectl on a manager node"):
        check_manager(FakeEngine({"LocalNodeState": "active", "ControlAvailable": False}))


def test_swarm_on_an_engine_outside_a_swarm_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.setattr(engine, "connect", lambda: FakeEngine({"LocalNodeState": "inactive",
                                                               "ControlAvailable": False}))
    monkeypatch.chdir(tmp_path)
    result = invoke("start", "--backend", "swarm", "--cpu-workers", "1")
    assert_one_line_error(result, "--backend swarm: this Docker engine is not a swarm manager (swarm: inactive); "
                                  "run `docker swarm init` here first")
    assert not (tmp_path / "runs" / "evolve" / "exp" / "launch.json").exists()


def test_constraints_need_the_swarm_and_their_syntax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("start", "--cpu-workers", "1", "--backend", "local", "--constraint",
                                 "node.role==worker"),
                          "--constraint places Swarm services: use it with --backend swarm")
    result = invoke("start", "--cpu-workers", "1", "--backend", "swarm", "--constraint", "node.role")
    assert result.exit_code == 2 and "'node.role' is not KEY==VALUE or KEY!=VALUE" in result.output


def endless(chunks: list[bytes]) -> Iterator[bytes]:
    """A followed log stream as the engine sends it: it never ends, even after the service's tasks did."""
    yield from chunks
    threading.Event().wait()


def test_following_a_service_ends_once_it_has_no_live_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swarm, "FOLLOW_POLL_S", 0.05)
    checks = iter([True, True, False])  # live for two polls, then its last task ended
    received = list(swarm._until_idle(endless([b"Generation 1\n", b"Epoch 1/4\n"]), lambda: next(checks)))
    assert received == [b"Generation 1\n", b"Epoch 1/4\n"]


def test_a_broken_log_stream_reaches_the_follower(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Iterator[bytes]:
        yield b"Generation 1\n"
        raise docker.errors.APIError("connection lost")

    monkeypatch.setattr(swarm, "FOLLOW_POLL_S", 0.05)
    following = swarm._until_idle(broken(), lambda: True)
    assert next(following) == b"Generation 1\n"
    with pytest.raises(docker.errors.APIError, match="connection lost"):
        next(following)


def test_ddp_is_refused_on_the_swarm_before_any_engine_is_asked(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.setattr(engine, "connect", lambda: pytest.fail("no engine should be asked"))
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("ddp", "--backend", "swarm", "--cpu-procs", "2"),
                          "--backend swarm runs evolutions only: train with --backend docker or local")


def node(state: str, availability: str, *resources: dict[str, Any]) -> dict[str, Any]:
    return {"Status": {"State": state}, "Spec": {"Availability": availability},
            "Description": {"Resources": {"GenericResources": list(resources)}}}


def test_gpus_are_counted_over_the_nodes_that_take_tasks() -> None:
    named = [{"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": f"GPU-{index}"}} for index in range(4)]
    nodes = [
        node("ready", "active", *named),
        node("ready", "active", {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 2}}),
        node("ready", "drain", *named),  # drained: nothing is placed there
        node("down", "active", *named),
        node("ready", "active", {"DiscreteResourceSpec": {"Kind": "hamster", "Value": 5}}),
        {"Status": {"State": "ready"}, "Spec": {"Availability": "active"}, "Description": {"Resources": {}}},
    ]
    assert advertised_gpus(nodes) == 6


def test_memory_and_cpu_limits_are_the_services_limits() -> None:
    resources = make_service(gpu=None, limits=ContainerLimits("2g", "20g", 2.5)).to_create_kwargs()["resources"]
    assert resources["Limits"] == {"MemoryBytes": 20 * 1024**3, "NanoCPUs": 2_500_000_000}
    gpu = make_service(gpu=3, limits=ContainerLimits("2g", None, 4)).to_create_kwargs()["resources"]
    assert gpu["Limits"] == {"NanoCPUs": 4_000_000_000} and gpu["Reservations"]["GenericResources"]
