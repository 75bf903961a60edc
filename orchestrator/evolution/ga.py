"""The genetic operators of YOLOv5's classic evolution, as pure functions.

Every function takes the random generator it uses; nothing here reads the clock, a
file or a global. Arrays are aligned with the run's hyperparameter columns.

Two defects of the classic operators are fixed: a gene at 0 moves by a step scaled to
its range (a multiplicative factor can never move it), and a child equal to an existing
row or to a child still in training is drawn again.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from orchestrator.evolution.proposals import (
    Proposal,
    SearchContext,
    first_untaken,
    round_genes,
)

TOP_PARENTS = 5
MUTATION_PROBABILITY = 0.8
MUTATION_SIGMA = 0.2
FACTOR_LIMITS = (0.3, 3.0)

ParentMethod = Literal["single", "weighted"]


def child_generator(seed: int, worker_id: str, claim: int) -> np.random.Generator:
    """The generator for one child: reproducible from (run seed, worker, claim), never the clock."""
    worker_hash = zlib.crc32(worker_id.encode())
    return np.random.default_rng(np.random.SeedSequence([seed, worker_hash, claim]))


def select_parent(
    hyps: np.ndarray,
    fitness_values: np.ndarray,
    rng: np.random.Generator,
    method: ParentMethod = "single",
    top: int = TOP_PARENTS,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pick a parent among the best `top` rows, weighted by fitness above the worst of them.

    Rows with a non-finite fitness or hyperparameter are never candidates. Returns the
    parent's values and the row indices it came from. Raises ValueError if no row qualifies.
    """
    usable = np.isfinite(fitness_values) & np.all(np.isfinite(hyps), axis=1)
    candidates = np.flatnonzero(usable)
    if candidates.size == 0:
        raise ValueError("no row with a finite fitness to choose a parent from")
    # Stable sort so equal fitness resolves to the earlier row on every worker.
    order = np.argsort(-fitness_values[candidates], kind="stable")
    best = candidates[order[: min(top, candidates.size)]]
    weights = fitness_values[best] - fitness_values[best].min() + 1e-6
    if method == "single":
        chosen = int(rng.choice(best, p=weights / weights.sum()))
        return hyps[chosen].copy(), (chosen,)
    if method == "weighted":
        mean = (hyps[best] * weights[:, None]).sum(axis=0) / weights.sum()
        return mean, tuple(int(row) for row in best)
    raise ValueError(f"unknown parent method {method!r}: use 'single' or 'weighted'")


def mutate(
    parent: np.ndarray,
    gains: np.ndarray,
    lows: np.ndarray,
    highs: np.ndarray,
    rng: np.random.Generator,
    probability: float = MUTATION_PROBABILITY,
    sigma: float = MUTATION_SIGMA,
) -> np.ndarray:
    """One child of `parent`: factor 1 + gain·[u < p]·N(0,1)·U(0,1)·sigma per gene.

    Factors are clipped to [0.3, 3] and drawn again until one differs from 1; frozen
    genes (gain 0) are returned untouched, the others are clamped to [low, high].
    """
    evolving = gains > 0
    if not np.any(evolving):
        raise ValueError("no gene has a gain above 0: nothing can mutate")
    size = parent.size
    factors = np.ones(size)
    while np.all(factors == 1):
        mutates = rng.random(size) < probability
        # One U(0,1) per child, as the classic operator: it sets this child's overall strength.
        strength = rng.random() * sigma
        factors = np.clip(1 + gains * mutates * rng.standard_normal(size) * strength, *FACTOR_LIMITS)
    span = np.where(np.isfinite(highs - lows), highs - lows, 0.0)
    # At 0 a factor cannot move a gene; take the same relative change of its range instead.
    moved = np.where(parent == 0, (factors - 1) * span, parent * factors)
    clamped = np.clip(round_genes(moved), lows, highs)
    return np.where(evolving, clamped, parent)


def propose_child(
    hyps: np.ndarray,
    fitness_values: np.ndarray,
    base: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray, np.ndarray],
    taken: np.ndarray,
    rng: np.random.Generator,
    method: ParentMethod = "single",
) -> tuple[np.ndarray, tuple[int, ...]]:
    """A new child and its parent rows; mutates `base` while no row has a finite fitness.

    `taken` holds every existing row and every child in training: a child equal to one of
    them is drawn again (see `first_untaken`).
    """
    gains, lows, highs = bounds
    try:
        parent, parents = select_parent(hyps, fitness_values, rng, method)
    except ValueError:
        parent, parents = np.asarray(base, dtype=float), ()
    return first_untaken(lambda: mutate(parent, gains, lows, highs, rng), taken), parents


@dataclass(frozen=True)
class ClassicSearch:
    """YOLOv5 v7.0's evolution: mutate one of the 5 best rows (see the module's docstring)."""

    name: ClassVar[str] = "classic"
    method: ParentMethod = "single"

    def propose(self, context: SearchContext, rng: np.random.Generator) -> Proposal:
        child, parents = propose_child(context.hyps, context.fitness, context.base, context.bounds,
                                       context.taken, rng, self.method)
        return Proposal(child, parents)
