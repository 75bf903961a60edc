"""What `evolvectl start` asks for, whatever runs the workers: the run, its workers, the trainer's flags.

A run is a folder on the host, `<project>/<run>` (default `runs/evolve/<run>`), holding the
journal (evolve.csv and friends), `launch.json` (how it was started, so later commands know
its backend) and, for local workers, `workers/` (one state file and one log per worker).
A DDP training (`evolvectl ddp`) is a run too, by default under `runs/train/<run>`, holding
the trainer's own outputs (results.csv, weights/) instead of a journal.

Workers are named by a key: `gpu3` for the worker on GPU 3, `cpu0`, `cpu1`, ... for CPU
workers, `ddp` for the one worker of a DDP training. `attach 3` is short for `attach gpu3`.
`--gpus` is parsed here too: `0-3`, `0,2,5` or `all`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from orchestrator.runs.names import DDP_KEY, check_run_name, worker_name
from trainer.errors import UserError

DEFAULT_PROJECT = Path("runs/evolve")
DDP_PROJECT = Path("runs/train")  # where YOLOv5 users look for a training's results
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
        raise UserError(f"worker {text!r} is not a GPU index (3, gpu3), a CPU worker (cpu0) or ddp")
    if match.group(5):
        return DDP_KEY
    if match.group(3):
        return f"cpu{int(match.group(4))}"
    return f"gpu{int(match.group(2))}"


# Marks the TrainerOptions that only an evolution worker takes.
_EVOLUTION = {"evolution": True}


@dataclass(frozen=True)
class TrainerOptions:
    """The trainer flags a run passes to every worker; None leaves the trainer's default.

    Each field is the flag of the same name (`batch_size` is `--batch-size`); those marked
    evolution-only are left out of a single training's command line.
    """

    data: str = "synthetic"
    cfg: str | None = None
    weights: str | None = None
    hyp: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    imgsz: int | None = None
    workers: int | None = None
    seed: int | None = None
    search: str | None = field(default=None, metadata=_EVOLUTION)
    prune: bool | None = field(default=None, metadata=_EVOLUTION)
    prune_rungs: str | None = field(default=None, metadata=_EVOLUTION)
    prune_eta: float | None = field(default=None, metadata=_EVOLUTION)
    hours: float | None = field(default=None, metadata=_EVOLUTION)
    search_space: str | None = field(default=None, metadata=_EVOLUTION)
    evolve_population: str | None = field(default=None, metadata=_EVOLUTION)
    extra: tuple[str, ...] = ()  # anything after `--`, passed through unchanged

    @classmethod
    def from_values(cls, values: Mapping[str, Any], extra: Sequence[str] = ()) -> TrainerOptions:
        """From a command's parsed options: each field present among them, plus the `--` flags."""
        return cls(**{name: values[name] for name in cls._flag_names(evolution=True) if name in values},
                   extra=tuple(extra))

    def arguments(self, generations: int) -> list[str]:
        """Flags for an evolution worker, without the run's place and the worker's identity."""
        return ["--generations", str(generations), *self._flags(self._flag_names(evolution=True)), *self.extra]

    def training_arguments(self) -> list[str]:
        """Flags for one training (`evolvectl ddp`): no evolution flags, which would make it a worker."""
        return [*self._flags(self._flag_names(evolution=False)), *self.extra]

    @classmethod
    def _flag_names(cls, evolution: bool) -> list[str]:
        return [item.name for item in fields(cls)
                if item.name != "extra" and (evolution or not item.metadata.get("evolution"))]

    def _flags(self, names: Sequence[str]) -> list[str]:
        flags = []
        for name in names:
            value, flag = getattr(self, name), f"--{name.replace('_', '-')}"
            if isinstance(value, bool):  # an on/off flag: --prune or --no-prune
                flags.append(flag if value else f"--no-{flag[2:]}")
            elif value is not None:
                flags += [flag, str(value)]
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


MAX_GPU_INDEX = 1024  # far above any host's; a typo such as 0-99999 must not expand to a list that size


def parse_gpu_spec(spec: str, available: list[int] | None) -> list[int]:
    """GPU indices from `all`, `3`, `0-7`, `0,2,5` or a mix such as `0-2,5`, in ascending order.

    `available` is what the engine can see; None means unknown, so any index is accepted
    and only `all` is refused.
    """
    text = spec.strip()
    if text.lower() == "all":
        if available is None:
            raise UserError("--gpus all: the engine's GPUs are unknown; list them instead, e.g. --gpus 0-3")
        if not available:
            raise UserError("--gpus all: the engine sees no GPUs; run CPU workers with --cpu-workers N")
        return sorted(available)
    chosen: list[int] = []
    for part in text.split(","):
        for gpu in _parse_part(part.strip(), spec):
            if gpu in chosen:
                raise UserError(f"--gpus {spec!r}: GPU {gpu} is listed twice")
            chosen.append(gpu)
    if available is not None:
        missing = [gpu for gpu in chosen if gpu not in available]
        if missing:
            seen = ", ".join(map(str, sorted(available))) or "none"
            raise UserError(f"--gpus {spec!r}: no GPU {', '.join(map(str, missing))}; the engine sees: {seen}")
    return sorted(chosen)


def _parse_part(part: str, spec: str) -> range:
    """One comma-separated piece: `5` or `0-7`."""
    first, dash, last = part.partition("-")
    bounds = [first, last] if dash else [first]
    if not all(bound.strip().isascii() and bound.strip().isdigit() for bound in bounds):
        raise UserError(f"--gpus {spec!r}: {part!r} is not a GPU index or range; use e.g. 0-3, 0,2,5 or all")
    low, high = int(first), int(last if dash else first)
    if high < low:
        raise UserError(f"--gpus {spec!r}: range {part!r} runs backwards; write {high}-{low}")
    if high >= MAX_GPU_INDEX:
        raise UserError(f"--gpus {spec!r}: GPU {high} is beyond any machine's; GPUs count from 0")
    return range(low, high + 1)
