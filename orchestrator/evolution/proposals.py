"""What a search algorithm sees when it proposes a child, and the unit space it can search in.

Every search algorithm is a pure function of a `SearchContext` (the run's finished rows, the
children in flight, the search space, how much of the budget is spent) and a random
generator seeded from (run seed, worker, claim). It returns a `Proposal`. Nothing here reads
a file or the clock, so a proposal is reproducible and unit-testable.

`UnitSpace` maps each evolving gene onto [0, 1]: linearly, or by its logarithm for genes whose
range spans two decades or more above zero (`lr0` from 1e-5 to 0.1, `lrf` from 0.01 to 1), so
a step means the same relative change at both ends of the range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from orchestrator.evolution.repeats import distinct_ranked

# A gene whose range is low > 0 and high/low >= LOG_RATIO evolves on a log scale.
LOG_RATIO = 100.0
REDRAW_ATTEMPTS = 100


@dataclass(frozen=True)
class SearchContext:
    """The run as a search algorithm sees it, under the journal's lock."""

    hyps: np.ndarray  # (rows, genes): evolve.csv's hyperparameters, in row order
    fitness: np.ndarray  # (rows,): NaN where a row's fitness is not finite
    taken: np.ndarray  # every row and every child in flight: a new child must differ from all
    base: np.ndarray  # the base hyp, for a run with no finished row yet
    gains: np.ndarray
    lows: np.ndarray
    highs: np.ndarray
    progress: float = 0.0  # share of the budget finished or in flight, from 0 to 1

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.gains, self.lows, self.highs

    def ranked(self) -> np.ndarray:
        """Indices of the rows with a finite fitness and finite genes, best first (ties: earlier
        row); repeated genes appear once, at their earliest row, ranked by their mean fitness."""
        return distinct_ranked(self.hyps, self.fitness)


@dataclass(frozen=True)
class Proposal:
    child: np.ndarray
    parents: tuple[int, ...]  # the evolve.csv rows it came from
    repeat: bool = False  # the child is a row trained once more (see repeats.py), not a new one


@dataclass(frozen=True)
class UnitSpace:
    """The evolving genes mapped onto [0, 1] (log-scaled where the range spans decades)."""

    gains: np.ndarray  # 0 where a gene does not evolve
    lows: np.ndarray
    highs: np.ndarray
    evolving: np.ndarray  # bool per gene: gain > 0 and a finite range with low < high
    log: np.ndarray  # bool per gene

    @classmethod
    def of(cls, context: SearchContext) -> UnitSpace:
        return cls.from_bounds(context.gains, context.lows, context.highs)

    @classmethod
    def from_bounds(cls, gains: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> UnitSpace:
        """From a search space's `bounds()`: gains, lows and highs per gene."""
        finite = np.isfinite(lows) & np.isfinite(highs)
        evolving = (gains > 0) & finite & (lows < highs)
        with np.errstate(divide="ignore", invalid="ignore"):
            log = evolving & (lows > 0) & (highs / np.where(lows > 0, lows, 1.0) >= LOG_RATIO)
        return cls(np.where(evolving, gains, 0.0), lows, highs, evolving, log)

    def to_unit(self, values: np.ndarray) -> np.ndarray:
        """Genes to [0, 1]; genes that do not evolve become 0 (they are never read back)."""
        values = np.clip(np.asarray(values, dtype=float), self.lows, self.highs)
        with np.errstate(divide="ignore", invalid="ignore"):
            linear = (values - self.lows) / (self.highs - self.lows)
            logged = np.log(values / self.lows) / np.log(self.highs / self.lows)
        unit = np.where(self.log, logged, linear)
        return np.where(self.evolving, np.clip(unit, 0.0, 1.0), 0.0)

    def from_unit(self, unit: np.ndarray, frozen_values: np.ndarray) -> np.ndarray:
        """[0, 1] back to genes; genes that do not evolve take `frozen_values`."""
        unit = np.clip(np.asarray(unit, dtype=float), 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            linear = self.lows + unit * (self.highs - self.lows)
            logged = self.lows * (self.highs / self.lows) ** unit
        values = np.where(self.log, logged, linear)
        return np.where(self.evolving, values, frozen_values)

    def genes(self, unit: np.ndarray, frozen_values: np.ndarray) -> np.ndarray:
        """A child as evolve.csv will hold it: back from unit space, rounded, within the limits."""
        values = significant(self.from_unit(unit, frozen_values))
        return np.where(self.evolving, np.clip(values, self.lows, self.highs), frozen_values)


def round_genes(values: np.ndarray) -> np.ndarray:
    """Round to 5 decimals (the classic GA's rule), then to the 5 significant digits evolve.csv keeps."""
    return significant(np.round(np.asarray(values, dtype=float), 5))


def significant(values: np.ndarray) -> np.ndarray:
    """Round to the 5 significant digits evolve.csv keeps (`%.5g`), so that the row written is
    exactly the hyp that trained. (Rounding to 5 decimals as well, as the classic GA does, would
    leave lr0 near 1e-5 almost no values to take.)"""
    return np.array([float(f"{value:.5g}") for value in np.asarray(values, dtype=float)])


def is_taken(child: np.ndarray, taken: np.ndarray) -> bool:
    taken = np.asarray(taken, dtype=float).reshape(-1, child.size)
    return bool(np.any(np.all(taken == child, axis=1)))


def first_untaken(draw: Callable[[], np.ndarray], taken: np.ndarray) -> np.ndarray:
    """Call `draw` until its child is unlike every row and child in flight (REDRAW_ATTEMPTS at
    most; a space too small to avoid repeats then gets the last draw as it is)."""
    child = draw()
    for _ in range(REDRAW_ATTEMPTS - 1):
        if not is_taken(child, taken):
            break
        child = draw()
    return child
