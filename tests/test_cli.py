"""The evolvectl command line without an engine: help, one-line errors, GPU checks, run selection."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import (
    FakeBackend,
    FileServer,
    assert_one_line_error,
    invoke,
    write_data_yaml,
)

from orchestrator.cli import launch
from orchestrator.cli.commands import main
from orchestrator.evolution.journal import Journal, format_header, run_columns
from orchestrator.evolution.leases import RunRequest, prepare_run
from orchestrator.evolution.loop import run_worker
from orchestrator.evolution.search_space import SearchSpace
from orchestrator.runs.inputs import stage_for_containers, stage_local
from orchestrator.runs.plan import TrainerOptions, parse_worker_key
from trainer.checkpoint import save_checkpoint
from trainer.config import Hyp
from trainer.errors import UserError
from trainer.model import DetectionModel
from trainer.results import ValidationResult

COMMANDS = ("start", "ddp", "status", "attach", "logs", "stop", "kill-all", "results", "compose")
MISSING_ENGINE = "unix:///nonexistent/docker.sock"


def test_the_command_line_starts_without_torch():
    """`evolvectl status`, `attach`, `stop`... answer in a moment: torch (seconds to import) loads
    only when a command trains or checks a training."""
    code = "import sys, orchestrator.cli; assert 'torch' not in sys.modules, 'orchestrator.cli imports torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def fake_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeBackend:
    backend = FakeBackend([0, 1, 2, 3])
    monkeypatch.setattr(launch, "open_backend", lambda *args: backend)
    monkeypatch.chdir(tmp_path)
    return backend


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: main {command}") or result.output.startswith(f"Usage: evolvectl {command}")
    summary = main.commands[command].help.split("\n")[0]
    assert " ".join(summary.split()) in " ".join(result.output.split())  # the docstring is the help


def test_top_level_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0 and all(command in result.output for command in COMMANDS)


@pytest.mark.parametrize(("spec", "message"), [
    ("0-x", "--gpus '0-x': '0-x' is not a GPU index or range"),
    ("3-1", "--gpus '3-1': range '3-1' runs backwards"),
    ("1,1", "--gpus '1,1': GPU 1 is listed twice"),
    ("", "--gpus '': '' is not a GPU index"),
])
def test_bad_gpu_specs_are_one_line_errors(spec: str, message: str) -> None:
    assert_one_line_error(invoke("start", "--gpus", spec), message)


@pytest.mark.parametrize("size", ["bogus", "-1g", "0"])
def test_a_bad_shm_size_is_refused_before_any_engine_is_asked(fake_backend: FakeBackend, size: str) -> None:
    result = invoke("start", "--cpu-workers", "1", "--shm-size", size)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Invalid value for '--shm-size': '{size}' is not a size: give a number with b, k, m or g" in result.output
    assert fake_backend.plans == []


def test_a_gpu_the_engine_lacks_lists_the_ones_it_has(fake_backend: FakeBackend) -> None:
    result = invoke("start", "--gpus", "2-5")
    assert_one_line_error(result, "--gpus '2-5': no GPU 4, 5; the engine sees: 0, 1, 2, 3")
    assert fake_backend.plans == []


def test_gpus_without_the_nvidia_runtime_suggest_cpu_workers(fake_backend: FakeBackend) -> None:
    fake_backend.gpus = []
    result = invoke("start", "--gpus", "0")
    assert_one_line_error(result, "--gpus 0: the Docker engine cannot hand out GPUs (no NVIDIA runtime")
    assert "--cpu-workers N" in result.output


def test_start_passes_the_chosen_gpus_and_trainer_flags(fake_backend: FakeBackend, tmp_path: Path) -> None:
    result = invoke("start", "--gpus", "all", "--cpu-workers", "1", "--generations", "40", "--epochs", "3",
                    "--name", "big", "--", "--cos-lr")
    assert result.exit_code == 0, result.output
    [plan] = fake_backend.plans
    assert [slot.key for slot in plan.slots] == ["gpu0", "gpu1", "gpu2", "gpu3", "cpu0"]
    assert plan.options.arguments(plan.generations) == [
        "--generations", "40", "--data", "synthetic", "--epochs", "3", "--cos-lr"]
    assert plan.run_dir == tmp_path / "runs" / "evolve" / "big"
    assert "started 5 docker worker(s)" in result.output and "evolvectl attach gpu0 --name big" in result.output


def test_start_passes_the_search_pruning_and_time_budget(fake_backend: FakeBackend) -> None:
    result = invoke("start", "--cpu-workers", "1", "--generations", "40", "--epochs", "9", "--search", "population",
                    "--prune-rungs", "2,5", "--prune-eta", "4", "--hours", "2.5")
    assert result.exit_code == 0, result.output
    [plan] = fake_backend.plans
    assert plan.options.arguments(plan.generations) == [
        "--generations", "40", "--data", "synthetic", "--epochs", "9", "--search", "population", "--prune-rungs", "2,5",
        "--prune-eta", "4.0", "--hours", "2.5"]
    result = invoke("start", "--cpu-workers", "1", "--no-prune", "--name", "other")
    assert result.exit_code == 0, result.output
    assert "--no-prune" in fake_backend.plans[-1].options.arguments(1)


@pytest.mark.parametrize(("flags", "message"), [
    (["--search", "cma"], "Invalid value for '--search'"),
    (["--prune-rungs", "5,2"], "--prune-rungs 5,2: give increasing epochs from 1"),
    (["--hours", "0"], "Invalid value for '--hours'"),
    (["--memory", "lots"], "Invalid value for '--memory': 'lots' is not a size"),
    (["--cpus", "0"], "Invalid value for '--cpus'"),
])
def test_bad_search_flags_and_container_limits_stop_start_before_any_worker(fake_backend: FakeBackend,
                                                                           flags: list[str], message: str) -> None:
    result = invoke("start", "--cpu-workers", "1", *flags)
    assert result.exit_code != 0 and message in result.output, result.output
    assert fake_backend.plans == []


def test_a_worker_asking_for_another_search_than_the_runs_stops_start(fake_backend: FakeBackend) -> None:
    # The run as its first worker made it (the fake backend starts none).
    prepare_run(Journal(Path("runs/evolve/exp")), RunRequest(Hyp(), SearchSpace.load(), 300, search="classic"))
    assert_one_line_error(invoke("start", "--cpu-workers", "1", "--search", "elite"),
                          f"run {Path('runs/evolve/exp').absolute()} searches with --search classic")


def test_start_passes_weights_and_checks_them_first(fake_backend: FakeBackend, tmp_path: Path) -> None:
    save_checkpoint({"model": {}, "config": {"cfg": "yolov5s"}}, tmp_path / "start.pt")
    assert invoke("start", "--cpu-workers", "1", "--weights", "start.pt").exit_code == 0
    [plan] = fake_backend.plans
    assert plan.options.arguments(plan.generations)[-2:] == ["--weights", "start.pt"]
    local = stage_local(replace(plan.options, data=str(write_data_yaml(tmp_path, train=2, val=1, size=32))))
    assert local.options.weights == str(tmp_path / "start.pt")  # absolute: workers run from anywhere
    (tmp_path / "broken.pt").write_bytes(b"")
    assert_one_line_error(invoke("start", "--cpu-workers", "1", "--weights", "broken.pt"),
                          "checkpoint broken.pt cannot be read")


def test_start_downloads_release_weights_once_on_the_host(fake_backend: FakeBackend, server: FileServer,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers get the host's copy (a path for local ones, a copy in the run for containers), so
    eight containers do not download it eight times, and need no network."""
    save_checkpoint({"model": DetectionModel("yolov5n").state_dict(), "config": {"cfg": "yolov5n"}},
                    tmp_path / "made.pt")
    server.files["/yolov5s.pt"] = (tmp_path / "made.pt").read_bytes()
    monkeypatch.setenv("EVOLVECTL_WEIGHTS_URL", server.url)
    monkeypatch.setenv("EVOLVECTL_WEIGHTS", str(tmp_path / "cache"))
    assert invoke("start", "--cpu-workers", "1", "--weights", "yolov5s.pt").exit_code == 0
    [plan] = fake_backend.plans
    options = replace(plan.options, data=str(write_data_yaml(tmp_path, train=2, val=1, size=32)))
    assert stage_local(options).options.weights == str(tmp_path / "cache" / "yolov5s.pt")
    staged = stage_for_containers(options, "exp", tmp_path / "runs" / "evolve" / "exp")
    assert staged.options.weights == "/runs/evolve/exp/inputs/weights/yolov5s.pt"
    assert (tmp_path / "runs" / "evolve" / "exp" / "inputs" / "weights" / "yolov5s.pt").is_file()
    assert server.requests == [("/yolov5s.pt", None)]


def test_bundled_weights_go_to_workers_by_name(fake_backend: FakeBackend, tmp_path: Path) -> None:
    """The image carries configs/weights/, as it carries the bundled hyps: nothing to copy or mount."""
    assert invoke("start", "--cpu-workers", "1", "--weights", "yolov5n-synthetic").exit_code == 0
    [plan] = fake_backend.plans
    options = replace(plan.options, data=str(write_data_yaml(tmp_path, train=2, val=1, size=32)))
    assert stage_local(options).options.weights == "yolov5n-synthetic"
    staged = stage_for_containers(options, "exp", tmp_path / "runs" / "evolve" / "exp")
    assert staged.options.weights == "yolov5n-synthetic"
    assert not (tmp_path / "runs" / "evolve" / "exp" / "inputs" / "weights").exists()
    assert_one_line_error(invoke("start", "--cpu-workers", "1", "--weights", "yolov5q-synthetic"),
                          "weights 'yolov5q-synthetic' not found: pass a last.pt or best.pt of evolvectl or YOLOv5, "
                          "a YOLOv5 release name (yolov5s.pt) or a bundled one: yolov5n-synthetic")


def test_start_clears_a_previous_stop(fake_backend: FakeBackend, tmp_path: Path) -> None:
    stop_file = tmp_path / "runs" / "evolve" / "exp" / "STOP"
    stop_file.parent.mkdir(parents=True)
    stop_file.touch()
    assert invoke("start", "--cpu-workers", "1").exit_code == 0
    assert not stop_file.exists()


def test_start_without_workers_or_with_a_bad_name(fake_backend: FakeBackend) -> None:
    assert_one_line_error(invoke("start"), "no workers asked for: pass --gpus")
    assert_one_line_error(invoke("start", "--cpu-workers", "1", "--name", "a/b"), "run name 'a/b' cannot name")
    assert_one_line_error(invoke("kill-all", "--run", "-x"), "run name '-x' cannot name")
    assert fake_backend.plans == []


@pytest.mark.parametrize(("files", "flags", "message"), [
    ({"hyp.yaml": "momentum: 1.5\n"}, ["--hyp", "hyp.yaml"],
     "hyp.yaml: momentum=1.5 is out of range: momentum must be at least 0 and below 1"),
    ({"space.yaml": "lr0: [1, -0.1, 0.1]\n"}, ["--search-space", "space.yaml"],
     "space.yaml: lr0 low=-0.1 is out of range"),
    ({"seed.yaml": "fliplr: 2\n"}, ["--evolve-population", "seed.yaml"], "seed.yaml: fliplr=2 is out of range"),
    ({}, ["--", "--bogus"], "trainer flags --generations 300 --data synthetic --bogus: No such option '--bogus'"),
    ({}, ["--", "--weights", "gone.pt"], "weights 'gone.pt' not found: pass a last.pt or best.pt"),
])
def test_what_every_worker_would_refuse_stops_start_before_any_worker(
    fake_backend: FakeBackend, tmp_path: Path, files: dict[str, str], flags: list[str], message: str
) -> None:
    """Otherwise each worker would fail and be restarted, in every container, after `start` said it started."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert_one_line_error(invoke("start", "--cpu-workers", "2", *flags), message)
    assert fake_backend.plans == [] and not (tmp_path / "runs").exists()


def test_a_run_with_other_columns_stops_start_before_any_worker(fake_backend: FakeBackend, tmp_path: Path) -> None:
    assert invoke("start", "--cpu-workers", "1", "--generations", "3").exit_code == 0
    Path("anchors.yaml").write_text("anchors: 3\n")  # adds a column the run's evolve.csv lacks
    Path("runs/evolve/exp/evolve.csv").write_bytes(format_header(run_columns(Hyp())))
    result = invoke("start", "--cpu-workers", "1", "--hyp", "anchors.yaml")
    csv = tmp_path / "runs" / "evolve" / "exp" / "evolve.csv"
    assert_one_line_error(result, f"{csv}: hyperparameter columns differ from this run's: missing anchors")
    assert len(fake_backend.plans) == 1


def test_ddp_checks_the_trainer_flags_before_starting(fake_backend: FakeBackend, tmp_path: Path) -> None:
    (tmp_path / "hyp.yaml").write_text("lr0: -1\n")
    assert_one_line_error(invoke("ddp", "--cpu-procs", "2", "--batch-size", "4", "--hyp", "hyp.yaml"),
                          "hyp.yaml: lr0=-1 is out of range")
    assert_one_line_error(invoke("ddp", "--cpu-procs", "2", "--batch-size", "4", "--", "--img", "8"),
                          "trainer flags --data synthetic --batch-size 4 --img 8: Invalid value for '--imgsz'")


def test_docker_backend_without_an_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", MISSING_ENGINE)
    monkeypatch.chdir(tmp_path)
    result = invoke("start", "--backend", "docker", "--cpu-workers", "1")
    assert_one_line_error(result, "Docker engine unreachable: ")
    assert "--backend local" in result.output
    assert not (tmp_path / "runs").exists()  # nothing half-started


def test_auto_backend_falls_back_to_local_with_a_notice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: a local GPU worker would really start")
    monkeypatch.setenv("DOCKER_HOST", MISSING_ENGINE)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["start", "--gpus", "0"])  # local: PyTorch here sees no GPU
    assert result.exit_code != 0
    assert "Docker engine unreachable" in result.stderr and "running workers as local processes" in result.stderr
    expected = "Error: --gpus 0: PyTorch sees no CUDA GPU on this host; run CPU workers with --cpu-workers N"
    assert expected in result.stderr
    assert result.stdout == ""


def test_commands_on_a_missing_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("status"), "no runs under runs/evolve/")
    (tmp_path / "runs" / "evolve" / "r1").mkdir(parents=True)
    assert_one_line_error(invoke("logs", "cpu0", "--name", "r2"), "run 'r2' not found")
    assert_one_line_error(invoke("attach", "nope", "--name", "r1"), "worker 'nope' is not a GPU index")


def test_results_without_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "evolve" / "r1").mkdir(parents=True)
    result = invoke("results", "--name", "r1")
    assert result.exit_code == 0 and "no generation has finished yet" in result.output


def _damaged_run(run_dir: Path) -> bytes:
    """A finished 3-generation run whose evolve.csv has its second row torn in the middle of the file."""
    space = SearchSpace.load()
    run_worker(run_dir, Hyp(), space, 3, lambda hyp, context: ValidationResult(*[0.5] * 7), "w0", 0,
               plot_interval=None)
    lines = (run_dir / "evolve.csv").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:60] + b"\n"
    (run_dir / "evolve.csv").write_bytes(b"".join(lines))
    records = (run_dir / "evolve_meta.jsonl").read_bytes().splitlines(keepends=True)
    (run_dir / "evolve_meta.jsonl").write_bytes(b"".join([records[0], b"{oops\n", *records[1:]]))
    return b"".join(lines)


@pytest.mark.parametrize("command", ["results", "status"])
def test_results_and_status_skip_a_damaged_row_with_one_warning(tmp_path: Path, command: str) -> None:
    run_dir = tmp_path / "runs" / "evolve" / "exp"
    before = _damaged_run(run_dir)
    evolvectl = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
    flags = ["--name", "exp", *(["--backend", "local"] if command == "status" else [])]
    result = subprocess.run([*evolvectl, command, *flags], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    csv_warning, meta_warning = result.stderr.splitlines()
    assert csv_warning.startswith(f"Warning: {run_dir / 'evolve.csv'}: line 3: 3 values where the header has")
    assert meta_warning == (f"Warning: {run_dir / 'evolve_meta.jsonl'}: line 2: not a JSON object. "
                            "Ignored and left in the file")
    assert "Traceback" not in result.stderr and "numpy" not in result.stderr
    assert (run_dir / "evolve.csv").read_bytes() == before


def test_start_reports_damaged_rows_before_it_launches(fake_backend: FakeBackend, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    before = _damaged_run(tmp_path / "runs" / "evolve" / "exp")
    with caplog.at_level(logging.WARNING):
        result = invoke("start", "--cpu-workers", "1", "--generations", "5")
    assert result.exit_code == 0, result.output
    assert [plan.generations for plan in fake_backend.plans] == [5]
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert "evolve.csv: line 3: 3 values where the header has" in warning
    assert (tmp_path / "runs" / "evolve" / "exp" / "evolve.csv").read_bytes() == before


def test_worker_keys() -> None:
    assert [parse_worker_key(text) for text in ("3", "gpu3", "GPU03", "cpu0", " cpu12 ")] == [
        "gpu3", "gpu3", "gpu3", "cpu0", "cpu12"]
    for bad in ("", "gpu", "cpu", "3a", "tpu1", "-1"):
        with pytest.raises(UserError, match="is not a GPU index"):
            parse_worker_key(bad)


def test_trainer_options_become_flags() -> None:
    options = TrainerOptions(data="d.yaml", cfg="yolov5s", batch_size=32, search_space="s.yaml", extra=("--cos-lr",))
    assert options.arguments(7) == ["--generations", "7", "--data", "d.yaml", "--cfg", "yolov5s", "--batch-size",
                                    "32", "--search-space", "s.yaml", "--cos-lr"]
