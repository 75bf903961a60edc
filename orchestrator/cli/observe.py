"""Watching a run: `status`, `attach`, `logs` and `results`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from orchestrator.backends.base import WorkerSettings, backend_for_run
from orchestrator.cli.group import CONTEXT, main, open_console, report
from orchestrator.cli.options import backend_option, run_options
from orchestrator.cli.render import render_progress, render_status
from orchestrator.cli.views import follow_run, print_results
from orchestrator.runs.plan import parse_worker_key
from orchestrator.runs.record import existing_run_dir, is_ddp_run
from orchestrator.runs.status import ACTIVE_STATES, collect_training_status


@main.command(context_settings=CONTEXT)
@run_options
@backend_option
@click.option("--watch", "-w", is_flag=True, help="refresh until Ctrl-C")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, help="seconds between refreshes")
def status(project: Path, name: str | None, backend: str, watch: bool, interval: float) -> None:
    """One row per worker (state, restarts, generation, epoch, fitness), the budget, best fitness and ETA."""
    run, run_dir = existing_run_dir(project, name)
    console = open_console()
    workers = backend_for_run(backend, project, run_dir, WorkerSettings(), lambda text: None)
    if not watch:
        console.print(render_status(report(workers, run, run_dir)))
        return
    follow_run(console, lambda: report(workers, run, run_dir), until_exited=False, interval=interval)


@main.command(context_settings=CONTEXT)
@click.argument("worker")
@run_options
@backend_option
@click.option("--tail", type=click.IntRange(min=0), default=50, help="lines of history shown first")
def attach(worker: str, project: Path, name: str | None, backend: str, tail: int) -> None:
    """Stream a worker's live output; Ctrl-C detaches and the worker keeps running.

    WORKER is a GPU index (3 or gpu3), a CPU worker (cpu0) or ddp (a DDP training).
    """
    key = parse_worker_key(worker)
    run, run_dir = existing_run_dir(project, name)
    workers = backend_for_run(backend, project, run_dir, WorkerSettings(), lambda text: None)
    workers.output(run, run_dir, key, _write_raw, follow=True, tail=tail)
    states = {state.key: state for state in workers.workers(run, run_dir)}
    state = states.get(key)
    if state is not None and state.state in ACTIVE_STATES:
        open_console(stderr=True).print(f"\ndetached from {key}; it keeps running", style="dim")
    elif state is not None:
        open_console(stderr=True).print(f"\n{key} is {state.state} (exit code {state.exit_code})", style="dim")


@main.command(context_settings=CONTEXT)
@click.argument("worker")
@run_options
@backend_option
@click.option("--follow", "-f", is_flag=True, help="keep printing new output (Ctrl-C stops)")
@click.option("--tail", type=click.IntRange(min=0), default=None, help="only the last N lines")
def logs(worker: str, project: Path, name: str | None, backend: str, follow: bool, tail: int | None) -> None:
    """Print a worker's output so far (WORKER: 3, gpu3, cpu0 or ddp)."""
    key = parse_worker_key(worker)
    run, run_dir = existing_run_dir(project, name)
    workers = backend_for_run(backend, project, run_dir, WorkerSettings(), lambda text: None)
    workers.output(run, run_dir, key, _write_raw, follow=follow, tail=tail)


def _write_raw(text: str) -> None:
    """Output as the worker wrote it (carriage returns and colours included), at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


@main.command(context_settings=CONTEXT)
@run_options
@click.option("--top", type=click.IntRange(min=1), default=5, help="rows of the table")
def results(project: Path, name: str | None, top: int) -> None:
    """The fittest generations, the best hyperparameters (hyp_evolve.yaml) and the plots.

    For a DDP training: its epochs, mAP and where its results.csv and weights are.
    """
    run, run_dir = existing_run_dir(project, name)
    if is_ddp_run(run_dir):
        progress = collect_training_status(run, run_dir, "", ()).progress
        open_console().print(render_progress(progress), f"results: {run_dir / 'results.csv'}, "
                         f"weights: {run_dir / 'weights'}", sep="\n")
        return
    print_results(open_console(), run, run_dir, top)
