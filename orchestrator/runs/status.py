"""What every worker of a run is doing and how far the run is, collected as data.

Collecting reads the run folder's journal (budget, leases, rows, provenance timings) and
what the backend says about its workers; `orchestrator.cli.render` draws it. A DDP training
has no journal: its progress is the trainer's results.csv (one row per epoch) against the
epochs in its opt.yaml.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from orchestrator.evolution.journal import Journal
from orchestrator.evolution.leases import load_state
from trainer.errors import CannotWrite
from trainer.results import ValidationResult

# States in which a worker is (or is about to be) training.
ACTIVE_STATES = ("running", "restarting", "starting")
# How many recent generations the ETA averages over: recent ones reflect the current load.
ETA_WINDOW = 20
# The trainer's plain (non-terminal) progress line starts with "<epoch>/<epochs>  <memory>G".
_EPOCH_LINE = re.compile(r"^\s*(\d+)/(\d+)\s+[\d.]+G\s", re.MULTILINE)
# What the trainer writes into a training's folder: one row per epoch, and the options it runs with.
RESULTS_NAME = "results.csv"
OPTIONS_NAME = "opt.yaml"
MAP50_COLUMN = ValidationResult.column("map50")
MAP_COLUMN = ValidationResult.column("map")


@dataclass(frozen=True)
class WorkerState:
    """What a backend knows about one worker (a container or a local process)."""

    key: str  # gpu3, cpu0
    worker_id: str  # the name it records in the journal
    state: str  # running, restarting, starting, exited, dead, created, ...
    restarts: int = 0
    exit_code: int | None = None
    log_tail: str = ""  # the end of its output: while it runs, and after it failed
    error: str | None = None  # why the platform holds or dropped it before it ran (a Swarm task no node takes)
    limits: str = ""  # what its container may use beyond the defaults: "memory 20g, 4 CPUs"
    node: str = ""  # the Swarm node (hostname) its latest task was placed on; empty on other backends


@dataclass(frozen=True)
class WorkerRow:
    key: str
    state: str
    restarts: int
    exit_code: int | None
    generation: int | None  # the claim it trains now
    epoch: str | None  # "3/10"
    results: int  # rows it added to evolve.csv
    last_fitness: float | None
    best_fitness: float | None
    error: str | None = None  # why a worker that exited non-zero stopped: its last `Error:` line
    limits: str = ""  # its container's memory and CPU limits, if any
    node: str = ""  # the Swarm node it runs (or last ran) on


@dataclass(frozen=True)
class RunProgress:
    run: str
    run_dir: Path
    generations: int | None  # the budget; None before any worker prepared the run
    done: int  # generations that count toward the budget (results and given-up slots)
    failed_attempts: int
    in_flight: int
    best_fitness: float | None
    best_generation: int | None
    seconds_per_generation: float | None
    eta_seconds: float | None
    stop_requested: bool
    search: str | None = None
    pruned: int | None = None  # generations stopped at a rung; None when the run does not prune
    hours_left: float | None = None  # of the run's time budget, if it has one


@dataclass(frozen=True)
class TrainingProgress:
    """How far one DDP training is."""

    run: str
    run_dir: Path
    epochs: int | None  # planned; None until the trainer wrote opt.yaml
    done: int  # epochs in results.csv
    map50: float | None  # of the last epoch
    map: float | None
    best_map: float | None
    best_epoch: int | None  # counted from 1, as the trainer prints epochs
    eta_seconds: float | None


@dataclass(frozen=True)
class StatusReport:
    backend: str
    progress: RunProgress | TrainingProgress
    workers: tuple[WorkerRow, ...]


def stop_reason(worker: WorkerState) -> str | None:
    """For a worker that exited (or is restarting) with a non-zero code: the last one-line
    `Error: ...` it printed (a full disk, a bad input), if any. For one the platform could not
    start (no node fits, a mount is missing): the platform's reason."""
    if worker.state == "running":
        return None
    if worker.error:
        return worker.error
    if worker.exit_code in (0, None):
        return None
    errors = [line for line in worker.log_tail.splitlines() if line.startswith("Error: ")]
    if errors:
        return errors[-1].removeprefix("Error: ")
    if worker.exit_code == CannotWrite.exit_code:  # its log may be on the disk that is full
        return "cannot write (a full or read-only disk): free space or make the run folder writable, then start again"
    return None


def current_epoch(log_tail: str) -> str | None:
    """The last `epoch/epochs` the trainer printed, e.g. '3/10'."""
    matches = _EPOCH_LINE.findall(log_tail)
    return f"{matches[-1][0]}/{matches[-1][1]}" if matches else None


def estimate_eta(remaining: int, seconds: Sequence[float], active_workers: int) -> float | None:
    """Seconds until the budget is met, from the mean duration of recent generations."""
    if remaining <= 0:
        return 0.0
    if not seconds or active_workers <= 0:
        return None
    mean = float(np.mean(seconds[-ETA_WINDOW:]))
    return math.ceil(remaining / active_workers) * mean


def collect_status(run: str, run_dir: Path, backend: str, workers: Sequence[WorkerState]) -> StatusReport:
    """Join the backend's view of the workers with what the journal says about them."""
    journal = Journal(run_dir)
    state = load_state(journal)
    population = journal.read_population()
    fitness = population.fitness
    records = journal.read_records()
    ok_records = [record for record in records if record.get("status") == "ok"]
    rows: list[WorkerRow] = []
    for worker in workers:
        mine = [record["row"] for record in ok_records if record.get("worker") == worker.worker_id]
        values = [float(fitness[row]) for row in mine if row < len(fitness) and np.isfinite(fitness[row])]
        claims = [lease.claim for lease in state.leases.values() if lease.worker == worker.worker_id] if state else []
        training = bool(claims) and worker.state == "running"  # a worker without a lease waits for a slot
        rows.append(WorkerRow(
            key=worker.key,
            state=worker.state,
            restarts=worker.restarts,
            exit_code=worker.exit_code,
            generation=max(claims) if training else None,
            epoch=current_epoch(worker.log_tail) if training else None,
            results=len(mine),
            last_fitness=values[-1] if values else None,
            best_fitness=max(values) if values else None,
            error=stop_reason(worker),
            limits=worker.limits,
            node=worker.node,
        ))
    best = population.best_row()
    done = state.done(len(population)) if state else 0
    generations = state.generations if state else None
    active = sum(worker.state in ACTIVE_STATES for worker in workers)
    finished = [record for record in records if record.get("status") in ("ok", "pruned")]
    seconds = [float(record["seconds"]) for record in finished if "seconds" in record]
    progress = RunProgress(
        run=run,
        run_dir=run_dir,
        generations=generations,
        done=done,
        failed_attempts=sum(record.get("status") == "failed" for record in records),
        in_flight=len(state.leases) if state else 0,
        best_fitness=float(population.pooled()[0][best]) if best is not None else None,
        best_generation=best,
        seconds_per_generation=float(np.mean(seconds[-ETA_WINDOW:])) if seconds else None,
        eta_seconds=estimate_eta(generations - done, seconds, active) if generations is not None else None,
        stop_requested=journal.stop_requested(),
        search=state.search if state else None,
        pruned=state.pruned_slots if state and state.pruning else None,
        hours_left=(state.created + state.hours * 3600 - time.time()) / 3600 if state and state.hours else None,
    )
    return StatusReport(backend, progress, tuple(rows))


def read_results(run_dir: Path) -> list[dict[str, float]]:
    """The rows of a training's results.csv, by column name; a half-written last line is left out."""
    try:
        lines = (run_dir / RESULTS_NAME).read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return []
    complete = [line for line in lines if line.endswith("\n")]
    if not complete:
        return []
    names = [name.strip() for name in complete[0].split(",")]
    rows = []
    for line in complete[1:]:
        cells = line.split(",")
        try:
            values = [float(cell) for cell in cells]
        except ValueError:
            continue  # a second header, from a training started over in the same folder
        if len(values) == len(names):
            rows.append(dict(zip(names, values, strict=True)))
    return rows


def planned_epochs(run_dir: Path) -> int | None:
    """The epochs the trainer was asked for, from the opt.yaml it writes when it starts."""
    try:
        options = yaml.safe_load((run_dir / OPTIONS_NAME).read_text())
    except (FileNotFoundError, yaml.YAMLError):
        return None
    epochs = options.get("epochs") if isinstance(options, dict) else None
    return epochs if isinstance(epochs, int) else None


def epochs_done(rows: Sequence[dict[str, float]]) -> int:
    """The last epoch's number (a resumed run may repeat the epoch it crashed in), counted from 1."""
    return int(rows[-1]["epoch"]) + 1 if rows else 0


def collect_training_status(run: str, run_dir: Path, backend: str, workers: Sequence[WorkerState],
                            started: float | None = None, start_epoch: int = 0) -> StatusReport:
    """A DDP training's progress from its results.csv; the ETA from the epochs trained since `started`."""
    rows = read_results(run_dir)
    done, epochs = epochs_done(rows), planned_epochs(run_dir)
    maps = [row.get(MAP_COLUMN, 0.0) for row in rows]
    best = int(np.argmax(maps)) if maps else None
    eta = None
    trained = done - start_epoch
    if started is not None and epochs is not None and trained > 0:
        seconds_per_epoch = ((run_dir / RESULTS_NAME).stat().st_mtime - started) / trained
        eta = max(epochs - done, 0) * max(seconds_per_epoch, 0.0)
    progress = TrainingProgress(
        run=run, run_dir=run_dir, epochs=epochs, done=done,
        map50=rows[-1].get(MAP50_COLUMN) if rows else None, map=maps[-1] if maps else None,
        best_map=maps[best] if best is not None else None,
        best_epoch=int(rows[best]["epoch"]) + 1 if best is not None else None,
        eta_seconds=eta,
    )
    worker_rows = tuple(
        WorkerRow(key=worker.key, state=worker.state, restarts=worker.restarts, exit_code=worker.exit_code,
                  generation=None, epoch=current_epoch(worker.log_tail) if worker.state == "running" else None,
                  results=done, last_fitness=None, best_fitness=None, error=stop_reason(worker),
                  limits=worker.limits, node=worker.node)
        for worker in workers
    )
    return StatusReport(backend, progress, worker_rows)


def budget_reached(report: StatusReport) -> bool:
    progress = report.progress
    if isinstance(progress, TrainingProgress):
        return progress.epochs is not None and progress.done >= progress.epochs
    return progress.generations is not None and progress.done >= progress.generations


def all_exited(report: StatusReport) -> bool:
    return all(row.state not in ACTIVE_STATES for row in report.workers)
