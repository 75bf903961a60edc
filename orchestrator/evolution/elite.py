"""The default search: sample children from the elites' distribution in unit space.

After a few rows (`warmup`), each child is drawn from a Gaussian fitted to the best rows of
the run (the elites, a quarter of the finished rows, 3 to 12 of them), in the unit space of
`proposals.UnitSpace` (log-scaled for lr0 and lrf):
- its centre is the elites' weighted mean (log-rank weights, as CMA-ES uses), so one lucky
  row cannot pull the search onto itself: a noisy outlier moves the centre by its weight;
- its covariance is the elites' weighted covariance, which keeps the directions in which good
  rows differ (correlated genes such as lr0 and momentum move together), plus an isotropic
  step, σ × gain per gene, that shrinks from 0.15 to 0.03 of the range over the budget, so the
  search keeps exploring when the elites agree.
Before that, children are mutations of the best row (or of the base hyp) with the same step.
In the last 5% of the budget the best rows are trained again instead (`repeats.py`), best
first, so that the row a run ends on is not one lucky training.

Like the other searches it is a pure function of the shared journal and a generator seeded
from (run seed, worker, claim), so any number of asynchronous workers cooperate and a run
is reproducible. Ultralytics' tuner moved to elite-covariance sampling for the same reasons;
`bench/bench_search.py` measures this one against the classic GA, the population GA, random
search and Optuna's TPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from orchestrator.evolution.proposals import (
    Proposal,
    SearchContext,
    UnitSpace,
    first_untaken,
)
from orchestrator.evolution.repeats import trainings_of


@dataclass(frozen=True)
class EliteSearch:
    """Elite-covariance sampling; see the module's docstring."""

    name: ClassVar[str] = "elite"
    warmup: int = 4  # rows with a fitness before children are drawn from the elites
    elite_share: float = 0.25
    elite_count: tuple[int, int] = (3, 12)  # at least, at most
    sigma: tuple[float, float] = (0.15, 0.03)  # isotropic step in unit space, start and end of the budget
    confirm_share: float = 0.05  # the last share of the budget trains the best rows again (repeats.py)
    confirm_top: int = 5  # ... among this many best rows

    def propose(self, context: SearchContext, rng: np.random.Generator) -> Proposal:
        ranked = context.ranked()
        space = UnitSpace.of(context)
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * min(max(context.progress, 0.0), 1.0)
        if ranked.size < self.warmup:
            centre_values = context.hyps[ranked[0]] if ranked.size else context.base
            centre = space.to_unit(centre_values)
            spread = np.diag((sigma * space.gains) ** 2)
            parents = tuple(int(row) for row in ranked[:1])
        elif (row := self._to_confirm(context, ranked)) is not None:
            return Proposal(context.hyps[row].copy(), (row,), repeat=True)
        else:
            count = int(np.clip(round(self.elite_share * ranked.size), *self.elite_count))
            elites = ranked[:count]
            centre, spread = _weighted_moments(space.to_unit(context.hyps[elites]))
            spread = spread + np.diag((sigma * space.gains) ** 2)
            centre_values = context.hyps[elites[0]]
            parents = tuple(int(row) for row in elites)
        genes = np.flatnonzero(space.evolving)
        factor = _cholesky(spread[np.ix_(genes, genes)])

        def draw() -> np.ndarray:
            unit = centre.copy()
            unit[genes] += factor @ rng.standard_normal(genes.size)
            return space.genes(unit, centre_values)

        return Proposal(first_untaken(draw, context.taken), parents)

    def _to_confirm(self, context: SearchContext, ranked: np.ndarray) -> int | None:
        """At the end of the budget: the best of the top rows trained only once, with no repeat in flight."""
        if self.confirm_share <= 0 or context.progress < 1 - self.confirm_share:
            return None
        once = [int(row) for row in ranked[: self.confirm_top] if trainings_of(context.hyps[row], context.taken) == 1]
        return once[0] if once else None


def _weighted_moments(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of rows sorted best first, with CMA-ES's log-rank weights."""
    count = len(points)
    weights = np.log(count + 0.5) - np.log(np.arange(1, count + 1))
    weights = weights / weights.sum()
    mean = weights @ points
    deviations = points - mean
    return mean, (weights[:, None] * deviations).T @ deviations


def _cholesky(matrix: np.ndarray) -> np.ndarray:
    """A lower-triangular factor of a covariance that rounding may have left barely indefinite."""
    if matrix.size == 0:
        return matrix
    jitter = 1e-12 * max(float(np.trace(matrix)) / len(matrix), 1e-12)
    for _ in range(8):
        try:
            return np.linalg.cholesky(matrix + jitter * np.eye(len(matrix)))
        except np.linalg.LinAlgError:
            jitter *= 100
    values, vectors = np.linalg.eigh(matrix)
    return vectors * np.sqrt(np.clip(values, 0.0, None))
