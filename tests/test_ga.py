"""The genetic operators: fitness, parent choice, mutation, de-duplication, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.evolution.ga import (
    child_generator,
    mutate,
    propose_child,
    select_parent,
)
from orchestrator.evolution.proposals import is_taken, round_genes
from trainer.results import fitness

KEYS = 6


def _bounds(gain: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.full(KEYS, gain), np.zeros(KEYS), np.full(KEYS, 10.0)


def test_fitness_weights_map50_and_map_only() -> None:
    results = np.array([[0.9, 0.8, 0.5, 0.3, 1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(fitness(results), [0.1 * 0.5 + 0.9 * 0.3, 1.0])
    assert math.isnan(fitness(np.array([0.5, 0.5, math.nan, 0.3, 0, 0, 0]))[0])


def test_parent_comes_from_the_top_five_and_never_from_nan_rows() -> None:
    rng = np.random.default_rng(0)
    fitness_values = np.array([0.1, math.nan, 0.9, 0.2, 0.8, 0.3, 0.7, 0.05, 0.6])
    hyps = np.arange(len(fitness_values), dtype=float)[:, None] * np.ones((1, KEYS))
    chosen = {select_parent(hyps, fitness_values, rng)[1][0] for _ in range(400)}
    # The five best are 2, 4, 6, 8, 5; the fifth weighs only 1e-6, so it is (almost) never drawn.
    assert {2, 4, 6, 8} <= chosen <= {2, 4, 6, 8, 5}
    hyps[4, 0] = math.nan  # a row with a broken hyp value is not a candidate either
    chosen = {select_parent(hyps, fitness_values, rng)[1][0] for _ in range(400)}
    assert {2, 6, 8, 5} <= chosen <= {2, 6, 8, 5, 3}


def test_single_parent_is_drawn_in_proportion_to_fitness_above_the_worst() -> None:
    rng = np.random.default_rng(1)
    fitness_values = np.array([0.5, 0.7, 0.9])
    hyps = np.eye(3, KEYS)
    draws = [select_parent(hyps, fitness_values, rng)[1][0] for _ in range(3000)]
    shares = np.bincount(draws, minlength=3) / len(draws)
    # weights 1e-6, 0.2, 0.4: the worst row almost never, the best twice as often as the middle
    assert shares[0] < 0.01
    assert shares[2] / shares[1] == pytest.approx(2.0, rel=0.15)


def test_weighted_parent_is_the_weighted_mean_of_the_top_rows() -> None:
    fitness_values = np.array([0.2, 0.4, 0.6])
    hyps = np.array([[1.0] * KEYS, [2.0] * KEYS, [4.0] * KEYS])
    parent, rows = select_parent(hyps, fitness_values, np.random.default_rng(0), method="weighted")
    weights = np.array([1e-6, 0.2 + 1e-6, 0.4 + 1e-6])
    expected = (weights * np.array([1.0, 2.0, 4.0])).sum() / weights.sum()
    np.testing.assert_allclose(parent, expected)
    assert sorted(rows) == [0, 1, 2]


def test_select_parent_without_any_finite_fitness_raises() -> None:
    with pytest.raises(ValueError):
        select_parent(np.ones((2, KEYS)), np.array([math.nan, math.nan]), np.random.default_rng(0))


def test_mutation_stays_in_bounds_changes_something_and_keeps_frozen_genes() -> None:
    rng = np.random.default_rng(2)
    parent = np.array([1.0, 2.0, 9.5, 0.5, 3.0, 7.0])
    gains, lows, highs = _bounds()
    gains[1] = 0.0  # frozen
    lows[3] = 0.4
    for _ in range(300):
        child = mutate(parent, gains, lows, highs, rng)
        assert np.all(child >= lows) and np.all(child <= highs)
        assert child[1] == parent[1]
        assert not np.array_equal(child, parent) or np.any(np.isin(parent, [lows, highs]))
        moved = (parent != 0) & (child > lows) & (child < highs)
        ratio = child[moved] / parent[moved]
        assert np.all((ratio >= 0.3 - 1e-4) & (ratio <= 3.0 + 1e-4))


def test_frozen_genes_outside_their_range_are_not_clamped() -> None:
    parent = np.array([5.0, 20.0])
    gains, lows, highs = np.array([1.0, 0.0]), np.array([0.0, 0.0]), np.array([10.0, 10.0])
    child = mutate(parent, gains, lows, highs, np.random.default_rng(0))
    assert child[1] == 20.0


def test_a_gene_at_zero_can_move() -> None:
    rng = np.random.default_rng(3)
    parent = np.zeros(KEYS)
    children = np.array([mutate(parent, *_bounds(), rng) for _ in range(200)])
    assert np.mean(children > 0) > 0.2  # the classic multiplicative step would leave every gene at 0
    assert np.all(children <= 10.0)


def test_mutation_of_an_all_frozen_space_raises_instead_of_looping() -> None:
    with pytest.raises(ValueError):
        mutate(np.ones(KEYS), *_bounds(gain=0.0), np.random.default_rng(0))


def test_round_genes_matches_what_evolve_csv_keeps() -> None:
    values = np.array([0.0123456789, 12.3456789, 1.23e-7, 0.000014999])
    rounded = round_genes(values)
    np.testing.assert_array_equal(rounded, [0.01235, 12.346, 0.0, 1e-5])
    assert all(float(f"{value:20.5g}") == value for value in rounded)


def test_same_seed_worker_and_claim_give_the_same_child() -> None:
    hyps = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    fitness_values = np.array([0.3, 0.5])
    base = np.ones(KEYS)

    def child(seed: int, worker: str, claim: int) -> np.ndarray:
        rng = child_generator(seed, worker, claim)
        return propose_child(hyps, fitness_values, base, _bounds(), hyps, rng)[0]

    np.testing.assert_array_equal(child(7, "gpu0", 12), child(7, "gpu0", 12))
    assert not np.array_equal(child(7, "gpu0", 12), child(7, "gpu0", 13))
    assert not np.array_equal(child(7, "gpu0", 12), child(7, "gpu1", 12))
    assert not np.array_equal(child(7, "gpu0", 12), child(8, "gpu0", 12))


def test_without_results_the_base_is_mutated() -> None:
    base = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    hyps = np.ones((1, KEYS))
    child, parents = propose_child(hyps, np.array([math.nan]), base, _bounds(), hyps, np.random.default_rng(0))
    assert parents == ()
    assert not np.array_equal(child, base)
    assert np.all(np.abs(child - base) <= 2 * base)


def test_a_child_equal_to_a_row_or_one_in_flight_is_drawn_again() -> None:
    # A gene at its upper bound: every factor above 1 clamps back to the parent itself,
    # so without redrawing about half of the children would repeat the parent's row.
    bounds = (np.array([1.0]), np.array([0.0]), np.array([1.0]))
    rows, row_fitness = np.array([[1.0]]), np.array([0.5])
    for seed in range(50):
        in_flight, _ = propose_child(rows, row_fitness, rows[0], bounds, rows, np.random.default_rng(seed))
        assert in_flight[0] != 1.0
        taken = np.vstack([rows, in_flight])
        child, _ = propose_child(rows, row_fitness, rows[0], bounds, taken, np.random.default_rng(seed))
        assert not is_taken(child, taken)
