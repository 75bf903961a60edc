"""Asynchronous successive halving across workers: stop hopeless generations early.

A generation reports its validation fitness after each rung epoch. Under the journal's lock
the value joins every value recorded at that rung by any worker, and the generation goes on
only if it is among the top 1/η of them (ASHA's rule, as Optuna's SuccessiveHalvingPruner
applies it: with n values at the rung, it must reach the ⌊n/η⌋-th best, and the best always
goes on). Until `min_count` values exist at a rung nothing is pruned there, so the first
generations of a run set the bar instead of racing each other.

A pruned generation is recorded in evolve_meta.jsonl as `pruned`, with its epoch and fitness.
It never becomes a row of evolve.csv, so it is never a parent and YOLOv5's tools keep seeing
full-length results only. It counts as one generation of the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.errors import UserError

# Default rungs start at the third epoch: before it, a ranking mostly sorts warmup noise (fine-tuning
# for 5 epochs with rungs at 1 and 2 pruned 4 generations in 5 and found nothing; bench/README.md).
MIN_DEFAULT_RUNG = 3


class GenerationPruned(Exception):
    """Raised by an objective told to stop at a rung; the loop records the generation as pruned."""

    def __init__(self, epoch: int, fitness: float) -> None:
        super().__init__(f"pruned after epoch {epoch} at fitness {fitness:.4f}")
        self.epoch = epoch
        self.fitness = fitness


@dataclass(frozen=True)
class Pruning:
    """Rungs (epochs after which a generation reports, counted from 1) and the reduction factor η."""

    rungs: tuple[int, ...]
    eta: float = 3.0
    min_count: int = 3

    def __post_init__(self) -> None:
        if not self.rungs or any(rung < 1 for rung in self.rungs) or list(self.rungs) != sorted(set(self.rungs)):
            raise UserError(f"--prune-rungs {','.join(map(str, self.rungs))}: give increasing epochs from 1, "
                            "e.g. 3,10")
        if not self.eta > 1:
            raise UserError(f"--prune-eta {self.eta:g}: the reduction factor must be above 1, e.g. 3")

    @classmethod
    def for_epochs(cls, epochs: int, rungs: Sequence[int] | None = None, eta: float = 3.0) -> Pruning | None:
        """The given rungs below `epochs`, or by default epochs/η² and epochs/η from epoch
        MIN_DEFAULT_RUNG on; None when no rung fits (short generations are not pruned by default)."""
        if rungs is None:
            rungs = sorted({rung for rung in (round(epochs / eta**2), round(epochs / eta)) if rung >= MIN_DEFAULT_RUNG})
        kept = tuple(rung for rung in rungs if rung < epochs)
        return cls(kept, eta) if kept else None

    def keeps(self, fitness: float, recorded: Sequence[float]) -> bool:
        """Whether a generation at `fitness` goes on, given every value recorded at the rung (its own too)."""
        values = sorted((value for value in recorded if math.isfinite(value)), reverse=True)
        if not math.isfinite(fitness):
            return False
        if len(values) < self.min_count:
            return True
        bar = values[max(int(len(values) // self.eta) - 1, 0)]
        return fitness >= bar

    def to_json(self) -> dict[str, Any]:
        return {"rungs": list(self.rungs), "eta": self.eta, "min_count": self.min_count}

    @classmethod
    def from_json(cls, values: dict[str, Any] | None) -> Pruning | None:
        if values is None:
            return None
        return cls(tuple(values["rungs"]), values["eta"], values.get("min_count", 3))


def parse_rungs(text: str) -> tuple[int, ...]:
    """`--prune-rungs 3,10` as epochs."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--prune-rungs {text!r}: give epochs separated by commas, e.g. 3,10") from None
