"""The population GA of YOLOv5's current master and its training-tricks text, made right.

The text's algorithm keeps a population of 50 in one process: elites (2 growing to 5 over the
run) pass on unchanged, the rest are children of two tournament winners (tournaments of
min(10, population) shrinking to 2), crossed at one point (rate 1 falling to 0.5) and
mutated gene by gene (rate 0.5 falling to 0.01) by adding U(-0.1, 0.1), then clamped.

Here it runs steady-state over the shared journal, one child per claim, so every worker
breeds from what every worker found:
- the population is the best `size` rows of evolve.csv (children in flight are not bred
  again), so elites are never lost; the elites of the text's schedule are the pool the
  first parent is drawn from;
- selection ranks by the fitness that evolve.csv and hyp_evolve.yaml rank by, not mAP@0.5;
- a mutation adds U(-0.1, 0.1) × gain in the unit space of `proposals.UnitSpace`: a tenth
  of each gene's range (of its logarithm for lr0 and lrf), not 0.1 whatever the range;
- the schedules follow the share of the run's budget spent, not a process's own count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from orchestrator.evolution.ga import mutate
from orchestrator.evolution.proposals import (
    Proposal,
    SearchContext,
    UnitSpace,
    first_untaken,
)


def _ramp(start: float, end: float, progress: float) -> float:
    return start + (end - start) * min(max(progress, 0.0), 1.0)


@dataclass(frozen=True)
class PopulationSearch:
    """YOLOv5 master's population GA, asynchronous and shared; see the module's docstring."""

    name: ClassVar[str] = "population"
    size: int = 50
    elites: tuple[int, int] = (2, 5)  # elite count at the start and at the end of the budget
    tournament: tuple[int, int] = (10, 2)  # tournament size (capped by the population)
    crossover: tuple[float, float] = (1.0, 0.5)  # crossover rate
    mutation: tuple[float, float] = (0.5, 0.01)  # per-gene mutation rate
    step: float = 0.1  # mutation adds U(-step, step) × gain in unit space

    def propose(self, context: SearchContext, rng: np.random.Generator) -> Proposal:
        population = context.ranked()[: self.size]
        space = UnitSpace.of(context)
        if population.size < 2:  # no pair to breed yet: mutate the best row, or the base hyp
            parent = context.hyps[population[0]] if population.size else context.base
            child = first_untaken(lambda: mutate(parent, *context.bounds, rng), context.taken)
            return Proposal(child, tuple(int(row) for row in population[:1]))
        rows: list[tuple[int, int]] = []

        def draw() -> np.ndarray:
            first, second = self.parents(population, context.progress, rng)
            rows.append((first, second))
            return self.breed(space, context.hyps[first], context.hyps[second], context.progress, rng)

        child = first_untaken(draw, context.taken)
        return Proposal(child, rows[-1])

    def parents(self, population: np.ndarray, progress: float, rng: np.random.Generator) -> tuple[int, int]:
        """Rows of evolve.csv: one elite, and one tournament winner (population is best first)."""
        elites = min(round(_ramp(*self.elites, progress)), population.size)
        first = int(population[rng.integers(elites)])
        size = max(2, min(round(_ramp(min(self.tournament[0], population.size), self.tournament[1], progress)),
                          population.size))
        entrants = rng.choice(population.size, size=size, replace=False)
        second = int(population[entrants.min()])  # the best entrant: the population is sorted
        return first, second

    def breed(self, space: UnitSpace, first: np.ndarray, second: np.ndarray, progress: float,
              rng: np.random.Generator) -> np.ndarray:
        """Single-point crossover of the evolving genes, then per-gene mutation, in unit space."""
        genes = np.flatnonzero(space.evolving)
        unit = space.to_unit(first)
        if rng.random() < _ramp(*self.crossover, progress) and genes.size > 1:
            point = rng.integers(1, genes.size)
            unit[genes[point:]] = space.to_unit(second)[genes[point:]]
        mutates = rng.random(unit.size) < _ramp(*self.mutation, progress)
        unit = unit + mutates * rng.uniform(-self.step, self.step, unit.size) * space.gains
        return space.genes(unit, first)
