"""`evolvectl ddp`: the job's container spec, its command, the checks made before anything starts,
its progress from results.csv, finding its ranks, and (slow) a real local job stopped and resumed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FakeBackend, assert_one_line_error, invoke

from orchestrator.backends.base import ContainerLimits
from orchestrator.backends.docker.spec import ddp_spec
from orchestrator.backends.local import backend as local
from orchestrator.cli import launch
from orchestrator.cli.render import render_status
from orchestrator.runs.ddp import RESUME_SCRIPT, DdpPlan, Rendezvous, trained_epochs
from orchestrator.runs.inputs import StagedInputs
from orchestrator.runs.names import DDP_KEY
from orchestrator.runs.plan import TrainerOptions, parse_worker_key
from orchestrator.runs.record import DDP_MODE, LaunchRecord, existing_run_dir
from orchestrator.runs.status import (
    WorkerState,
    budget_reached,
    collect_training_status,
)
from trainer import ranks
from trainer.errors import UserError
from trainer.progress import RESULTS_COLUMNS, append_results

OPTIONS = TrainerOptions(data="/runs/evolve/r1/data.yaml", cfg="yolov5s", epochs=10, batch_size=32,
                         extra=("--sync-bn",))


def make_plan(gpus: tuple[int, ...] = (2, 5, 7), cpu_procs: int = 0, batch_size: int = 36,
              rendezvous: Rendezvous | None = None) -> DdpPlan:
    options = TrainerOptions(data=OPTIONS.data, cfg=OPTIONS.cfg, epochs=10, batch_size=batch_size, extra=OPTIONS.extra)
    return DdpPlan("r1", Path("/home/me/runs/train"), gpus, cpu_procs, options, rendezvous or Rendezvous())


def make_spec(plan: DdpPlan, user: str = "1000:1000"):
    staged = StagedInputs(plan.options, Path("/data/coco128"))
    return ddp_spec(plan, staged, "evolvectl:latest", user=user, limits=ContainerLimits("16g"), max_restarts=2)


# --- the container ----------------------------------------------------------------------------

def test_one_device_request_names_exactly_the_chosen_gpus() -> None:
    kwargs = make_spec(make_plan()).to_run_kwargs()
    [request] = kwargs["device_requests"]
    assert request["DeviceIDs"] == ["2", "5", "7"] and request["Count"] == 0
    assert request["Capabilities"] == [["gpu"]]


def test_name_labels_shm_restart_and_mounts() -> None:
    spec = make_spec(make_plan())
    assert spec.name == "evolvectl-r1-ddp"
    assert spec.labels == {"org.evolvectl.project": "evolvectl", "org.evolvectl.run": "r1",
                           "org.evolvectl.role": "ddp", "org.evolvectl.gpu": "2,5,7"}
    kwargs = spec.to_run_kwargs()
    assert kwargs["shm_size"] == "16g" and kwargs["init"] is True
    assert kwargs["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
    mounts = {mount.target: mount for mount in spec.mounts}
    assert mounts["/runs/train/r1"].source == "/home/me/runs/train/r1" and not mounts["/runs/train/r1"].read_only
    assert mounts["/datasets/coco128"].read_only
    assert "network_mode" not in kwargs  # one host: Docker's own network
    assert spec.environment["EVOLVECTL_GPUS"] == "2,5,7"


def test_gpu_command_is_the_trainer_on_devices_zero_to_n_resuming_its_own_checkpoint() -> None:
    spec = make_spec(make_plan())
    assert spec.entrypoint == ("sh", "-c", RESUME_SCRIPT, "/runs/train/r1/weights/last.pt")
    assert spec.command == (
        "python", "-m", "trainer", "--data", "/runs/train/r1/data.yaml", "--cfg", "yolov5s", "--epochs", "10",
        "--batch-size", "36", "--sync-bn", "--project", "/runs/train", "--name", "r1", "--exist-ok",
        "--device", "0,1,2")  # the container sees only its 3 GPUs; the trainer starts torchrun on a free port


def test_cpu_processes_run_under_torchrun_without_a_device_request() -> None:
    spec = make_spec(make_plan(gpus=(), cpu_procs=2, batch_size=8), user="1234:1234")
    kwargs = spec.to_run_kwargs()
    assert "device_requests" not in kwargs and spec.gpu_ids is None
    assert spec.command[:5] == ("python", "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone")
    assert spec.command[5:7] == ("-m", "trainer") and spec.command[-2:] == ("--device", "cpu")
    assert spec.entrypoint is not None and spec.entrypoint[:2] == ("sh", "-c")  # replaces the image's trainer
    assert spec.labels["org.evolvectl.gpu"] == "cpu"
    assert spec.environment["HOME"] == "/tmp" and int(spec.environment["OMP_NUM_THREADS"]) >= 1


def test_several_hosts_share_the_host_network_and_the_rendezvous() -> None:
    meeting = Rendezvous(nnodes=2, node_rank=1, master_addr="10.0.0.1")
    gpu_spec = make_spec(make_plan(gpus=(0, 1), batch_size=64, rendezvous=meeting))
    assert gpu_spec.to_run_kwargs()["network_mode"] == "host"
    assert gpu_spec.command[-8:] == ("--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                                     "--master-port", "29500")
    cpu_spec = make_spec(make_plan(gpus=(), cpu_procs=2, batch_size=8, rendezvous=meeting))
    assert cpu_spec.command[4:8] == ("--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500")


def test_run_kwargs_are_accepted_by_the_sdk() -> None:
    from docker.models.containers import _create_container_args

    kwargs = make_spec(make_plan(rendezvous=Rendezvous(2, 0, "10.0.0.1", 29400))).to_run_kwargs()
    create_args = _create_container_args({**kwargs, "version": "1.41"})
    assert create_args["host_config"]["NetworkMode"] == "host"
    assert create_args["host_config"]["DeviceRequests"][0]["DeviceIDs"] == ["2", "5", "7"]
    assert create_args["entrypoint"][:2] == ["sh", "-c"]


@pytest.mark.parametrize(("meeting", "message"), [
    (lambda: Rendezvous(nnodes=2, node_rank=2, master_addr="10.0.0.1"), "--node-rank 2: the hosts of --nnodes 2"),
    (lambda: Rendezvous(nnodes=2, node_rank=1), "--nnodes 2 needs --master-addr"),
])
def test_bad_rendezvous(meeting: Callable[[], Rendezvous], message: str) -> None:
    with pytest.raises(UserError, match=message):
        meeting()


@pytest.mark.parametrize(("exists", "expected"), [(True, "a b --resume {checkpoint}"), (False, "a b")])
def test_the_wrapper_resumes_only_from_an_existing_checkpoint(tmp_path: Path, exists: bool, expected: str) -> None:
    checkpoint = tmp_path / "last.pt"
    if exists:
        checkpoint.touch()
    result = subprocess.run(["sh", "-c", RESUME_SCRIPT, str(checkpoint), "echo", "a", "b"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == expected.format(checkpoint=checkpoint)


# --- checks before anything starts ----------------------------------------------------------

@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[FakeBackend]:
    """The backends the CLI opened: none, when a check fails first."""
    backends: list[FakeBackend] = []

    def open_backend(*args: object) -> FakeBackend:
        backends.append(FakeBackend([0, 1, 2]))
        return backends[-1]

    monkeypatch.setattr(launch, "open_backend", open_backend)
    monkeypatch.chdir(tmp_path)
    return backends


@pytest.mark.parametrize(("arguments", "message"), [
    (("--gpus", "0-2", "--batch-size", "16"),
     "--batch-size 16 is the total over 3 GPUs and must divide evenly: use a multiple of 3, e.g. 15"),
    (("--cpu-procs", "3"), "--batch-size 16 is the total over 3 CPU processes"),  # the trainer's default batch
    (("--gpus", "0,1", "--batch-size", "6", "--nnodes", "2", "--master-addr", "10.0.0.1"),
     "--batch-size 6 is the total over 2 GPUs on each of 2 hosts and must divide evenly: use a multiple of 4"),
    ((), "a DDP training runs on GPUs or on CPU: pass --gpus"),
    (("--gpus", "0", "--cpu-procs", "2"), "a DDP training runs on GPUs or on CPU"),
    (("--gpus", "0,1", "--nnodes", "2"), "--nnodes 2 needs --master-addr"),
])
def test_mistakes_are_refused_before_any_backend_is_opened(opened: list[FakeBackend], arguments: tuple[str, ...],
                                                          message: str) -> None:
    assert_one_line_error(invoke("ddp", *arguments), message)
    assert opened == []


def test_all_gpus_are_checked_once_known(opened: list[FakeBackend]) -> None:
    assert_one_line_error(invoke("ddp", "--gpus", "all", "--batch-size", "16"),
                          "--batch-size 16 is the total over 3 GPUs")
    assert opened[0].plans == []


def test_ddp_starts_one_job_and_records_the_run(opened: list[FakeBackend], tmp_path: Path) -> None:
    result = invoke("ddp", "--gpus", "1-2", "--batch-size", "8", "--epochs", "3", "--cos-lr", "--name", "big",
                    "--", "--optimizer", "AdamW")
    assert result.exit_code == 0, result.output
    [plan] = opened[0].plans
    assert plan.gpus == (1, 2) and plan.processes == 2
    assert plan.run_dir == (tmp_path / "runs" / "train" / "big").absolute()
    assert plan.options.training_arguments() == ["--data", "synthetic", "--epochs", "3", "--batch-size", "8",
                                                 "--cos-lr", "--optimizer", "AdamW"]
    record = LaunchRecord.load(plan.run_dir)
    assert record is not None and record.mode == DDP_MODE and record.workers == (DDP_KEY,)
    assert "evolvectl attach ddp --name big" in result.output and "evolvectl stop --name big" in result.output
    assert existing_run_dir(Path("runs/evolve"), None) == ("big", plan.run_dir)  # found under runs/train


def test_ddp_worker_key() -> None:
    assert parse_worker_key(" DDP ") == DDP_KEY


# --- progress and resume ----------------------------------------------------------------------

def write_training(run_dir: Path, epochs: int, maps: list[float]) -> None:
    """What the trainer leaves in its folder, written by its own writer."""
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "weights" / "last.pt").write_bytes(b"checkpoint")
    (run_dir / "opt.yaml").write_text(f"epochs: {epochs}\nbatch_size: 16\n")
    for epoch, value in enumerate(maps):
        row = [0.0] * len(RESULTS_COLUMNS)
        row[0], row[6], row[7] = epoch, 2 * value, value
        append_results(run_dir / "results.csv", row)


def test_status_of_a_training_is_its_epochs_and_map(tmp_path: Path) -> None:
    write_training(tmp_path, epochs=10, maps=[0.1, 0.3, 0.2])
    running = WorkerState(DDP_KEY, "evolvectl-r1-ddp", "running", 1, None,
                          "    4/10        3.1G   0.05  0.02  0.01  80  640 5/9\n")
    started = (tmp_path / "results.csv").stat().st_mtime - 30.0  # 3 epochs in 30 s
    report = collect_training_status("r1", tmp_path, "docker", [running], started=started)
    progress = report.progress
    assert (progress.epochs, progress.done, progress.best_epoch) == (10, 3, 2)
    assert progress.map == pytest.approx(0.2) and progress.best_map == pytest.approx(0.3)
    assert progress.eta_seconds == pytest.approx(70.0)
    assert report.workers[0].epoch == "4/10" and not budget_reached(report)
    text = render_to_text(report)
    assert "3/10 epochs (30%)" in text and "mAP50-95 0.2000" in text and "best mAP50-95 0.3000 (epoch 2)" in text
    assert "ETA 1m 10s" in text and "ddp" in text and "generations" not in text


def render_to_text(report: object) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_status(report))  # type: ignore[arg-type]
    return console.export_text()


def test_a_finished_training_is_refused_and_a_stopped_one_resumes(tmp_path: Path) -> None:
    assert trained_epochs("r1", tmp_path / "new") == 0
    write_training(tmp_path / "stopped", epochs=5, maps=[0.1, 0.2])
    assert trained_epochs("r1", tmp_path / "stopped") == 2
    write_training(tmp_path / "done", epochs=2, maps=[0.1, 0.2])
    with pytest.raises(UserError, match="run r1 already trained its 2 epochs"):
        trained_epochs("r1", tmp_path / "done")
    assert budget_reached(collect_training_status("r1", tmp_path / "done", "local", []))


# --- the processes of a job -------------------------------------------------------------------

FAKE_AGENT = """
import subprocess, sys, time
ranks = [subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"],
                          start_new_session=True) for _ in range(2)]
print(" ".join(str(rank.pid) for rank in ranks), flush=True)
time.sleep(60)
"""


def start_fake_job(folder: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """A stand-in `torchrun` script with two ranks in sessions of their own, each with a child."""
    script = folder / "torchrun"
    script.write_text(FAKE_AGENT)
    job = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert job.stdout is not None
    rank_pids = [int(pid) for pid in job.stdout.readline().split()]
    deadline = time.monotonic() + 10
    while len(ranks.descendants(job.pid, ranks.process_table())) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # the ranks' own children start a moment later
    return job, rank_pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_ranks_are_the_agents_children_and_only_they_get_the_signal(tmp_path: Path) -> None:
    job, rank_pids = start_fake_job(tmp_path)
    try:
        table = ranks.process_table()
        assert ranks.rank_processes(job.pid, table) == sorted(rank_pids)
        assert len(ranks.descendants(job.pid, table)) == 4
        assert ranks.signal_ranks(job.pid, signal.SIGTERM) == sorted(rank_pids)
        for pid in rank_pids:
            wait_gone(pid)
        assert job.poll() is None  # the agent itself was left alone
    finally:
        local._kill_group(job.pid)
        job.wait(timeout=10)


def wait_gone(pid: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and (Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_killing_a_local_job_reaches_ranks_in_their_own_sessions(tmp_path: Path) -> None:
    job, _ = start_fake_job(tmp_path)
    tree = ranks.descendants(job.pid, ranks.process_table())
    local._kill_group(job.pid)
    job.wait(timeout=10)
    for pid in tree:
        wait_gone(pid)


def test_process_table_reads_odd_command_names(tmp_path: Path) -> None:
    for pid, parent, argv in ((7, 1, [b"python", b"-m", b"torch.distributed.run"]),
                              (9, 7, [b"python", b"-m", b"trainer"]),
                              (11, 9, [b"python"]), (12, 1, [b"/usr/bin/python3", b"/usr/bin/torchrun"]),
                              (13, 12, [b"x"])):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (odd (name) here) S {parent} 1 1 0")
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    table = ranks.process_table(tmp_path)
    assert table[9] == ranks.ProcessInfo(7, ("python", "-m", "trainer"))
    assert ranks.rank_processes(1, table) == [9, 13]
    assert ranks.descendants(7, table) == [9, 11]


@pytest.mark.parametrize(("argv", "agent"), [
    (["python", "-u", "-X", "utf8", "-m", "torch.distributed.run", "--standalone", "-m", "trainer"], True),
    (["/venv/bin/torchrun", "--nproc_per_node=2", "train.py"], True),
    (["python3", "/usr/local/bin/torchrun", "train.py"], True),
    # The local supervisor carries the job's command line for its child: it is no agent itself.
    (["python", "-m", "orchestrator.backends.local.supervisor", "--", "sh", "-c", "exec", "x", "python", "-m",
      "torch.distributed.run"], False),
    (["python", "-c", "code", "-m", "torch.distributed.run"], False),
    (["python", "-m", "trainer", "--device", "0,1"], False),
])
def test_what_counts_as_a_torchrun_agent(argv: list[str], agent: bool) -> None:
    assert ranks.is_agent(argv) is agent


# --- a real job on this host ------------------------------------------------------------------

def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_local_job_stops_after_its_epoch_and_resumes(tiny_data: Path, tmp_path: Path) -> None:
    from orchestrator.runs.status import epochs_done, read_results

    project = tmp_path / "runs"
    run_dir = project / "job"
    where = ("--project", str(project), "--name", "job")
    start = ("ddp", "--backend", "local", "--cpu-procs", "2", "--data", str(tiny_data), "--imgsz", "64", "--epochs",
             "40", "--batch-size", "8", "--workers", "0", *where, "--", "--noautoanchor")
    backend = local.LocalBackend(project)
    log = run_dir / "workers" / "ddp.log"
    try:
        started = invoke(*start)
        assert started.exit_code == 0 and "DDP training started (2 processes)" in started.output, started.output
        wait_for(lambda: len(read_results(run_dir)) >= 1, 240, "the first epoch")
        stopping = invoke("stop", *where)
        assert "the training finishes its current epoch" in stopping.output, stopping.output
        wait_for(lambda: backend.workers("job", run_dir)[0].state == "exited", 120, "the job to stop")
        assert backend.workers("job", run_dir)[0].exit_code == 0
        text = log.read_text()
        assert "batch 8 (4 per process × 2)" in text and "Stopped after epoch" in text
        assert text.count("Results saved to") == 1  # rank 0 only
        done = epochs_done(read_results(run_dir))
        assert 1 <= done < 40 and (run_dir / "weights" / "last.pt").is_file()
        assert f"{done}/40 epochs" in invoke("status", *where).output

        resumed = invoke(*start)
        assert f"resuming after epoch {done}" in resumed.output, resumed.output
        wait_for(lambda: f"Resuming from epoch {done + 1} of 40" in log.read_text(), 240, "the resumed job")
        assert "killed ddp" in invoke("stop", "--now", *where).output
    finally:
        removed = invoke("kill-all", "--backend", "local", "--project", str(project))
    assert "removed 1 worker(s)" in removed.output
