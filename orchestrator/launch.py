"""What `evolvectl start` asks for, whatever runs the workers: the run, its workers, the trainer's flags.

A run is a folder on the host, `<project>/<run>` (default `runs/evolve/<run>`), holding the
journal (evolve.csv and friends), `launch.json` (how it was started, so later commands know
its backend) and, for local workers, `workers/` (one state file and one log per worker).

Workers are named by a key: `gpu3` for the worker on GPU 3, `cpu0`, `cpu1`, ... for CPU
workers. `attach 3` is short for `attach gpu3`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.container_spec import check_run_name, worker_name
from orchestrator.journal import write_atomic
from trainer.errors import UserError

DEFAULT_PROJECT = Path("runs/evolve")
LAUNCH_NAME = "launch.json"
WORKERS_DIR = "workers"
BACKENDS = ("docker", "local")

_KEY_PATTERN = re.compile(r"(?:(gpu)?(\d+)|(cpu)(\d+))")


@dataclass(frozen=True)
class WorkerSlot:
    """One worker of a run: on GPU `gpu`, or CPU worker number `slot` when `gpu` is None."""

    gpu: int | None
    slot: int

    @property
    def key(self) -> str:
        return f"gpu{self.gpu}" if self.gpu is not None else f"cpu{self.slot}"

    def worker_id(self, run: str) -> str:
        """The name the worker records in the journal: its container's name under Docker."""
        return worker_name(run, self.gpu, self.slot)


def worker_slots(gpus: Sequence[int], cpu_workers: int) -> list[WorkerSlot]:
    if not gpus and cpu_workers <= 0:
        raise UserError("no workers asked for: pass --gpus (e.g. 0-3 or all) or --cpu-workers N")
    return [WorkerSlot(gpu, index) for index, gpu in enumerate(gpus)] + [
        WorkerSlot(None, index) for index in range(cpu_workers)
    ]


def parse_worker_key(text: str) -> str:
    """`3` or `gpu3` names the worker on GPU 3, `cpu0` the first CPU worker."""
    match = _KEY_PATTERN.fullmatch(text.strip().lower())
    if match is None:
        raise UserError(f"worker '{text}' is not a GPU index (3, gpu3) or a CPU worker (cpu0)")
    if match.group(3):
        return f"cpu{int(match.group(4))}"
    return f"gpu{int(match.group(2))}"


@dataclass(frozen=True)
class TrainerOptions:
    """The trainer flags a run passes to every worker; None leaves the trainer's default."""

    data: str = "synthetic"
    cfg: str | None = None
    hyp: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    imgsz: int | None = None
    workers: int | None = None
    seed: int | None = None
    search_space: str | None = None
    evolve_population: str | None = None
    extra: tuple[str, ...] = ()  # anything after `--`, passed through unchanged

    def arguments(self, generations: int) -> list[str]:
        """Flags for `python -m trainer --evolve`, without the run's place and the worker's identity."""
        flags = ["--generations", str(generations), "--data", self.data]
        for name in ("cfg", "hyp", "epochs", "batch_size", "imgsz", "workers", "seed",
                     "search_space", "evolve_population"):
            value = getattr(self, name)
            if value is not None:
                flags += [f"--{name.replace('_', '-')}", str(value)]
        return flags + list(self.extra)

    def with_paths(self, **paths: str | None) -> TrainerOptions:
        return replace(self, **paths)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything `start` needs, checked: the run, its folder, its workers and their flags."""

    run: str
    project: Path
    slots: tuple[WorkerSlot, ...]
    generations: int
    options: TrainerOptions = field(default_factory=TrainerOptions)

    def __post_init__(self) -> None:
        check_run_name(self.run)
        if self.generations < 1:
            raise UserError(f"--generations {self.generations}: the budget must be at least 1 generation")

    @property
    def run_dir(self) -> Path:
        return run_directory(self.project, self.run)


def run_directory(project: Path, run: str) -> Path:
    return (project / check_run_name(run)).absolute()


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


def latest_run(project: Path) -> str:
    """The most recently started run under `project`, for commands given no --name."""
    launched = sorted(project.glob(f"*/{LAUNCH_NAME}"), key=lambda path: path.stat().st_mtime)
    if not launched:
        raise UserError(f"no runs under {project}/: start one with `evolvectl start`, or pass --project/--name")
    return launched[-1].parent.name


def existing_run_dir(project: Path, run: str | None) -> tuple[str, Path]:
    """The run's name and folder for commands that read a run: it must exist."""
    run = run or latest_run(project)
    run_dir = run_directory(project, run)
    if not run_dir.is_dir():
        raise UserError(f"run '{run}' not found: no folder {run_dir} (see --project, --name)")
    return run, run_dir
