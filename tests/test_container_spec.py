"""The worker container spec and `--gpus` parsing, checked without a Docker engine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.backends.base import ContainerLimits
from orchestrator.backends.docker.backend import container_limits, size_text
from orchestrator.backends.docker.spec import WorkerSpec, worker_spec
from orchestrator.runs.plan import parse_gpu_spec
from trainer.errors import UserError


def make_spec(gpu: int | None = 3, slot: int = 0, dataset_dir: Path | None = Path("/data/coco128")) -> WorkerSpec:
    return worker_spec(
        run="exp1",
        gpu=gpu,
        slot=slot,
        image="evolvectl:latest",
        run_volume="evolvectl-exp1",
        dataset_dir=dataset_dir,
        trainer_args=["--epochs", "10", "--data", "/datasets/coco128/coco128.yaml"],
    )


def test_gpu_worker_requests_exactly_its_gpu() -> None:
    kwargs = make_spec(gpu=3).to_run_kwargs()
    [request] = kwargs["device_requests"]
    assert request["DeviceIDs"] == ["3"]
    assert request["Capabilities"] == [["gpu"]]
    assert request["Count"] == 0  # no "all GPUs" on top of the named one


def test_cpu_worker_has_no_device_request() -> None:
    spec = make_spec(gpu=None, slot=2)
    assert spec.gpu_ids is None
    assert "device_requests" not in spec.to_run_kwargs()
    assert spec.device_requests() == []


def test_names_and_labels() -> None:
    gpu_spec, cpu_spec = make_spec(gpu=3), make_spec(gpu=None, slot=2)
    assert gpu_spec.name == "evolvectl-exp1-gpu3"
    assert cpu_spec.name == "evolvectl-exp1-cpu2"
    assert gpu_spec.labels == {
        "org.evolvectl.project": "evolvectl",
        "org.evolvectl.run": "exp1",
        "org.evolvectl.gpu": "3",
        "org.evolvectl.slot": "0",
        "org.evolvectl.role": "evolve-worker",
    }
    assert cpu_spec.labels["org.evolvectl.gpu"] == "cpu"
    assert gpu_spec.to_run_kwargs()["labels"] == gpu_spec.labels


def test_command_targets_device_zero_and_shared_project() -> None:
    gpu_command = make_spec(gpu=3).to_run_kwargs()["command"]
    assert gpu_command == [
        "--evolve", "--epochs", "10", "--data", "/datasets/coco128/coco128.yaml",
        "--project", "/runs/evolve", "--name", "exp1",
        "--worker-id", "evolvectl-exp1-gpu3", "--device", "0",
    ]
    cpu_command = make_spec(gpu=None, slot=1).to_run_kwargs()["command"]
    assert cpu_command[-4:] == ["--worker-id", "evolvectl-exp1-cpu1", "--device", "cpu"]


def test_mounts_run_read_write_and_dataset_read_only() -> None:
    run_mount, dataset_mount = make_spec().to_run_kwargs()["mounts"]
    assert (run_mount["Type"], run_mount["Source"], run_mount["Target"]) == ("volume", "evolvectl-exp1", "/runs")
    assert run_mount["ReadOnly"] is False
    assert (dataset_mount["Type"], dataset_mount["Source"]) == ("bind", "/data/coco128")
    assert dataset_mount["Target"] == "/datasets/coco128"
    assert dataset_mount["ReadOnly"] is True


def test_run_folder_path_is_bind_mounted_and_dataset_is_optional(tmp_path: Path) -> None:
    spec = worker_spec("exp1", 0, 0, "evolvectl:latest", tmp_path, None, [])
    [mount] = spec.to_run_kwargs()["mounts"]
    assert (mount["Type"], mount["Source"], mount["Target"]) == ("bind", str(tmp_path), "/runs")


def test_shm_restart_user_workdir() -> None:
    kwargs = make_spec().to_run_kwargs()
    assert kwargs["shm_size"] == "8g"
    assert kwargs["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert kwargs["user"] == "1000:1000"
    assert kwargs["working_dir"] == "/workspace"
    assert kwargs["image"] == "evolvectl:latest"


def test_run_kwargs_are_accepted_by_the_sdk() -> None:
    # The SDK sorts run() kwargs into container config and host config and rejects unknown ones.
    from docker.models.containers import _create_container_args

    create_args = _create_container_args({**make_spec().to_run_kwargs(), "version": "1.41"})
    host_config = create_args["host_config"]
    assert host_config["ShmSize"] == 8 * 1024**3
    assert host_config["DeviceRequests"][0]["DeviceIDs"] == ["3"]
    assert host_config["Init"] is True


def test_hostname_names_the_engine_host_except_with_host_networking() -> None:
    assert "hostname" not in make_spec().to_run_kwargs()  # unset: Docker's own (the container id)
    named = replace(make_spec(), hostname="gpu-box-7")
    from docker.models.containers import _create_container_args

    assert _create_container_args({**named.to_run_kwargs(), "version": "1.41"})["hostname"] == "gpu-box-7"
    # Docker refuses a hostname together with host networking; the host's own name shows there.
    assert "hostname" not in replace(named, network_mode="host").to_run_kwargs()


def test_bad_run_name_is_refused() -> None:
    with pytest.raises(UserError, match="run name 'my run'"):
        worker_spec("my run", 0, 0, "evolvectl:latest", "volume", None, [])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-7", [0, 1, 2, 3, 4, 5, 6, 7]),
        ("0,2,5", [0, 2, 5]),
        ("0-2,5", [0, 1, 2, 5]),
        (" 5 , 1 ", [1, 5]),
        ("3", [3]),
        ("all", [0, 1, 2, 3, 4, 5, 6, 7]),
        ("ALL", [0, 1, 2, 3, 4, 5, 6, 7]),
    ],
)
def test_parse_gpu_spec(spec: str, expected: list[int]) -> None:
    assert parse_gpu_spec(spec, available=list(range(8))) == expected


def test_parse_gpu_spec_without_known_gpus_accepts_indices() -> None:
    assert parse_gpu_spec("4-5", available=None) == [4, 5]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0-x", "'0-x' is not a GPU index or range"),
        ("gpu0", "'gpu0' is not a GPU index or range"),
        ("-1", "'-1' is not a GPU index or range"),
        ("0,,1", "'' is not a GPU index or range"),
        ("", "'' is not a GPU index or range"),
        ("5-2", "range '5-2' runs backwards; write 2-5"),
        ("0-2,1", "GPU 1 is listed twice"),
        ("2,9,12", "no GPU 9, 12; the engine sees: 0, 1, 2, 3"),
    ],
)
def test_parse_gpu_spec_errors_name_the_bad_value(spec: str, message: str) -> None:
    with pytest.raises(UserError) as raised:
        parse_gpu_spec(spec, available=[0, 1, 2, 3])
    assert message in raised.value.message
    assert f"'{spec}'" in raised.value.message


def test_parse_gpu_spec_all_needs_known_gpus() -> None:
    with pytest.raises(UserError, match="unknown"):
        parse_gpu_spec("all", available=None)
    with pytest.raises(UserError, match="--cpu-workers"):
        parse_gpu_spec("all", available=[])
    with pytest.raises(UserError, match="the engine sees: none"):
        parse_gpu_spec("0", available=[])


def test_memory_and_cpu_limits_reach_the_engine_and_status() -> None:
    kwargs = replace(make_spec(), limits=ContainerLimits("8g", "20g", 2.5)).to_run_kwargs()
    assert (kwargs["mem_limit"], kwargs["nano_cpus"]) == ("20g", 2_500_000_000)
    assert "mem_limit" not in make_spec().to_run_kwargs() and "nano_cpus" not in make_spec().to_run_kwargs()
    assert container_limits({"Memory": 20 * 1024**3, "NanoCpus": 2_500_000_000}) == "memory 20g, 2.5 CPUs"
    assert container_limits({"Memory": 0, "NanoCpus": 0}) == "" and size_text(1536 * 1024**2) == "1536m"
