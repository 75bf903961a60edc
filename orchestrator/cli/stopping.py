"""Ending work: `stop` (after the current generation, or at once) and `kill-all`."""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.backends.base import (
    CHOICES,
    Backend,
    WorkerSettings,
    backend_for_run,
    open_backend,
)
from orchestrator.cli.group import CONTEXT, main, open_console
from orchestrator.cli.options import backend_option, run_options
from orchestrator.evolution.journal import Journal
from orchestrator.runs.ddp import CHECKPOINT
from orchestrator.runs.names import check_run_name
from orchestrator.runs.plan import DEFAULT_PROJECT
from orchestrator.runs.record import (
    existing_run_dir,
    is_ddp_run,
    searched_projects,
)
from trainer.errors import UserError


@main.command(context_settings=CONTEXT)
@run_options
@backend_option
@click.option("--now", is_flag=True, help="kill the workers at once instead of after their generation")
def stop(project: Path, name: str | None, backend: str, now: bool) -> None:
    """Stop a run: each worker finishes its current generation, then exits (--now: kill them).

    A DDP training finishes its current epoch, saves weights/last.pt and exits.
    """
    run, run_dir = existing_run_dir(project, name)
    if is_ddp_run(run_dir):
        _stop_training(backend_for_run(backend, project, run_dir, WorkerSettings(), lambda text: None),
                       run, run_dir, now)
        return
    Journal(run_dir).request_stop()  # also keeps a restarting worker from training again
    console = open_console()
    if not now:
        console.print(f"run {run}: workers exit after their current generation; "
                      f"`evolvectl status --name {run}` shows them go, `evolvectl start` resumes")
        return
    workers = backend_for_run(backend, project, run_dir, WorkerSettings(), lambda text: None)
    killed = workers.kill(run, run_dir)
    console.print(f"run {run}: killed {', '.join(killed) or 'no live workers'}; their generations are retried "
                  "when the run is started again")


def _stop_training(workers: Backend, run: str, run_dir: Path, now: bool) -> None:
    console = open_console()
    resume = f"`evolvectl ddp --name {run}` with the same devices resumes it"
    if now:
        killed = workers.kill(run, run_dir)
        console.print(f"run {run}: killed {', '.join(killed) or 'no live training'}; {resume} from its last epoch")
        return
    asked = workers.terminate(run, run_dir)
    if not asked:
        console.print(f"run {run}: no live training to stop")
        return
    console.print(f"run {run}: the training finishes its current epoch, saves {run_dir / CHECKPOINT} and exits; "
                  f"`evolvectl status --name {run}` shows it go, {resume}")


@main.command("kill-all", context_settings=CONTEXT)
@click.option("--run", "--name", "run", default=None, help="only this run's workers (default: every run)")
@click.option("--project", type=click.Path(path_type=Path), default=DEFAULT_PROJECT, envvar="EVOLVECTL_PROJECT",
              help="folder holding the runs of local workers (the default covers runs/train too)")
@click.option("--backend", type=click.Choice(CHOICES), default="auto", envvar="EVOLVECTL_BACKEND",
              help="auto: containers (when an engine answers), Swarm services (when it is a swarm manager) "
                   "and local workers")
def kill_all(run: str | None, project: Path, backend: str) -> None:
    """Kill and remove every evolvectl worker (of one run with --run); nothing else is touched."""
    if run is not None:
        check_run_name(run)
    removed: list[str] = []
    if backend in ("auto", "docker"):
        removed += _remove_containers(run, required=backend == "docker")
    if backend in ("auto", "swarm"):
        removed += _remove_services(run, required=backend == "swarm")
    if backend in ("auto", "local"):
        for place in searched_projects(project):
            removed += open_backend("local", place, WorkerSettings(), lambda text: None).remove_all(run)
    open_console().print(f"removed {len(removed)} worker(s)" + (f": {', '.join(removed)}" if removed else ""))


def _remove_containers(run: str | None, required: bool) -> list[str]:
    from orchestrator.backends.docker.engine import connect
    from orchestrator.backends.docker.engine import kill_all as remove_containers

    try:
        client = connect()
    except UserError:
        if required:
            raise
        return []  # no engine, no containers
    return remove_containers(client, run)


def _remove_services(run: str | None, required: bool) -> list[str]:
    """Our Swarm services, where this engine manages a swarm (required: it must)."""
    from orchestrator.backends.docker.engine import connect
    from orchestrator.backends.docker.swarm import (
        check_manager,
        remove_services,
        swarm_role,
    )

    try:
        client = connect()
    except UserError:
        if required:
            raise
        return []
    if required:
        check_manager(client)
    elif swarm_role(client) != "manager":
        return []
    return remove_services(client, run)
