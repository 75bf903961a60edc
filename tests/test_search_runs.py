"""Searches, pruning and the time budget through real workers on a real journal."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from orchestrator.evolution.journal import Journal, run_columns
from orchestrator.evolution.loop import GenerationContext, run_worker
from orchestrator.evolution.pruning import GenerationPruned, Pruning
from orchestrator.evolution.search_space import SearchSpace
from trainer.config import Hyp
from trainer.errors import UserError
from trainer.results import ValidationResult

SPACE = SearchSpace.load()
KEYS = run_columns(Hyp())
FORK = multiprocessing.get_context("fork")
EPOCHS = 9
PRUNING = Pruning((1, 3), eta=3, min_count=3)


def curve_objective(hyp: Hyp, context: GenerationContext, epoch_seconds: float = 0.0) -> ValidationResult:
    """A learning curve towards a final score that peaks at lr0=0.02, momentum=0.9; reports at rungs."""
    final = math.exp(-(((hyp.lr0 - 0.02) / 0.02) ** 2) - ((hyp.momentum - 0.9) / 0.1) ** 2)
    for epoch in range(1, EPOCHS + 1):
        time.sleep(epoch_seconds)
        score = final * epoch / EPOCHS
        if epoch in context.rungs and context.report(epoch, score):
            raise GenerationPruned(epoch, score)
    return ValidationResult(final, final, final, final, 1 - final, 1 - final, 0.1)


def evolve(run_dir: Path, generations: int, worker_id: str = "w0", objective=curve_objective, **options: object):
    options = {"seed": 3, "lease_ttl": 5.0, "plot_interval": None, **options}
    return run_worker(run_dir, Hyp(), SPACE, generations, objective, worker_id, **options)


def records(run_dir: Path, status: str) -> list[dict]:
    return [record for record in Journal(run_dir).read_records() if record["status"] == status]


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "claims.json").read_text())


def assert_exact_budget_with_pruning(run_dir: Path, generations: int) -> None:
    """Every generation of the budget is a row or a pruned generation, each from its own claim."""
    population = Journal(run_dir).read_population(KEYS)
    ok, pruned = records(run_dir, "ok"), records(run_dir, "pruned")
    assert len(population) + len(pruned) + state(run_dir)["failed_slots"] == generations
    assert len(ok) == len(population) and state(run_dir)["pruned_slots"] == len(pruned)
    claims = [record["claim"] for record in ok + pruned]
    assert len(claims) == len(set(claims)), "a claim was finished twice"
    rows = {tuple(row) for row in population.hyps}
    assert not {tuple(record["hyp"][key] for key in KEYS) for record in pruned} & rows, "a pruned child is a row"
    assert state(run_dir)["leases"] == {} and state(run_dir)["retry"] == []
    # YOLOv5 reads evolve.csv with np.loadtxt(ndmin=2, delimiter=",", skiprows=1): it still can.
    table = np.loadtxt(run_dir / "evolve.csv", ndmin=2, delimiter=",", skiprows=1)
    assert table.shape == (len(population), 7 + len(KEYS))


def test_a_new_run_records_its_search_and_a_worker_asking_for_another_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    evolve(run_dir, 3, search="population")
    assert state(run_dir)["search"] == "population"
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    with pytest.raises(UserError, match="searches with --search population; this worker asked for --search classic"):
        evolve(run_dir, 4, "w1", search="classic")
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before  # nothing touched
    summary = evolve(run_dir, 4, "w1")  # no --search: the run's own
    assert summary.ok == 1 and state(run_dir)["search"] == "population"


def test_a_run_from_before_searches_were_recorded_goes_on_with_the_classic_ga(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    evolve(run_dir, 2, search="classic")
    values = state(run_dir)
    del values["search"]
    (run_dir / "claims.json").write_text(json.dumps(values))
    with pytest.raises(UserError, match="searches with --search classic"):
        evolve(run_dir, 3, search="elite")
    evolve(run_dir, 3)
    assert state(run_dir)["search"] == "classic"


def test_pruned_generations_count_toward_the_budget_and_never_become_rows(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = evolve(run_dir, 24, pruning=PRUNING)
    pruned = records(run_dir, "pruned")
    assert summary.pruned == len(pruned) > 0 and summary.ok + summary.pruned == 24
    assert_exact_budget_with_pruning(run_dir, 24)
    assert all(record["epoch"] in PRUNING.rungs and math.isfinite(record["fitness"]) for record in pruned)
    rungs = records(run_dir, "rung")
    repeats = [record for record in records(run_dir, "ok") if record["source"].startswith("repeat of row")]
    # Every generation reported at the first rung, except repeats of a best row (never pruned).
    assert Counter(record["epoch"] for record in rungs)[1] == 24 - len(repeats)
    assert not {record["claim"] for record in repeats} & {record["claim"] for record in rungs}
    assert state(run_dir)["pruning"] == PRUNING.to_json()
    recorded = sorted(record["fitness"] for record in rungs if record["epoch"] == 1)
    assert sorted(state(run_dir)["rung_results"]["1"]) == pytest.approx(recorded, abs=1e-6)


def test_the_best_rows_are_trained_again_with_the_next_seed_and_rank_by_their_mean(tmp_path: Path) -> None:
    def lucky_first_training(hyp: Hyp, context: GenerationContext) -> ValidationResult:
        result = curve_objective(hyp, context)
        bonus = 0.2 if context.seed == 3 else 0.0  # the run seed is lucky; a repeat's seed is not
        return ValidationResult(*(value + bonus for value in result.values()))

    run_dir = tmp_path / "run"
    evolve(run_dir, 40, pruning=PRUNING, objective=lucky_first_training)
    ok = records(run_dir, "ok")
    repeats = [record for record in ok if record["source"].startswith("repeat of row")]
    assert [record["claim"] for record in repeats] == [38, 39]  # the last 5% of the budget
    population = Journal(run_dir).read_population(KEYS)
    for record in repeats:
        row = int(record["source"].removeprefix("repeat of row "))
        assert record["seed"] == 3 + 1 and population.hyp_at(record["row"]) == population.hyp_at(row)
    assert all(record["seed"] == 3 for record in ok if record not in repeats)
    # Each repeat lost its luck: the mean of the two trainings is what ranks, so the second
    # repeat is of another row than the first.
    assert repeats[0]["source"] != repeats[1]["source"]
    pooled, trainings = population.pooled()
    best = population.best_row()
    assert pooled[best] == max(pooled) and set(trainings) == {1, 2}
    header = (run_dir / "hyp_evolve.yaml").read_text()
    assert f"# Best generation: {best}\n" in header
    assert ("Mean fitness of its 2 trainings" in header) == (trainings[best] == 2)


def test_a_joining_worker_prunes_as_the_run_does(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    evolve(run_dir, 6, pruning=PRUNING)
    evolve(run_dir, 12, "w1", pruning=None)  # its own setting does not change the run's
    assert state(run_dir)["pruning"] == PRUNING.to_json()
    repeats = {record["claim"] for record in records(run_dir, "ok") if record["source"].startswith("repeat")}
    assert {record["claim"] for record in records(run_dir, "rung")} >= set(range(6, 12)) - repeats


def test_the_time_budget_stops_new_claims_and_lets_the_running_generation_finish(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    started = time.monotonic()
    summary = run_worker(run_dir, Hyp(), SPACE, 1000, lambda hyp, context: curve_objective(hyp, context, 0.05),
                         "w0", 3, hours=1.0 / 3600, lease_ttl=5.0, plot_interval=None)
    assert summary.exit_reason == "time budget spent"
    assert 1.0 <= time.monotonic() - started < 3.0
    assert len(Journal(run_dir).read_population(KEYS)) == summary.ok >= 1  # the last one finished and counts
    assert state(run_dir)["leases"] == {}


def _pruning_worker(run_dir: Path, worker_id: str, generations: int, epoch_seconds: float) -> None:
    run_worker(run_dir, Hyp(), SPACE, generations, lambda hyp, context: curve_objective(hyp, context, epoch_seconds),
               worker_id, 3, search="population", pruning=PRUNING, lease_ttl=1.0, plot_interval=None)


@pytest.mark.slow
def test_three_workers_with_the_population_ga_and_pruning_one_killed_end_with_the_exact_budget(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    victim = FORK.Process(target=_pruning_worker, args=(run_dir, "w1", 30, 10.0))  # stuck in its first epoch
    victim.start()
    deadline = time.monotonic() + 30
    while not ((run_dir / "claims.json").exists() and state(run_dir)["leases"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers = [FORK.Process(target=_pruning_worker, args=(run_dir, name, 30, 0.01)) for name in ("w0", "w2")]
    for process in workers:
        process.start()
    time.sleep(0.5)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    assert_exact_budget_with_pruning(run_dir, 30)
    [expired] = records(run_dir, "expired")
    assert expired["worker"] == "w1"
    assert records(run_dir, "pruned"), "nothing was pruned"
    assert state(run_dir)["search"] == "population"


def test_status_results_and_the_fitness_plot_show_pruned_generations(tmp_path: Path) -> None:
    from rich.console import Console

    from orchestrator.cli.render import render_status, search_summary
    from orchestrator.evolution import artifacts
    from orchestrator.evolution.leases import load_state
    from orchestrator.runs.status import collect_status

    run_dir = tmp_path / "run"
    evolve(run_dir, 15, pruning=PRUNING)
    journal = Journal(run_dir)
    pruned = len(records(run_dir, "pruned"))
    report = collect_status("run", run_dir, "local", ())
    assert report.progress.pruned == pruned and report.progress.search == "elite"
    console = Console(width=200, record=True)
    console.print(render_status(report))
    assert f"{pruned} pruned" in console.export_text()
    population = journal.read_population()
    lines = search_summary(population, journal.read_records(), load_state(journal))
    assert lines[0] == f"search: elite, {pruned} generation(s) pruned early"
    assert lines[1].startswith(f"best fitness {population.fitness.max():.4f}") and "against the base hyp's" in lines[1]
    points = artifacts.pruned_points(journal.read_records())
    assert len(points) == pruned and all(0 <= rows <= len(population) for rows, _ in points)
    assert artifacts.write_plots(run_dir, population, ["lr0", "momentum"], points)
    assert (run_dir / "fitness.png").stat().st_size > 0


@pytest.mark.slow
def test_real_training_reports_at_rungs_and_stops_when_pruned(tiny_data: Path, tmp_path: Path) -> None:
    """The trainer as the objective: validated after each rung epoch (under --noval), stopped when told."""
    from orchestrator.evolution.objective import TrainerObjective
    from trainer.config import TrainConfig

    cfg = TrainConfig(data=str(tiny_data), epochs=3, imgsz=64, batch_size=8, workers=0, device="cpu", noplots=True,
                      project=str(tmp_path))
    objective = TrainerObjective.prepare(cfg)
    reported: list[tuple[int, float]] = []

    def context(prune_at: int | None) -> GenerationContext:
        def report(epoch: int, fitness: float) -> bool:
            reported.append((epoch, fitness))
            return epoch == prune_at
        return GenerationContext(tmp_path, 0, 1, "w0", 0, None, (), "base", rungs=(1, 2), report=report)

    result = objective(Hyp(), context(prune_at=None))
    assert [epoch for epoch, _ in reported] == [1, 2] and isinstance(result, ValidationResult)
    assert all(math.isfinite(fitness) for _, fitness in reported)
    reported.clear()
    with pytest.raises(GenerationPruned) as pruned:
        objective(Hyp(), context(prune_at=1))
    assert pruned.value.epoch == 1 and [epoch for epoch, _ in reported] == [1]

    # A repeat trains with another seed: its own samples and order, not the run's first ones again.
    repeat = GenerationContext(tmp_path, 0, 1, "w0", 7, None, (), "repeat")
    objective(Hyp(), repeat)
    assert objective.prepared.train_set.seed == 7 and objective.prepared.train_batches.sampler.seed == 7


def test_search_schedules_follow_the_time_budget_when_it_is_further_along() -> None:
    from orchestrator.evolution.leases import RunState

    state = RunState(list(KEYS), generations=1000, hours=1.0, created=0.0)
    assert state.progress(rows=10, now=1800.0) == pytest.approx(0.5)  # half the time, 1% of the generations
    assert state.progress(rows=900, now=1800.0) == pytest.approx(0.9)
    assert state.progress(rows=10, now=7200.0) == 1.0
    assert RunState(list(KEYS), generations=100).progress(rows=25, now=1e12) == pytest.approx(0.25)


class Uniform:
    """A search of the caller's own: any object with a name and propose()."""

    name = "uniform"

    def propose(self, context, rng):
        from orchestrator.evolution.proposals import Proposal, UnitSpace

        space = UnitSpace.of(context)
        return Proposal(space.genes(rng.random(len(context.base)), context.base), ())


def test_a_search_object_of_ones_own_runs_under_its_name(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = evolve(run_dir, 4, search=Uniform())
    assert summary.ok == 4 and state(run_dir)["search"] == "uniform"
    with pytest.raises(UserError, match="searches with --search uniform"):
        evolve(run_dir, 5, "w1", search="elite")
    with pytest.raises(UserError, match="--search 'nope': choose one of"):
        evolve(tmp_path / "other", 2, search="nope")
    assert not (tmp_path / "other").exists()  # refused before anything was written
