"""`evolvectl status`: what every worker is doing and how far the run is, as data, then as a table.

Collecting reads the run folder's journal (budget, leases, rows, provenance timings) and
what the backend says about its workers; rendering is a pure function of the dataclasses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from orchestrator.journal import Journal
from orchestrator.leases import load_state

# States in which a worker is (or is about to be) training.
ACTIVE_STATES = ("running", "restarting", "starting")
# How many recent generations the ETA averages over: recent ones reflect the current load.
ETA_WINDOW = 20
# The trainer's plain (non-terminal) progress line starts with "<epoch>/<epochs>  <memory>G".
_EPOCH_LINE = re.compile(r"^\s*(\d+)/(\d+)\s+[\d.]+G\s", re.MULTILINE)


@dataclass(frozen=True)
class WorkerState:
    """What a backend knows about one worker (a container or a local process)."""

    key: str  # gpu3, cpu0
    worker_id: str  # the name it records in the journal
    state: str  # running, restarting, starting, exited, dead, created, ...
    restarts: int = 0
    exit_code: int | None = None
    log_tail: str = ""


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


@dataclass(frozen=True)
class StatusReport:
    backend: str
    progress: RunProgress
    workers: tuple[WorkerRow, ...]


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
        ))
    best = population.best_row()
    done = state.done(len(population)) if state else 0
    generations = state.generations if state else None
    active = sum(worker.state in ACTIVE_STATES for worker in workers)
    seconds = [float(record["seconds"]) for record in ok_records if "seconds" in record]
    progress = RunProgress(
        run=run,
        run_dir=run_dir,
        generations=generations,
        done=done,
        failed_attempts=sum(record.get("status") == "failed" for record in records),
        in_flight=len(state.leases) if state else 0,
        best_fitness=float(fitness[best]) if best is not None else None,
        best_generation=best,
        seconds_per_generation=float(np.mean(seconds[-ETA_WINDOW:])) if seconds else None,
        eta_seconds=estimate_eta(generations - done, seconds, active) if generations is not None else None,
        stop_requested=journal.stop_requested(),
    )
    return StatusReport(backend, progress, tuple(rows))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def _fitness(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _state_text(row: WorkerRow) -> Text:
    style = {"running": "green", "restarting": "yellow", "starting": "yellow"}.get(row.state, "")
    label = row.state
    if row.exit_code is not None and row.state not in ACTIVE_STATES:
        label = f"{row.state} ({row.exit_code})"
        style = "dim" if row.exit_code == 0 else "red"
    return Text(label, style=style)


def render_workers(rows: Sequence[WorkerRow]) -> Table:
    table = Table(box=None, header_style="bold")
    for name, justify in (("worker", "left"), ("state", "left"), ("restarts", "right"), ("gen", "right"),
                          ("epoch", "right"), ("results", "right"), ("last fitness", "right"),
                          ("best fitness", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            row.key,
            _state_text(row),
            str(row.restarts),
            "-" if row.generation is None else str(row.generation),
            row.epoch or "-",
            str(row.results),
            _fitness(row.last_fitness),
            _fitness(row.best_fitness),
        )
    return table


def render_progress(progress: RunProgress) -> Text:
    """One line: done / budget, failures, best fitness and the ETA."""
    if progress.generations is None:
        return Text(f"run {progress.run}: waiting for the first worker to prepare {progress.run_dir}")
    share = min(progress.done / progress.generations, 1.0)
    parts = [
        f"{progress.done}/{progress.generations} generations ({share:.0%})",
        f"{progress.in_flight} in flight",
        f"{progress.failed_attempts} failed attempt{'s' if progress.failed_attempts != 1 else ''}",
    ]
    if progress.best_fitness is not None:
        parts.append(f"best fitness {progress.best_fitness:.4f} (generation {progress.best_generation})")
    if progress.done >= progress.generations:
        parts.append("budget reached")
    else:
        parts.append(f"ETA {format_duration(progress.eta_seconds)}")
    text = Text(f"run {progress.run}: ", style="bold") + Text(" · ".join(parts))
    if progress.stop_requested and progress.done < progress.generations:
        text += Text("\nstop requested: workers exit after their current generation", style="yellow")
    return text


def render_status(report: StatusReport) -> RenderableType:
    """The whole status view: the progress line, then one row per worker."""
    header = Text(f"{report.backend} workers of {report.progress.run_dir}", style="dim")
    if not report.workers:
        return Group(render_progress(report.progress), header, Text("no workers", style="yellow"))
    return Group(render_progress(report.progress), header, render_workers(report.workers))


def budget_reached(report: StatusReport) -> bool:
    progress = report.progress
    return progress.generations is not None and progress.done >= progress.generations


def all_exited(report: StatusReport) -> bool:
    return all(row.state not in ACTIVE_STATES for row in report.workers)
