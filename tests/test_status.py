"""The status model and its rendering: pure functions of dataclasses, and the journal they are read from."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from orchestrator.cli.render import format_duration, render_status
from orchestrator.evolution.journal import Journal
from orchestrator.evolution.leases import (
    Offer,
    WorkerIdentity,
    load_state,
    save_state,
    start_lease,
)
from orchestrator.evolution.loop import GenerationContext, run_worker
from orchestrator.evolution.search_space import SearchSpace
from orchestrator.runs.status import (
    RunProgress,
    StatusReport,
    WorkerRow,
    WorkerState,
    all_exited,
    collect_status,
    current_epoch,
    estimate_eta,
)
from trainer.config import Hyp
from trainer.results import ValidationResult

TRAINER_LOG = """\
Generation 4 (attempt 1, mutation): training 3 epochs
      Epoch  GPU_mem  box_loss  obj_loss  cls_loss Instances   Size
    1/3         1.2G    0.1612  0.004671   0.05309        41    640 4/4
    2/3         1.2G     0.161  0.004629   0.05296        37    640 2/4
                 all P 0.000  R 0.000  mAP50 0.000  mAP50-95 0.000
"""


def text_of(report: StatusReport) -> str:
    console = Console(width=160, record=True, color_system=None)
    console.print(render_status(report))
    return console.export_text()


def progress(**changes: object) -> RunProgress:
    values: dict[str, object] = {
        "run": "r1", "run_dir": Path("/runs/r1"), "generations": 6, "done": 3, "failed_attempts": 1, "in_flight": 2,
        "best_fitness": 0.12345, "best_generation": 2, "seconds_per_generation": 15.0, "eta_seconds": 45.0,
        "stop_requested": False,
    }
    values.update(changes)
    return RunProgress(**values)  # type: ignore[arg-type]


def worker_row(key: str, state: str, **changes: object) -> WorkerRow:
    values: dict[str, object] = {"key": key, "state": state, "restarts": 0, "exit_code": None, "generation": None,
                                 "epoch": None, "results": 0, "last_fitness": None, "best_fitness": None}
    values.update(changes)
    return WorkerRow(**values)  # type: ignore[arg-type]


def test_current_epoch_is_the_last_progress_line() -> None:
    assert current_epoch(TRAINER_LOG) == "2/3"
    assert current_epoch("Generation 4 (attempt 1, mutation): training 3 epochs\n") is None
    assert current_epoch("") is None


def test_eta_divides_the_remaining_generations_among_the_active_workers() -> None:
    assert estimate_eta(6, [10.0, 20.0], 2) == 45.0  # 3 rounds of 15 s
    assert estimate_eta(5, [10.0, 20.0], 2) == 45.0  # a partial round still takes a whole generation
    assert estimate_eta(0, [10.0], 1) == 0.0
    assert estimate_eta(-2, [], 0) == 0.0  # budget lowered below what is done
    assert estimate_eta(4, [], 2) is None  # nothing timed yet
    assert estimate_eta(4, [10.0], 0) is None  # nobody is working on it
    recent = [1000.0] + [10.0] * 20  # only the 20 most recent generations count
    assert estimate_eta(2, recent, 1) == 20.0


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 0, 45.4, 125, 3725)] == ["unknown", "0s", "45s", "2m 05s", "1h 02m"]


def test_render_status_shows_every_worker_and_the_run() -> None:
    report = StatusReport("docker", progress(), (
        worker_row("gpu0", "running", restarts=1, generation=7, epoch="2/3", results=2, last_fitness=0.1,
                   best_fitness=0.12345),
        worker_row("gpu1", "exited", exit_code=137, results=1, last_fitness=0.05, best_fitness=0.05),
    ))
    text = text_of(report)
    assert "run r1: 3/6 generations (50%) · 2 in flight · 1 failed attempt · best fitness 0.1235 (generation 2)" \
           " · ETA 45s" in text
    assert "docker workers of /runs/r1" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip().startswith("gpu")}
    assert lines["gpu0"] == ["gpu0", "running", "1", "7", "2/3", "2", "0.1000", "0.1235"]
    assert lines["gpu1"] == ["gpu1", "exited", "(137)", "0", "-", "-", "1", "0.0500", "0.0500"]
    assert not all_exited(report)


def test_render_status_names_the_node_of_each_swarm_worker() -> None:
    report = StatusReport("swarm", progress(), (worker_row("cpu0", "running", node="server2"),
                                                worker_row("cpu1", "starting"),  # not placed yet
                                                worker_row("cpu2", "running", node="server1"),
                                                worker_row("cpu3", "running", node="server2")))
    assert "nodes: server1: cpu2 · server2: cpu0, cpu3\n" in text_of(report)
    assert "nodes:" not in text_of(StatusReport("docker", progress(), (worker_row("cpu0", "running"),)))


def test_render_status_when_done_stopping_or_not_started() -> None:
    finished = (worker_row("cpu0", "exited", exit_code=0),)
    done = text_of(StatusReport("local", progress(done=6, eta_seconds=0.0), finished))
    assert "6/6 generations (100%)" in done and "budget reached" in done and "ETA" not in done
    stopping = text_of(StatusReport("local", progress(stop_requested=True), ()))
    assert "stop requested: workers exit after their current generation" in stopping and "no workers" in stopping
    waiting = text_of(StatusReport("local", progress(generations=None, done=0), ()))
    assert "waiting for the first worker to prepare /runs/r1" in waiting


def smooth(hyp: Hyp, context: GenerationContext) -> ValidationResult:
    score = math.exp(-(((hyp.lr0 - 0.02) / 0.02) ** 2))
    return ValidationResult(score, score, score, 0.5 * score, 1 - score, 1 - score, 0.1)


def test_collect_status_joins_the_journal_with_the_workers(tmp_path: Path) -> None:
    run_dir = tmp_path / "r1"
    for worker_id, generations in (("evolvectl-r1-cpu0", 3), ("evolvectl-r1-cpu1", 5)):
        run_worker(run_dir, Hyp(), SearchSpace.load(), generations, smooth, worker_id, seed=0, plot_interval=None)
    journal = Journal(run_dir)
    with journal.locked():  # cpu1 is training claim 9 right now
        state = load_state(journal)
        start_lease(state, Offer(9, 1, None, [], "mutation"), {}, [], WorkerIdentity("evolvectl-r1-cpu1"),
                    time.time(), ttl=60.0)
        save_state(journal, state)
    workers = [
        WorkerState("cpu0", "evolvectl-r1-cpu0", "exited", restarts=2, exit_code=0),
        WorkerState("cpu1", "evolvectl-r1-cpu1", "running", log_tail=TRAINER_LOG),
        WorkerState("cpu2", "evolvectl-r1-cpu2", "running", log_tail=TRAINER_LOG),  # waits: holds no lease
    ]
    report = collect_status("r1", run_dir, "local", workers)
    population = Journal(run_dir).read_population()
    fitness = 0.1 * population.results[:, 2] + 0.9 * population.results[:, 3]
    assert report.progress.generations == 5 and report.progress.done == 5 and report.progress.in_flight == 1
    assert report.progress.best_fitness == np.max(fitness)
    assert report.progress.best_generation == int(np.argmax(fitness))
    assert report.progress.eta_seconds == 0.0 and report.progress.seconds_per_generation is not None
    cpu0, cpu1, cpu2 = report.workers
    assert (cpu0.results, cpu0.restarts, cpu0.exit_code, cpu0.epoch) == (3, 2, 0, None)
    assert cpu0.best_fitness == np.max(fitness[:3]) and cpu0.last_fitness == fitness[2]
    assert (cpu1.results, cpu1.generation, cpu1.epoch, cpu1.last_fitness) == (2, 9, "2/3", fitness[4])
    assert (cpu2.results, cpu2.best_fitness, cpu2.generation, cpu2.epoch) == (0, None, None, None)


def test_a_worker_that_stopped_on_an_error_says_why(tmp_path: Path) -> None:
    run_dir = tmp_path / "r1"
    run_worker(run_dir, Hyp(), SearchSpace.load(), 1, smooth, "evolvectl-r1-cpu0", seed=0, plot_interval=None)
    full = "Error: cannot write /runs/r1/claims.json: No space left on device (ENOSPC); free space there"
    workers = [
        WorkerState("cpu0", "evolvectl-r1-cpu0", "exited", exit_code=74, log_tail=f"Epoch 1/3\n{full}\n"),
        WorkerState("cpu1", "evolvectl-r1-cpu1", "restarting", restarts=1, exit_code=1, log_tail="Traceback ...\n"),
        WorkerState("cpu2", "evolvectl-r1-cpu2", "exited", exit_code=0, log_tail="Error: an old line\n"),
        WorkerState("cpu3", "evolvectl-r1-cpu3", "exited", exit_code=74),  # its log was on the full disk
    ]
    report = collect_status("r1", run_dir, "local", workers)
    assert [row.error for row in report.workers][:3] == [full.removeprefix("Error: "), None, None]
    assert report.workers[3].error.startswith("cannot write (a full or read-only disk)")
    console = Console(width=200, record=True)
    console.print(render_status(report))
    assert f"cpu0 stopped: {full.removeprefix('Error: ')}" in console.export_text()


def test_collect_status_before_any_worker_wrote(tmp_path: Path) -> None:
    report = collect_status("r1", tmp_path, "docker", [WorkerState("gpu0", "evolvectl-r1-gpu0", "running")])
    assert report.progress.generations is None and report.progress.done == 0
    assert report.workers[0].results == 0
