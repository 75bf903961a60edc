"""`launch.json`: how a run was started, and finding a run's folder from --project and --name.

Commands on an existing run (status, attach, stop, results, ...) read this record to learn
its backend, its workers and whether it is an evolution or a DDP training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.runs.names import check_run_name
from orchestrator.runs.plan import DDP_PROJECT, DEFAULT_PROJECT, run_directory
from trainer.errors import UserError
from trainer.files import write_atomic

EVOLVE_MODE = "evolve"
DDP_MODE = "ddp"
LAUNCH_NAME = "launch.json"


@dataclass(frozen=True)
class LaunchRecord:
    """`launch.json`: how a run was last started, read by status, stop, results and friends."""

    run: str
    backend: str
    workers: tuple[str, ...]
    generations: int
    hyp: str | None  # host path or bundled name of the base hyp, for the results table
    search_space: str | None
    image: str | None = None
    started: float = field(default_factory=time.time)
    mode: str = EVOLVE_MODE  # or DDP_MODE: one training, whose progress is its results.csv
    start_epoch: int = 0  # DDP: epochs already trained when started (a resumed run), for the ETA

    def save(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / LAUNCH_NAME, (json.dumps(asdict(self), indent=1) + "\n").encode())

    @classmethod
    def load(cls, run_dir: Path) -> LaunchRecord | None:
        try:
            values: dict[str, Any] = json.loads((run_dir / LAUNCH_NAME).read_text())
        except FileNotFoundError:
            return None
        except ValueError as error:
            raise UserError(f"{run_dir / LAUNCH_NAME} is not valid JSON ({error}); delete it and start again") from None
        values["workers"] = tuple(values.get("workers", ()))
        return cls(**values)


def searched_projects(project: Path) -> tuple[Path, ...]:
    """The default --project stands for both homes of runs: evolutions and DDP trainings."""
    return (DEFAULT_PROJECT, DDP_PROJECT) if project == DEFAULT_PROJECT else (project,)


def latest_run(projects: Sequence[Path], run: str | None = None) -> Path | None:
    """The folder of the most recently started run (named `run`, if given) under any of `projects`."""
    pattern = f"{check_run_name(run)}/{LAUNCH_NAME}" if run else f"*/{LAUNCH_NAME}"
    launched = [path for project in projects for path in project.glob(pattern)]
    if not launched:
        return None
    return max(launched, key=lambda path: path.stat().st_mtime).parent.absolute()


def existing_run_dir(project: Path, run: str | None) -> tuple[str, Path]:
    """The run's name and folder for commands that read a run: it must exist.

    Under the default --project a name may exist as an evolution and as a DDP training: the
    one started last is meant (each command's output names the folder it read).
    """
    projects = searched_projects(project)
    found = latest_run(projects, run)
    if found is not None:
        return found.name, found
    if run is None:
        places = " or ".join(f"{place}/" for place in projects)
        raise UserError(f"no runs under {places}: start one with `evolvectl start`, or pass --project/--name")
    run_dir = run_directory(project, run)
    if not run_dir.is_dir():
        raise UserError(f"run '{run}' not found: no folder {run_dir} (see --project, --name)")
    return run, run_dir


def is_ddp_run(run_dir: Path) -> bool:
    record = LaunchRecord.load(run_dir)
    return record is not None and record.mode == DDP_MODE
