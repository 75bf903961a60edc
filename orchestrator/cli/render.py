"""Rich renderings of a run, as pure functions of the dataclasses that `runs.status` collects
and of the journal's population: the status view, the progress line, the results table."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from orchestrator.evolution.journal import Population
from orchestrator.evolution.leases import RunState
from orchestrator.evolution.proposals import UnitSpace
from orchestrator.evolution.search_space import SearchSpace
from orchestrator.runs.names import DDP_KEY
from orchestrator.runs.status import (
    ACTIVE_STATES,
    RunProgress,
    StatusReport,
    TrainingProgress,
    WorkerRow,
)
from trainer.config import Hyp


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
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
    if rows and all(row.key == DDP_KEY for row in rows):
        return _render_training_workers(table, rows)
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


def _render_training_workers(table: Table, rows: Sequence[WorkerRow]) -> Table:
    """A DDP job's worker: no generations or fitness, just its state and the epoch it trains."""
    for name, justify in (("worker", "left"), ("state", "left"), ("restarts", "right"), ("epoch", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(row.key, _state_text(row), str(row.restarts), row.epoch or "-")
    return table


def render_training_progress(progress: TrainingProgress) -> Text:
    """One line: epochs done / planned, the last and best mAP, and the ETA."""
    if progress.epochs is None:
        return Text(f"run {progress.run}: waiting for the training to start in {progress.run_dir}")
    parts = [f"{progress.done}/{progress.epochs} epochs ({min(progress.done / progress.epochs, 1.0):.0%})"]
    if progress.map is not None:
        parts.append(f"mAP50 {progress.map50 or 0.0:.4f} · mAP50-95 {progress.map:.4f}")
        parts.append(f"best mAP50-95 {progress.best_map:.4f} (epoch {progress.best_epoch})")
    parts.append("training finished" if progress.done >= progress.epochs
                 else f"ETA {format_duration(progress.eta_seconds)}")
    return Text(f"run {progress.run}: ", style="bold") + Text(" · ".join(parts))


def render_progress(progress: RunProgress | TrainingProgress) -> Text:
    """One line: done / budget, failures, best fitness and the ETA."""
    if isinstance(progress, TrainingProgress):
        return render_training_progress(progress)
    if progress.generations is None:
        return Text(f"run {progress.run}: waiting for the first worker to prepare {progress.run_dir}")
    share = min(progress.done / progress.generations, 1.0)
    parts = [
        f"{progress.done}/{progress.generations} generations ({share:.0%})",
        f"{progress.in_flight} in flight",
        f"{progress.failed_attempts} failed attempt{'s' if progress.failed_attempts != 1 else ''}",
    ]
    if progress.pruned is not None:
        parts.append(f"{progress.pruned} pruned")
    if progress.best_fitness is not None:
        parts.append(f"best fitness {progress.best_fitness:.4f} (generation {progress.best_generation})")
    if progress.hours_left is not None:
        parts.append("time budget spent" if progress.hours_left <= 0
                     else f"{format_duration(progress.hours_left * 3600)} of the time budget left")
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
    limits = sorted({row.limits for row in report.workers if row.limits})
    header = Text(f"{report.backend} workers of {report.progress.run_dir}"
                  + (f", each limited to {'; '.join(limits)}" if limits else ""), style="dim")
    if not report.workers:
        return Group(render_progress(report.progress), header, Text("no workers", style="yellow"))
    reasons = [Text(f"{row.key} {'waits' if row.state in ACTIVE_STATES else 'stopped'}: {row.error}", style="red")
               for row in report.workers if row.error]
    nodes = render_nodes(report.workers)
    return Group(render_progress(report.progress), header, render_workers(report.workers), *nodes, *reasons)


def render_nodes(rows: Sequence[WorkerRow]) -> list[Text]:
    """Which Swarm node each worker is on, by node, as one line under the table (a column would push
    the table past 80 characters); none for the other backends."""
    by_node: dict[str, list[str]] = {}
    for row in rows:
        if row.node:
            by_node.setdefault(row.node, []).append(row.key)
    if not by_node:
        return []
    return [Text("nodes: " + " · ".join(f"{node}: {', '.join(keys)}" for node, keys in sorted(by_node.items())),
                 style="dim")]


def summary_table(population: Population, base_hyp: Hyp, top: int = 5, space: SearchSpace | None = None) -> Table:
    """The `top` fittest rows with the hyperparameters that differ from the base hyp, those that
    moved furthest across their range in `space` (the bundled one by default) first."""
    moved = _moved_share(population.hyp_keys, base_hyp, space or SearchSpace.load())
    fitness, trainings = population.pooled()
    ranked = [int(row) for row in population.ranked()[:top]]
    base = base_hyp.as_dict(include_unset=True)
    table = Table(title=f"Top {len(ranked)} of {len(population)} generations")
    for name in ("rank", "generation", "fitness", "mAP@0.5", "mAP@0.5:0.95"):
        table.add_column(name, justify="right")
    table.add_column("changed from base")
    for rank, row in enumerate(ranked, start=1):
        table.add_row(
            str(rank),
            str(row),
            f"{fitness[row]:.4f}" + (f" (mean of {trainings[row]})" if trainings[row] > 1 else ""),
            f"{population.results[row, 2]:.4f}",
            f"{population.results[row, 3]:.4f}",
            _largest_changes(population.hyp_at(row), base, moved),
        )
    return table


def search_summary(population: Population, records: Sequence[dict[str, Any]], state: RunState | None) -> list[str]:
    """How the search did: its algorithm, pruned generations, and the best row against the base hyp's."""
    lines = []
    if state is not None:
        pruned = sum(record.get("status") == "pruned" for record in records)
        pruning = f", {pruned} generation(s) pruned early" if state.pruning else ", pruning off"
        lines.append(f"search: {state.search}{pruning}")
    base_rows = [record["row"] for record in records if record.get("status") == "ok" and record.get("source") == "base"]
    best = population.best_row()
    if base_rows and best is not None and base_rows[0] < len(population):
        pooled, trainings = population.pooled()
        base_fitness, best_fitness = float(pooled[base_rows[0]]), float(pooled[best])
        lines.append(f"best fitness {best_fitness:.4f}{_trainings(trainings[best])} (generation {best}) against "
                     f"the base hyp's {base_fitness:.4f}{_trainings(trainings[base_rows[0]])} (generation "
                     f"{base_rows[0]}): {best_fitness - base_fitness:+.4f}")
    return lines


def _trainings(count: int) -> str:
    return f", mean of {count} trainings" if count > 1 else ""


def _moved_share(keys: Sequence[str], base_hyp: Hyp, space: SearchSpace) -> Callable[[str, float], float]:
    """How far a gene's value is from the base hyp's, as a share of its search range (on the log
    scale where the search uses one): lr0 0.01 → 0.003 counts as far as mosaic 1.0 → 0.7."""
    units = UnitSpace.from_bounds(*space.bounds(keys))
    base = base_hyp.as_dict(include_unset=True)
    index = {key: column for column, key in enumerate(keys)}

    def share(key: str, value: float) -> float:
        column = index.get(key)
        if column is None or not units.evolving[column] or base.get(key) is None:
            return -1.0  # a gene the space does not evolve, or one the base hyp leaves unset: listed last
        values = np.zeros(len(keys))
        values[column] = value
        moved = units.to_unit(values)[column]
        values[column] = base[key]
        return float(abs(moved - units.to_unit(values)[column]))

    return share


def _largest_changes(hyp: dict[str, float], base: dict[str, float | None],
                     moved: Callable[[str, float], float], shown: int = 4) -> str:
    """The few keys that moved furthest from the base across their search range (all are in hyp_evolve.yaml)."""
    changed = {
        key: value for key, value in hyp.items()
        if base.get(key) is None or not math.isclose(value, base[key], rel_tol=1e-4, abs_tol=1e-9)
    }
    if not changed:
        return "(base hyp)"
    ordered = sorted(changed, key=lambda key: moved(key, changed[key]), reverse=True)
    text = ", ".join(f"{key} {_number(base.get(key))} → {_number(changed[key])}" for key in ordered[:shown])
    return text + (f" (+{len(ordered) - shown} more)" if len(ordered) > shown else "")


def _number(value: float | None) -> str:
    return "unset" if value is None else f"{value:.5g}"
