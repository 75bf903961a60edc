"""The `evolvectl` command group and what its commands share: the console and a run's status."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from orchestrator import __version__
from orchestrator.backends.base import Backend
from orchestrator.evolution.journal import JournalLockTimeout
from orchestrator.runs.record import DDP_MODE, LaunchRecord
from orchestrator.runs.status import (
    StatusReport,
    collect_status,
    collect_training_status,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


def open_console(stderr: bool = False) -> Console:
    """A console for the user: paths and commands stay copyable (no highlighting, no wrapping)."""
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def report(backend: Backend, run: str, run_dir: Path) -> StatusReport:
    """A run's status now: per worker and its progress (epochs for a DDP training, generations else)."""
    record = LaunchRecord.load(run_dir)
    workers = backend.workers(run, run_dir)
    if record is not None and record.mode == DDP_MODE:
        return collect_training_status(run, run_dir, backend.name, workers, record.started, record.start_epoch)
    return collect_status(run, run_dir, backend.name, workers)


def run_flags(run: str, project: Path, default: Path) -> str:
    """The flags that name a run on later commands (--project only where it is not the default)."""
    return f"--name {run}" + (f" --project {project}" if project != default else "")


class EvolvectlGroup(click.Group):
    """Turns a journal lock that cannot be taken into a one-line error like every other."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except JournalLockTimeout as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=EvolvectlGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="evolvectl")
def main() -> None:
    """Hyperparameter evolution for YOLO-family detectors: one worker per GPU, one shared evolve.csv."""
    # What the run's files hold that a command works around (a damaged evolve.csv line) is one line each.
    logging.basicConfig(format="Warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
