"""`evolvectl compose --stack` without an engine: the stack file holds the Swarm backend's services."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import assert_one_line_error, invoke
from docker.models.services import Service

from orchestrator.backends.base import ContainerLimits
from orchestrator.backends.docker import swarm
from orchestrator.backends.docker.backend import worker_specs
from orchestrator.backends.docker.service import ServiceSpec, service_spec
from orchestrator.backends.docker.stack import stack_document, stack_service
from orchestrator.runs.inputs import StagedInputs
from orchestrator.runs.plan import LaunchPlan, TrainerOptions, worker_slots
from trainer.errors import UserError

PROJECT = Path("/shared/runs/evolve")
DATASET = Path("/shared/datasets/coco128")
LIMITS = ContainerLimits("2g", "20g", 2.5)


def service_specs(max_restarts: int = 3, constraints: tuple[str, ...] = (),
                  limits: ContainerLimits = LIMITS) -> list[ServiceSpec]:
    """As `start --backend swarm` builds them: GPU worker 3, then CPU workers 0 and 1."""
    plan = LaunchPlan("exp1", PROJECT, tuple(worker_slots([3], 2)), 20, TrainerOptions(epochs=10))
    workers = worker_specs(plan, StagedInputs(plan.options, DATASET), "registry.example/evolvectl:1", "1234:1234",
                           limits, max_restarts)
    return [service_spec(worker, constraints) for worker in workers]


def services(**settings: Any) -> dict[str, dict[str, Any]]:
    return stack_document(service_specs(**settings))["services"]


def test_the_file_is_a_version_3_8_stack_of_one_service_per_worker() -> None:
    document = stack_document(service_specs())
    assert document["version"] == "3.8" and set(document) == {"version", "services"}
    assert list(document["services"]) == ["worker-gpu3", "worker-cpu0", "worker-cpu1"]
    for service in document["services"].values():
        assert not {"build", "container_name", "restart", "shm_size", "labels"} & set(service)
        assert (service["deploy"]["mode"], service["deploy"]["replicas"]) == ("replicated", 1)


def test_a_gpu_worker_reserves_one_nvidia_gpu_and_a_cpu_worker_none() -> None:
    written = services()
    assert written["worker-gpu3"]["deploy"]["resources"]["reservations"] == {"generic_resources": [
        {"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 1}}]}
    assert "reservations" not in written["worker-cpu0"]["deploy"]["resources"]
    unlimited = services(limits=ContainerLimits("2g"))
    assert "resources" not in unlimited["worker-cpu0"]["deploy"]
    assert set(unlimited["worker-gpu3"]["deploy"]["resources"]) == {"reservations"}


def test_the_worker_id_is_the_swarm_backends_whatever_the_stack_is_called() -> None:
    """The id rides in the command, so a task the swarm restarts resumes under it."""
    for spec in service_specs():
        service = stack_service(spec)
        command = service["command"]
        assert command[command.index("--worker-id") + 1] == spec.name  # `start --backend swarm`'s service name
        assert command == spec.to_create_kwargs()["args"]
        assert service["entrypoint"] == ["python", "-m", "orchestrator.evolution"]
    gpu = services()["worker-gpu3"]["command"]
    assert gpu[gpu.index("--worker-id") + 1:] == ["evolvectl-exp1-gpu3", "--device", "0"]


def test_labels_go_on_the_service_only() -> None:
    deploy = services()["worker-cpu1"]["deploy"]
    assert deploy["labels"] == {"org.evolvectl.project": "evolvectl", "org.evolvectl.run": "exp1",
                                "org.evolvectl.gpu": "cpu", "org.evolvectl.slot": "1",
                                "org.evolvectl.role": "evolve-worker"}


def test_mounts_environment_and_user_are_the_swarm_backends() -> None:
    for spec in service_specs():
        service = stack_service(spec)
        assert service["volumes"] == [
            {"type": "bind", "source": str(PROJECT / "exp1"), "target": "/runs/evolve/exp1", "read_only": False},
            {"type": "bind", "source": str(DATASET), "target": "/datasets/coco128", "read_only": True},
            {"type": "tmpfs", "target": "/dev/shm", "tmpfs": {"size": 2 * 1024**3}},  # --shm-size
        ]
        kwargs = spec.to_create_kwargs()
        assert service["environment"] == kwargs["env"] and "EVOLVECTL_GPU" not in service["environment"]
        assert (service["user"], service["working_dir"], service["init"]) == ("1234:1234", "/workspace", True)


def test_restart_policy_follows_max_restarts() -> None:
    assert services()["worker-gpu3"]["deploy"]["restart_policy"] == {
        "condition": "on-failure", "delay": "0s", "max_attempts": 3, "window": "0s"}
    # Swarm reads 0 attempts as "no limit": no restarts is the `none` condition, as for the Swarm backend.
    assert services(max_restarts=0)["worker-cpu0"]["deploy"]["restart_policy"] == {"condition": "none",
                                                                                  "delay": "0s"}


def test_constraints_and_limits() -> None:
    deploy = services(constraints=("node.labels.gpu==true", "node.role!=manager"))["worker-gpu3"]["deploy"]
    assert deploy["placement"] == {"constraints": ["node.labels.gpu==true", "node.role!=manager"]}
    assert deploy["resources"]["limits"] == {"cpus": "2.5", "memory": "20g"}
    assert "placement" not in services()["worker-gpu3"]["deploy"]


def test_a_setting_the_stack_file_cannot_carry_is_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting `start --backend swarm` gains must be written here too, not lost without a word."""
    original = ServiceSpec.to_create_kwargs
    monkeypatch.setattr(ServiceSpec, "to_create_kwargs", lambda self: {**original(self), "secrets": []})
    spec = service_specs()[0]
    with pytest.raises(NotImplementedError, match="stack files do not carry secrets yet"):
        stack_service(spec)


def write_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str) -> Any:
    monkeypatch.chdir(tmp_path)
    return invoke("compose", "--stack", "--name", "big", "--generations", "50", *flags)


def test_compose_stack_writes_the_file_and_records_a_swarm_run(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    result = write_stack(tmp_path, monkeypatch, "--gpus", "0,1", "--cpu-workers", "1", "--constraint",
                         "node.labels.gpu==true", "--max-restarts", "2", "--memory", "20g", "--cpus", "4")
    assert result.exit_code == 0, result.output
    assert "wrote stack.big.yaml (3 services); start it with: docker stack deploy -c stack.big.yaml evolvectl-big" \
        in result.output
    text = (tmp_path / "stack.big.yaml").read_text()
    assert "#   docker stack deploy -c stack.big.yaml evolvectl-big   start" in text
    assert "#   docker stack rm evolvectl-big" in text and "evolvectl status --name big " in text
    written = yaml.safe_load(text)["services"]
    assert list(written) == ["worker-gpu0", "worker-gpu1", "worker-cpu0"]
    assert written["worker-gpu1"]["deploy"]["placement"]["constraints"] == ["node.labels.gpu==true"]
    assert written["worker-cpu0"]["deploy"]["restart_policy"]["max_attempts"] == 2
    run_dir = tmp_path / "runs" / "evolve" / "big"
    assert written["worker-gpu0"]["volumes"][0]["source"] == str(run_dir)
    record = json.loads((run_dir / "launch.json").read_text())
    assert record["backend"] == "swarm"  # status, attach and stop look for the run's services


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker command")
def test_the_docker_cli_reads_the_file_as_a_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert write_stack(tmp_path, monkeypatch, "--gpus", "0", "--cpu-workers", "1", "--memory", "1g").exit_code == 0
    checked = subprocess.run(["docker", "stack", "config", "-c", "stack.big.yaml"], capture_output=True, text=True,
                             check=False)
    assert checked.returncode == 0, checked.stderr
    read = yaml.safe_load(checked.stdout)["services"]
    assert read["worker-gpu0"]["deploy"]["resources"]["reservations"]["generic_resources"] == [
        {"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 1}}]
    assert read["worker-cpu0"]["init"] is True and read["worker-cpu0"]["volumes"][2]["tmpfs"]["size"] == 8 * 1024**3


def test_stack_flags_that_have_no_meaning_are_one_line_errors(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert_one_line_error(write_stack(tmp_path, monkeypatch, "--cpu-workers", "1", "--base-image", "nvcr.io/x:1"),
                          "--base-image: `docker stack deploy` builds no image")
    monkeypatch.setenv("BASE_IMAGE", "nvcr.io/x:1")  # exported for compose.yaml: not a flag of this command
    assert write_stack(tmp_path, monkeypatch, "--cpu-workers", "1").exit_code == 0
    assert_one_line_error(invoke("compose", "--cpu-workers", "1", "--constraint", "node.role==worker"),
                          "--constraint places Swarm services: use it with --stack")
    result = write_stack(tmp_path, monkeypatch, "--cpu-workers", "1", "--constraint", "node.role")
    assert result.exit_code == 2 and "'node.role' is not KEY==VALUE or KEY!=VALUE" in result.output
    assert_one_line_error(write_stack(tmp_path, monkeypatch, "--gpus", "all"), "--gpus all: the engine's GPUs")


def test_a_run_the_swarm_cannot_name_is_refused_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    long = "x" * 48  # evolvectl-<run>-cpu0 fits in 63 characters, evolvectl-<run>_worker-cpu0 does not
    assert_one_line_error(invoke("compose", "--stack", "--cpu-workers", "1", "--name", long),
                          f"'evolvectl-{long}_worker-cpu0' cannot name a Swarm service")
    assert_one_line_error(invoke("compose", "--stack", "--cpu-workers", "1", "--name", "exp.1"),
                          "'evolvectl-exp.1-cpu0' cannot name a Swarm service")
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("stack.*"))


def service(name: str, args: list[str], labels: dict[str, str]) -> Service:
    return Service(attrs={"Spec": {"Name": name, "Labels": labels,
                                   "TaskTemplate": {"ContainerSpec": {"Args": args}}}})


def test_the_swarm_backend_reads_a_stack_services_worker_id_from_its_command() -> None:
    stacked = service("evolvectl-big_worker-cpu0", ["--evolve", "--worker-id", "evolvectl-big-cpu0", "--device", "cpu"],
                      {"com.docker.stack.namespace": "evolvectl-big"})
    assert swarm._worker_id(stacked) == "evolvectl-big-cpu0"
    assert swarm._worker_id(service("evolvectl-big-cpu0", [], {})) == "evolvectl-big-cpu0"
    with pytest.raises(UserError, match=r"run big runs as stack evolvectl-big .*`docker stack rm evolvectl-big`"):
        swarm._check_no_stack("big", [stacked])
    swarm._check_no_stack("big", [service("evolvectl-big-cpu0", [], {})])
