"""What the CLI shows over time: image build progress, a run followed live, and its results."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.status import Status

from orchestrator.cli.render import (
    render_progress,
    render_status,
    render_workers,
    search_summary,
    summary_table,
)
from orchestrator.evolution import artifacts
from orchestrator.evolution.journal import Journal
from orchestrator.evolution.leases import load_state
from orchestrator.evolution.search_space import SearchSpace
from orchestrator.runs.record import LaunchRecord
from orchestrator.runs.status import StatusReport, all_exited
from trainer.config import Hyp
from trainer.paths import resolve_config

DEFAULT_HYP = "hyp.scratch-low"


def show_build_progress(console: Console, spinner: Status) -> Callable[[str], None]:
    """A callback for the image builder's output: each step printed, the spinner naming the current one."""

    def progress(text: str) -> None:
        for line in text.splitlines():
            if line.startswith("Step "):
                spinner.update(f"building the worker image: {line.strip()}")
                console.print(line.strip(), style="dim")
            elif line.startswith("building image"):
                console.print(line)

    return progress


def follow_run(
    console: Console, report: Callable[[], StatusReport], until_exited: bool, interval: float = 2.0
) -> StatusReport:
    """Show the run's status as it changes; until every worker exited, or Ctrl-C (which only detaches).

    A terminal gets a live table; a pipe or a log file gets the progress line when it changes,
    and the table once at the end.
    """
    current = report()
    try:
        if console.is_terminal:
            with Live(render_status(current), console=console, auto_refresh=False) as live:
                while not (until_exited and all_exited(current)):
                    time.sleep(interval)
                    current = report()
                    live.update(render_status(current), refresh=True)
            return current
        last_line = None
        while True:
            line = render_progress(current.progress).plain
            if line != last_line:
                console.print(line)
                last_line = line
            if until_exited and all_exited(current):
                break
            time.sleep(interval)
            current = report()
        console.print(render_workers(current.workers))  # the progress line is already out
    except KeyboardInterrupt:
        if until_exited:
            console.print("\ndetached: the workers keep running (`evolvectl stop` ends them)", style="yellow")
    return current


def print_results(console: Console, run: str, run_dir: Path, top: int = 5) -> None:
    """The top generations, where the best hyp YAML is, and freshly drawn plots."""
    journal = Journal(run_dir)
    population = journal.read_population()
    if len(population) == 0:
        console.print(f"run {run}: no generation has finished yet")
        return
    records = journal.read_records()
    record = LaunchRecord.load(run_dir)
    base_hyp = Hyp.from_yaml(resolve_config((record.hyp if record else None) or DEFAULT_HYP, "hyps"))
    space_file = record.search_space if record else None
    space = SearchSpace.load(resolve_config(space_file, "evolve") if space_file else None)
    console.print(summary_table(population, base_hyp, top, space))
    for line in search_summary(population, records, load_state(journal)):
        console.print(line)
    try:
        artifacts.write_hyp_evolve(run_dir, population)
        drawn = artifacts.write_plots(run_dir, population, space.evolved_keys(population.hyp_keys),
                                      artifacts.pruned_points(records))
    except OSError as error:  # a run folder written by other users' containers can be read-only to us
        console.print(f"cannot write to {run_dir}: {error.strerror}", style="yellow")
        drawn = False
    best = run_dir / artifacts.HYP_EVOLVE_NAME
    if best.is_file():
        console.print(f"best hyperparameters: {best}")
    if drawn:
        console.print(f"plots: {run_dir / artifacts.EVOLVE_PLOT_NAME}, {run_dir / artifacts.FITNESS_PLOT_NAME}")
