"""The compose writer (per-GPU services from the same specs as `start`) and the root compose.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.backends.docker.backend import worker_specs
from orchestrator.backends.docker.compose import compose_document, project_name
from orchestrator.cli.commands import main
from orchestrator.runs.inputs import StagedInputs, container_data_yaml
from orchestrator.runs.plan import LaunchPlan, TrainerOptions, worker_slots
from trainer.checkpoint import save_checkpoint
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("org.evolvectl.project", "org.evolvectl.run", "org.evolvectl.gpu", "org.evolvectl.role")


def document_for(tmp_path: Path, gpus: list[int], cpu_workers: int = 0) -> dict:
    plan = LaunchPlan("big", tmp_path / "runs", tuple(worker_slots(gpus, cpu_workers)), 300,
                      TrainerOptions(data="/runs/evolve/big/data.yaml", epochs=3))
    staged = StagedInputs(plan.options, tmp_path / "datasets" / "coco")
    specs = worker_specs(plan, staged, "evolvectl:latest", "1000:1000")
    return compose_document("big", specs, ROOT, "nvcr.io/nvidia/pytorch:24.05-py3")


def test_each_gpu_service_reserves_exactly_its_own_gpu(tmp_path: Path) -> None:
    services = document_for(tmp_path, [0, 2, 5])["services"]
    assert list(services) == ["worker-gpu0", "worker-gpu2", "worker-gpu5"]
    for gpu in (0, 2, 5):
        service = services[f"worker-gpu{gpu}"]
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "device_ids": [str(gpu)], "capabilities": ["gpu"]}
        assert service["container_name"] == f"evolvectl-big-gpu{gpu}"
        assert service["environment"]["EVOLVECTL_GPU"] == str(gpu)
        command = service["command"]
        assert command[command.index("--device") + 1] == "0"  # the one GPU it sees is its device 0
        assert command[command.index("--worker-id") + 1] == f"evolvectl-big-gpu{gpu}"
        assert service["labels"]["org.evolvectl.gpu"] == str(gpu)


def test_services_share_the_run_folder_and_mount_the_dataset_read_only(tmp_path: Path) -> None:
    document = document_for(tmp_path, [1], cpu_workers=1)
    assert document["name"] == "evolvectl-big"
    services = document["services"]
    assert "deploy" not in services["worker-cpu0"]  # a CPU worker asks for no device at all
    for service in services.values():
        assert service["volumes"] == [
            {"type": "bind", "source": str((tmp_path / "runs" / "big").absolute()), "target": "/runs/evolve/big",
             "read_only": False},
            {"type": "bind", "source": str(tmp_path / "datasets" / "coco"), "target": "/datasets/coco",
             "read_only": True},
        ]
        assert service["restart"] == "on-failure:3" and service["shm_size"] == "8g" and service["init"] is True
        assert all(label in service["labels"] for label in LABELS)
        assert service["build"] == {"context": str(ROOT), "dockerfile": "docker/Dockerfile",
                                    "args": {"BASE_IMAGE": "nvcr.io/nvidia/pytorch:24.05-py3"}}
        command = service["command"]
        assert command[:3] == ["--evolve", "--generations", "300"]
        assert command[command.index("--data") + 1] == "/runs/evolve/big/data.yaml"


def test_project_name_is_what_compose_accepts() -> None:
    assert project_name("Big.Run_2") == "evolvectl-big-run_2"


def test_container_data_yaml_points_into_the_mount(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    source = tmp_path / "coco.yaml"
    source.write_text(f"path: {root}\ntrain: {root}/images/train\nval: [images/val, {root}/extra/val.txt]\n"
                      "names: {0: person, 1: car}\nsynthetic: {seed: 1, train: 4, val: 2, size: 64}\n")
    written = yaml.safe_load(container_data_yaml(source, root, "/datasets/coco"))
    assert written == {"path": "/datasets/coco", "train": "images/train", "val": ["images/val", "extra/val.txt"],
                       "names": {0: "person", 1: "car"}, "synthetic": {"seed": 1, "train": 4, "val": 2, "size": 64}}
    source.write_text(f"path: {root}\ntrain: /elsewhere/train\nval: images/val\nnc: 1\n")
    with pytest.raises(UserError, match="'/elsewhere/train' lies outside the dataset folder"):
        container_data_yaml(source, root, "/datasets/coco")


def test_compose_command_writes_the_file_and_prepares_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):
        (tmp_path / "shapes" / "images" / split).mkdir(parents=True)
        (tmp_path / "shapes" / "images" / split / "a.jpg").write_bytes(b"")  # only found, never decoded here
    (tmp_path / "shapes.yaml").write_text("path: shapes\ntrain: images/train\nval: images/val\nnames: [a]\n")
    (tmp_path / "my_hyp.yaml").write_text((ROOT / "configs/hyps/hyp.scratch-low.yaml").read_text())
    save_checkpoint({"model": {}, "config": {"cfg": "yolov5s"}}, tmp_path / "start.pt")
    result = CliRunner().invoke(main, ["compose", "--gpus", "0-2", "--generations", "50", "--data", "shapes.yaml",
                                       "--hyp", "my_hyp.yaml", "--cfg", "yolov5s", "--weights", "start.pt",
                                       "--name", "big", "--memory", "20g", "--cpus", "4"])
    assert result.exit_code == 0, result.output
    assert "docker compose -f compose.big.yaml up -d" in result.output
    document = yaml.safe_load((tmp_path / "compose.big.yaml").read_text())
    assert list(document["services"]) == ["worker-gpu0", "worker-gpu1", "worker-gpu2"]
    assert {(service["mem_limit"], service["cpus"]) for service in document["services"].values()} == {("20g", 4.0)}
    command = document["services"]["worker-gpu1"]["command"]
    assert command[command.index("--hyp") + 1] == "/runs/evolve/big/inputs/hyps/my_hyp.yaml"
    assert command[command.index("--cfg") + 1] == "yolov5s"  # bundled: the image has it
    assert command[command.index("--weights") + 1] == "/runs/evolve/big/inputs/weights/start.pt"
    run_dir = tmp_path / "runs" / "evolve" / "big"
    assert (run_dir / "inputs" / "hyps" / "my_hyp.yaml").is_file()
    assert (run_dir / "inputs" / "weights" / "start.pt").read_bytes() == (tmp_path / "start.pt").read_bytes()
    assert yaml.safe_load((run_dir / "data.yaml").read_text())["path"] == "/datasets/shapes"
    assert json.loads((run_dir / "launch.json").read_text())["backend"] == "docker"


def test_compose_command_refuses_all_without_an_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["compose", "--gpus", "all"])
    assert result.exit_code != 0
    assert result.output.strip().startswith("Error: --gpus all: the engine's GPUs are unknown")
    assert not (tmp_path / "compose.exp.yaml").exists()


def test_compose_command_refuses_what_the_workers_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hyp.yaml").write_text("mosaic: 1.5\n")
    result = CliRunner().invoke(main, ["compose", "--gpus", "0", "--hyp", "hyp.yaml"])
    assert result.exit_code == 2 and result.output.startswith("Error: hyp.yaml: mosaic=1.5 is out of range")
    assert not (tmp_path / "compose.exp.yaml").exists() and not (tmp_path / "runs").exists()


def test_root_compose_file_runs_cpu_workers_with_our_labels() -> None:
    document = yaml.safe_load((ROOT / "compose.yaml").read_text())
    worker = document["services"]["worker"]
    assert "devices" not in json.dumps(worker)  # CPU by default: works without GPUs
    assert worker["labels"]["org.evolvectl.project"] == "evolvectl"
    assert worker["labels"]["org.evolvectl.run"] == "${EVOLVECTL_RUN:-compose}"
    assert worker["restart"].startswith("on-failure") and "--device=cpu" in worker["command"]
    assert document["x-worker-image"]["build"]["args"] == ["BASE_IMAGE"]
    assert worker["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
