"""The search algorithms as pure functions: unit space, the population GA, elite sampling,
repeats of a new best, pruning."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.evolution.elite import EliteSearch
from orchestrator.evolution.ga import ClassicSearch
from orchestrator.evolution.population import PopulationSearch
from orchestrator.evolution.proposals import SearchContext, UnitSpace, is_taken
from orchestrator.evolution.pruning import Pruning
from orchestrator.evolution.repeats import distinct_ranked, pooled_fitness
from orchestrator.evolution.search import DEFAULT_SEARCH, SEARCHES, search_named
from trainer.errors import UserError

# Four genes: a log-scale rate (1e-5..0.1), a linear one (0..1), one frozen by gain 0, one
# whose range is a single value (frozen too).
GAINS = np.array([1.0, 1.0, 0.0, 1.0])
LOWS = np.array([1e-5, 0.0, 0.0, 0.5])
HIGHS = np.array([0.1, 1.0, 1.0, 0.5])
BASE = np.array([0.01, 0.5, 0.3, 0.5])


def context(hyps: list[list[float]] | np.ndarray, fitness: list[float], progress: float = 0.0,
            in_flight: list[list[float]] = ()) -> SearchContext:
    hyps = np.asarray(hyps, dtype=float).reshape(-1, 4)
    taken = np.vstack([hyps, np.asarray(in_flight, dtype=float).reshape(-1, 4)])
    return SearchContext(hyps, np.asarray(fitness, dtype=float), taken, BASE, GAINS, LOWS, HIGHS, progress)


def rows(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` rows inside the space, frozen genes at the base, with distinct fitness values."""
    rng = np.random.default_rng(seed)
    hyps = np.tile(BASE, (count, 1))
    hyps[:, 0] = 10 ** rng.uniform(-5, -1, count)
    hyps[:, 1] = rng.uniform(0, 1, count)
    return hyps, np.linspace(0.1, 0.5, count)


# Elite's operators without its repeats of the best rows at the end, which have tests of their own.
ELITE = EliteSearch(confirm_share=0.0)
SEARCH_OBJECTS = [ELITE, PopulationSearch(), ClassicSearch()]


# --- the unit space ------------------------------------------------------------------------

def test_unit_space_is_log_scaled_for_genes_spanning_decades() -> None:
    space = UnitSpace.of(context([], []))
    assert list(space.log) == [True, False, False, False]
    assert list(space.evolving) == [True, True, False, False]
    unit = space.to_unit(np.array([1e-3, 0.25, 0.3, 0.5]))
    assert unit[0] == pytest.approx(0.5)  # 1e-3 is halfway between 1e-5 and 1e-1 in log scale
    assert unit[1] == pytest.approx(0.25)
    back = space.from_unit(unit, BASE)
    np.testing.assert_allclose(back, [1e-3, 0.25, 0.3, 0.5])


def test_unit_space_clamps_and_keeps_frozen_genes() -> None:
    space = UnitSpace.of(context([], []))
    genes = space.genes(np.array([1.7, -0.3, 0.9, 0.9]), BASE)
    assert genes[0] == pytest.approx(0.1) and genes[1] == 0.0  # clamped to the limits
    assert genes[2] == BASE[2] and genes[3] == BASE[3]  # frozen genes keep the given values


# --- every search: the edges ----------------------------------------------------------------

@pytest.mark.parametrize("search", SEARCH_OBJECTS, ids=lambda search: search.name)
def test_no_rows_yet_mutates_the_base(search: object) -> None:
    proposal = search.propose(context([], []), np.random.default_rng(0))
    assert proposal.parents == ()
    assert not np.array_equal(proposal.child, BASE)
    assert proposal.child[2] == BASE[2] and proposal.child[3] == BASE[3]


@pytest.mark.parametrize("search", SEARCH_OBJECTS, ids=lambda search: search.name)
def test_failed_rows_are_never_parents(search: object) -> None:
    hyps, _ = rows(6)
    proposal = search.propose(context(hyps, [math.nan] * 6), np.random.default_rng(1))
    assert proposal.parents == ()  # all failed: as if the run were new


@pytest.mark.parametrize("search", SEARCH_OBJECTS, ids=lambda search: search.name)
@pytest.mark.parametrize("count", [1, 3, 12, 80])  # fewer rows than the population, and more
def test_children_stay_in_bounds_and_frozen_genes_stay(search: object, count: int) -> None:
    hyps, fitness = rows(count)
    for seed in range(20):
        proposal = search.propose(context(hyps, fitness, progress=seed / 19), np.random.default_rng(seed))
        child = proposal.child
        assert np.all(child >= LOWS) and np.all(child <= HIGHS)
        assert child[2] == BASE[2] and child[3] == BASE[3]
        assert all(0 <= row < count for row in proposal.parents)
        assert not is_taken(child, hyps)


@pytest.mark.parametrize("search", SEARCH_OBJECTS[:2], ids=lambda search: search.name)
def test_genes_at_their_bounds_can_move(search: object) -> None:
    """Classic's rounding to 5 decimals pins lr0 at 1e-5 (YOLOv5's behaviour, kept unchanged)."""
    hyps = np.tile(BASE, (8, 1))
    hyps[:, 0], hyps[:, 1] = LOWS[0], HIGHS[1]  # every row at a limit
    hyps[:, 1] = np.linspace(0.9, 1.0, 8)
    children = [search.propose(context(hyps, np.linspace(0.1, 0.8, 8)), np.random.default_rng(seed)).child
                for seed in range(30)]
    assert any(child[0] > LOWS[0] for child in children)


@pytest.mark.parametrize("search", SEARCH_OBJECTS, ids=lambda search: search.name)
def test_children_in_flight_are_not_drawn_again(search: object) -> None:
    hyps, fitness = rows(10)
    first = search.propose(context(hyps, fitness), np.random.default_rng(5)).child
    again = search.propose(context(hyps, fitness, in_flight=[first]), np.random.default_rng(5)).child
    assert not np.array_equal(first, again)


@pytest.mark.parametrize("search", SEARCH_OBJECTS, ids=lambda search: search.name)
def test_the_same_generator_gives_the_same_child(search: object) -> None:
    hyps, fitness = rows(15)
    children = [search.propose(context(hyps, fitness, 0.4), np.random.default_rng(9)).child for _ in range(2)]
    np.testing.assert_array_equal(*children)


@pytest.mark.parametrize("search", SEARCH_OBJECTS, ids=lambda search: search.name)
def test_ties_resolve_to_the_earlier_row(search: object) -> None:
    hyps, _ = rows(6)
    ranked = context(hyps, [0.3, 0.5, 0.5, 0.1, 0.5, 0.2]).ranked()
    assert list(ranked[:3]) == [1, 2, 4]


# --- the population GA ----------------------------------------------------------------------

def test_population_parents_are_an_elite_and_a_tournament_winner() -> None:
    search = PopulationSearch(size=10)
    hyps, fitness = rows(30)
    ranked = context(hyps, fitness).ranked()
    population = ranked[:10]
    rng = np.random.default_rng(0)
    early = [search.parents(population, 0.0, rng) for _ in range(300)]
    late = [search.parents(population, 1.0, rng) for _ in range(300)]
    assert {first for first, _ in early} == set(population[:2])  # 2 elites at the start
    assert {first for first, _ in late} == set(population[:5])  # 5 at the end
    # Tournaments shrink from 10 entrants (always the best) to 2: the winners spread out.
    assert {second for _, second in early} == {population[0]}
    assert len({second for _, second in late}) > 4
    assert all(row in population for _, row in early + late)  # never a row outside the population


def test_population_mutation_steps_scale_with_each_genes_range() -> None:
    search = PopulationSearch(crossover=(0.0, 0.0), mutation=(1.0, 1.0), step=0.1)
    space = UnitSpace.of(context([], []))
    parent = np.array([1e-3, 0.5, 0.3, 0.5])
    children = np.array([search.breed(space, parent, parent, 0.0, np.random.default_rng(seed)) for seed in range(300)])
    log_steps = np.abs(np.log10(children[:, 0] / 1e-3))
    assert log_steps.max() <= 0.4 + 1e-6 and log_steps.max() > 0.3  # a tenth of 4 decades
    assert np.abs(children[:, 1] - 0.5).max() <= 0.1 + 1e-9  # a tenth of [0, 1]


def test_population_crossover_takes_a_tail_from_the_second_parent() -> None:
    search = PopulationSearch(crossover=(1.0, 1.0), mutation=(0.0, 0.0))
    space = UnitSpace.of(context([], []))
    first, second = np.array([1e-4, 0.1, 0.3, 0.5]), np.array([1e-2, 0.9, 0.3, 0.5])
    child = search.breed(space, first, second, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(child, [1e-4, 0.9, 0.3, 0.5])  # two evolving genes: the cut is after the first


# --- elite sampling -------------------------------------------------------------------------

def test_elite_children_centre_on_the_elites_not_on_one_lucky_row() -> None:
    hyps = np.tile(BASE, (20, 1))
    hyps[:, 1] = np.r_[np.full(19, 0.2), 0.95]  # 19 good rows agree; one lucky outlier far away
    hyps[:, 0] = np.geomspace(1e-4, 1e-2, 20)
    fitness = np.r_[np.linspace(0.40, 0.44, 19), 0.45]
    children = np.array([ELITE.propose(context(hyps, fitness, 0.5), np.random.default_rng(seed)).child
                         for seed in range(200)])
    # The outlier weighs most, but the centre stays nearer the elites that agree.
    assert np.median(children[:, 1]) < 0.6


def test_elite_steps_shrink_over_the_budget() -> None:
    hyps, fitness = rows(40)
    hyps[:, 1] = 0.5  # the elites agree on gene 1: its spread is the isotropic step alone
    spreads = []
    for progress in (0.0, 1.0):
        children = np.array([ELITE.propose(context(hyps, fitness, progress), np.random.default_rng(seed)).child
                             for seed in range(300)])
        spreads.append(children[:, 1].std())
    assert spreads[0] == pytest.approx(0.15, rel=0.2) and spreads[1] == pytest.approx(0.03, rel=0.25)


# --- repeats: a new best is trained again, and repeated genes rank by their mean ---------------

def test_pooled_fitness_is_the_mean_over_rows_with_the_same_genes() -> None:
    hyps, _ = rows(4)
    hyps = np.vstack([hyps, hyps[1], hyps[1], hyps[2]])  # row 1 trained three times, row 2 twice
    fitness = np.array([0.2, 0.6, 0.3, 0.1, 0.3, 0.3, math.nan])  # row 2's repeat failed
    pooled, trainings = pooled_fitness(hyps, fitness)
    np.testing.assert_allclose(pooled, [0.2, 0.4, 0.3, 0.1, 0.4, 0.4, math.nan])
    assert list(trainings) == [1, 3, 1, 1, 3, 3, 0]
    assert list(distinct_ranked(hyps, fitness)) == [1, 2, 0, 3]  # row 1 once, at its mean


def test_a_lucky_best_falls_back_when_its_repeat_scores_lower() -> None:
    hyps, _ = rows(5)
    hyps = np.vstack([hyps, hyps[4]])
    fitness = np.array([0.30, 0.35, 0.20, 0.10, 0.50, 0.16])  # row 4: 0.50, then 0.16 when trained again
    assert list(distinct_ranked(hyps, fitness)[:2]) == [1, 4]
    assert pooled_fitness(hyps, fitness)[0][4] == pytest.approx(0.33)


def test_elite_trains_its_best_rows_again_at_the_end_of_the_budget() -> None:
    hyps, fitness = rows(12)
    order = list(np.argsort(-fitness))
    assert not EliteSearch().propose(context(hyps, fitness, 0.9), np.random.default_rng(0)).repeat
    proposal = EliteSearch().propose(context(hyps, fitness, 0.96), np.random.default_rng(0))
    assert proposal.repeat and proposal.parents == (order[0],)
    np.testing.assert_array_equal(proposal.child, hyps[order[0]])
    # The best one's repeat in flight, or done: the next best.
    for ongoing in (context(hyps, fitness, 0.96, in_flight=[hyps[order[0]]]),
                    context(np.vstack([hyps, hyps[order[0]]]), np.r_[fitness, fitness[order[0]]], 0.96)):
        assert EliteSearch().propose(ongoing, np.random.default_rng(0)).parents == (order[1],)
    # The top 5 all trained twice: new children again.
    top = hyps[order[:5]]
    done = context(np.vstack([hyps, top]), np.r_[fitness, fitness[order[:5]]], 0.99)
    proposal = EliteSearch().propose(done, np.random.default_rng(0))
    assert not proposal.repeat and not is_taken(proposal.child, done.taken)


# --- the registry and pruning ---------------------------------------------------------------

def test_searches_by_name() -> None:
    assert set(SEARCHES) == {"elite", "population", "classic"} and DEFAULT_SEARCH == "elite"
    assert search_named("population").name == "population"
    with pytest.raises(UserError, match="--search 'cma': choose one of elite, population, classic"):
        search_named("cma")


def test_pruning_keeps_the_top_third_once_the_rung_has_values() -> None:
    pruning = Pruning((3, 10), eta=3, min_count=3)
    assert pruning.keeps(0.1, [0.1]) and pruning.keeps(0.1, [0.5, 0.1])  # too few values to judge
    assert not pruning.keeps(0.1, [0.5, 0.4, 0.1])  # 3 values: only the best goes on
    assert pruning.keeps(0.5, [0.5, 0.4, 0.1])
    values = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]  # 6 values: the best 2 go on
    assert pruning.keeps(0.8, values) and not pruning.keeps(0.7, values)
    assert not pruning.keeps(math.nan, [*values, math.nan])


def test_pruning_rungs() -> None:
    assert Pruning.for_epochs(30).rungs == (3, 10)
    assert Pruning.for_epochs(9).rungs == (3,)  # epochs/9 = 1 is too early to rank
    assert Pruning.for_epochs(5) is None and Pruning.for_epochs(1) is None  # short generations: no pruning
    assert Pruning.for_epochs(5, rungs=[1, 2]).rungs == (1, 2)  # unless rungs are asked for
    assert Pruning.for_epochs(30, rungs=[5, 30]).rungs == (5,)  # a rung at the last epoch prunes nothing
    with pytest.raises(UserError, match="increasing epochs"):
        Pruning((10, 3))
    with pytest.raises(UserError, match="above 1"):
        Pruning((3,), eta=1)
