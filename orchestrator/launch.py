"""What `evolvectl start` asks for, whatever runs the workers: the run, its workers, the trainer's flags.

A run is a folder on the host, `<project>/<run>` (default `runs/evolve/<run>`), holding the
journal (evolve.csv and friends), `launch.json` (how it was started, so later commands know
its backend) and, for local workers, `workers/` (one state file and one log per worker).
A DDP training (`evolvectl ddp`) is a run too, by default under `runs/train/<run>`, holding
the trainer's own outputs (results.csv, weights/) instead of a journal.

Workers are named by a key: `gpu3` for the worker on GPU 3, `cpu0`, `cpu1`, ... for CPU
workers, `ddp` for the one worker of a DDP training. `attach 3` is short for `attach gpu3`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.container_spec import DDP_KEY, check_run_name, worker_name
from trainer.files import write_atomic
from trainer.errors import UserError

DEFAULT_PROJECT = Path("runs/evolve")
DDP_PROJECT = Path("runs/train")  # where YOLOv5 users look for a training's results
EVOLVE_MODE = "evolve"
DDP_MODE = "ddp"
LAUNCH_NAME = "launch.json"
WORKERS_DIR = "workers"
BACKENDS = ("docker", "local")

_KEY_PATTERN = re.compile(r"(?:(gpu)?(\d+)|(cpu)(\d+)|(ddp))")


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
    """`3` or `gpu3` names the worker on GPU 3, `cpu0` the first CPU worker, `ddp` a DDP training."""
    match = _KEY_PATTERN.fullmatch(text.strip().lower())
    if match is None:
        raise UserError(f"worker '{text}' is not a GPU index (3, gpu3), a CPU worker (cpu0) or ddp")
    if match.group(5):
        return DDP_KEY
    if match.group(3):
        return f"cpu{int(match.group(4))}"
    return f"gpu{int(match.group(2))}"


@dataclass(frozen=True)
class TrainerOptions:
    """The trainer flags a run passes to every worker; None leaves the trainer's default."""

    data: str = "synthetic"
    cfg: str | None = None
    weights: str | None = None
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
        names = ("cfg", "weights", "hyp", "epochs", "batch_size", "imgsz", "workers", "seed", "search_space",
                 "evolve_population")
        return ["--generations", str(generations), "--data", self.data, *self._flags(names), *self.extra]

    def training_arguments(self) -> list[str]:
        """Flags for one training (`evolvectl ddp`): no evolution flags, which would make it a worker."""
        names = ("cfg", "weights", "hyp", "epochs", "batch_size", "imgsz", "workers", "seed")
        return ["--data", self.data, *self._flags(names), *self.extra]

    def _flags(self, names: Sequence[str]) -> list[str]:
        flags = []
        for name in names:
            value = getattr(self, name)
            if value is not None:
                flags += [f"--{name.replace('_', '-')}", str(value)]
        return flags

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
