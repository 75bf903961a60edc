"""Repeated trainings of the same genes: how noise is kept from crowning a lucky row.

Two trainings of one hyp differ (another data order, other augmentations), so the highest
fitness in evolve.csv is partly luck, and the row a run ends on is its most likely victim.
The default search (`elite`) therefore spends the last 5% of the budget training its best
rows once more, best first, instead of new children:
- a repeat is an ordinary row of evolve.csv with the same genes, trained with the run seed
  plus the number of earlier trainings of those genes, so it sees another data order; it is
  never pruned (it measures, it does not compete);
- rows with the same genes are ranked by their mean fitness (`pooled_fitness`), which is what
  picks parents and elites, `hyp_evolve.yaml`'s best row and `evolvectl results`' best.
A top row that was best by luck falls back when its repeat scores lower, and the next one is
trained again. `bench/bench_search.py` measures it against the same search without repeats.
(Repeating every new best as soon as it appeared was measured too: it cost as many
generations as it saved, see bench/README.md.)
"""

from __future__ import annotations

import numpy as np


def pooled_fitness(hyps: np.ndarray, fitness: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the mean finite fitness of all rows with the same genes, and how many those are.

    A row with a non-finite fitness keeps it (NaN) and counts nothing; a row whose genes are not
    all finite is never pooled with another.
    """
    hyps = np.asarray(hyps, dtype=float)
    fitness = np.asarray(fitness, dtype=float)
    pooled = fitness.copy()
    counts = np.where(np.isfinite(fitness), 1, 0)
    if len(hyps) < 2:
        return pooled, counts
    usable = np.flatnonzero(np.isfinite(fitness) & np.all(np.isfinite(hyps), axis=1))
    _, groups = np.unique(hyps[usable], axis=0, return_inverse=True)
    groups = groups.reshape(-1)
    sums = np.bincount(groups, weights=fitness[usable])
    sizes = np.bincount(groups)
    pooled[usable] = sums[groups] / sizes[groups]
    counts[usable] = sizes[groups]
    return pooled, counts


def distinct_ranked(hyps: np.ndarray, fitness: np.ndarray) -> np.ndarray:
    """Row indices best first by pooled fitness, one (the earliest) per distinct set of genes;
    rows without a finite fitness or genes are left out. Ties go to the earlier row."""
    hyps = np.asarray(hyps, dtype=float)
    pooled, _ = pooled_fitness(hyps, fitness)
    usable = np.flatnonzero(np.isfinite(pooled) & np.all(np.isfinite(hyps), axis=1))
    if usable.size:
        _, first = np.unique(hyps[usable], axis=0, return_index=True)
        usable = np.sort(usable[first])
    return usable[np.argsort(-pooled[usable], kind="stable")]


def trainings_of(genes: np.ndarray, hyps: np.ndarray) -> int:
    """How many rows of `hyps` hold exactly `genes`."""
    hyps = np.asarray(hyps, dtype=float).reshape(-1, np.size(genes))
    return int(np.sum(np.all(hyps == np.asarray(genes, dtype=float), axis=1)))
