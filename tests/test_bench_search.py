"""bench/bench_search.py: its peers and synthetic objective, its statistics, and a tiny run of every
method end to end (two worker processes, one seed), checked line by line and against the journals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench.bench_search import (
    METHODS,
    RandomSearch,
    RealSettings,
    SyntheticObjective,
    TpeSearch,
    parse_arguments,
    ranks,
    real_settings,
    run_space,
    seconds_to_reach,
    spearman,
    vector,
)
from orchestrator.evolution.journal import Journal
from orchestrator.evolution.loop import GenerationContext
from orchestrator.evolution.proposals import SearchContext
from orchestrator.evolution.pruning import GenerationPruned
from trainer.config import Hyp
from trainer.errors import UserError


def test_spearman_averages_tied_ranks_and_matches_a_worked_example() -> None:
    assert ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # Ranks (1,2,3,4,5) against (2,1,4,3,5): 1 - 6·Σd²/(n(n²-1)) = 1 - 6·4/120 = 0.8.
    assert spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None  # too few to rank
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # no spread


def test_seconds_to_reach_is_the_first_point_at_or_above_the_target() -> None:
    series = [[1.0, None], [2.0, 0.3], [3.0, 0.35], [4.0, 0.4]]
    assert seconds_to_reach(series, 0.35) == 3.0
    assert seconds_to_reach(series, 0.5) is None


def test_synthetic_objective_scores_the_base_near_0_3_and_the_optimum_near_0_6() -> None:
    objective = SyntheticObjective(epochs=30, epoch_seconds=0.0, noise=0.0)
    keys, units, landscape = objective.landscape()
    base = Hyp()
    assert objective.curve(base)[-1] == pytest.approx(0.3, abs=0.01)
    optimum_unit = np.zeros(len(keys))
    optimum_unit[units.evolving] = landscape.optimum
    optimum = units.from_unit(optimum_unit, vector(base, keys))
    curve = objective.curve(Hyp.from_dict(dict(zip(keys, optimum))))
    assert 0.55 <= curve[-1] <= 0.6
    assert np.all(np.diff(curve) >= 0)  # a learning curve: it only rises without noise
    rng = np.random.default_rng(0)
    random = [landscape.final(rng.random(int(units.evolving.sum()))) for _ in range(500)]
    assert np.median(random) < 0.3  # a sensible default beats most random hyps


def test_synthetic_objective_reports_at_rungs_and_stops_when_told() -> None:
    objective = SyntheticObjective(epochs=10, epoch_seconds=0.0, noise=0.01)
    reports: list[tuple[int, float]] = []

    def report(epoch: int, fitness: float) -> bool:
        reports.append((epoch, fitness))
        return epoch == 6

    context = GenerationContext(Path("."), claim=3, attempt=1, worker_id="w", seed=0, gpu=None, parents=(),
                                source="mutation", rungs=(2, 6), report=report)
    with pytest.raises(GenerationPruned) as stopped:
        objective(Hyp(), context)
    assert [epoch for epoch, _ in reports] == [2, 6] and stopped.value.epoch == 6
    plain = GenerationContext(Path("."), claim=3, attempt=1, worker_id="w", seed=0, gpu=None, parents=(),
                              source="mutation")
    assert objective(Hyp(), plain) == objective(Hyp(), plain)  # the noise comes from (seed, claim, attempt, worker)


def search_context(rows: int, in_flight: int = 0) -> SearchContext:
    base, space, keys, units = run_space()
    gains, lows, highs = space.bounds(keys)
    rng = np.random.default_rng(1)
    children = []
    for _ in range(rows + in_flight):
        unit = np.where(units.evolving, rng.random(len(keys)), 0.0)
        children.append(units.genes(unit, vector(base, keys)))
    hyps = np.array(children[:rows]).reshape(rows, len(keys))
    return SearchContext(hyps, rng.random(rows), np.array(children).reshape(-1, len(keys)), vector(base, keys),
                         gains, lows, highs)


@pytest.mark.parametrize("search", [RandomSearch(), TpeSearch()], ids=["random", "tpe"])
def test_peers_propose_new_children_inside_the_space_with_frozen_genes_at_the_base(search: Any) -> None:
    pytest.importorskip("optuna")
    context = search_context(rows=12, in_flight=2)
    frozen = context.gains == 0
    for seed in range(3):
        proposal = search.propose(context, np.random.default_rng(seed))
        child = proposal.child
        assert proposal.parents == ()
        assert np.all(child[~frozen] >= context.lows[~frozen]) and np.all(child[~frozen] <= context.highs[~frozen])
        assert np.array_equal(child[frozen], context.base[frozen])
        assert not np.any(np.all(context.taken == child, axis=1))
        Hyp.from_dict(dict(zip(run_space()[2], child)))  # a valid hyp


def read_lines(output: str) -> dict[str, list[dict[str, Any]]]:
    lines: dict[str, list[dict[str, Any]]] = {}
    for text in output.splitlines():
        line = json.loads(text)
        assert line["bench"] == "search"
        lines.setdefault(line["kind"], []).append(line)
    return lines


@pytest.mark.slow
def test_every_method_runs_on_equal_budgets_through_the_real_workers(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    runs_dir = tmp_path / "runs"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_search.py"), "--seeds", "1", "--workers", "2", "--budget", "30",
         "--epochs", "10", "--epoch-seconds", "0.005", "--noise-seeds", "3", "--correlation-seeds", "1",
         "--runs-dir", str(runs_dir), "--plot", str(tmp_path / "search.png")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = read_lines(completed.stdout)
    assert len(lines["noise"]) == 1 and lines["noise"][0]["base_fitness"]["std"] > 0
    (settings,) = lines["settings"]
    budget = settings["budget_worker_s"]
    assert budget == pytest.approx(30 * 10 * 0.005)
    assert sorted(run["method"] for run in lines["run"]) == sorted(METHODS)
    for run in lines["run"]:
        assert run["exit_reasons"] == ["time budget spent"], run["method"]
        assert run["generations"]["ok"] >= 2 and run["final_best"] is not None
        assert run["final_best_noise_free"] == pytest.approx(run["final_best"], abs=0.05)  # σ is 0.01
        # The same time budget: every method's generations took about the same worker-seconds.
        assert run["worker_s"] == pytest.approx(budget, rel=0.35), run["method"]
        totals = [point[0] for point in run["series"]]
        bests = [point[1] for point in run["series"] if point[1] is not None]
        assert totals == sorted(totals) and bests == sorted(bests) and bests[-1] == run["final_best"]
        journal = Journal(runs_dir / f"{run['method']}-seed0")
        records = journal.read_records()
        ok = [record for record in records if record["status"] == "ok"]
        pruned = {record["claim"] for record in records if record["status"] == "pruned"}
        assert len(journal.read_population()) == len(ok) == run["generations"]["ok"]
        assert not pruned & {record["claim"] for record in ok}  # a pruned generation is never a row
        assert len(pruned) == run["generations"].get("pruned", 0)
        if not run["method"].endswith("+pruning"):
            assert not pruned
    assert sum(run["generations"].get("pruned", 0) for run in lines["run"]) > 0
    assert {line["search"] for line in lines["rung_correlation"]} == {"random", "elite"}
    for line in lines["rung_correlation"]:
        assert set(line["rungs"]) == {"3"}  # epochs/9 = 1 is below the first default rung
    summaries = {line["method"]: line for line in lines["summary"]}
    assert set(summaries) == set(METHODS)
    assert summaries["classic"]["worker_s_to_classic_best"]["reached"] == 1  # classic reaches its own best
    for summary in summaries.values():
        statistics = {"median", "mean", "se", "q1", "q3"}
        assert set(summary["final_best"]) == set(summary["final_best_noise_free"]) == statistics
        assert summary["minus_classic"]["seeds"] == 1
    assert (tmp_path / "search.png").stat().st_size > 0


def test_the_real_objective_trains_on_a_named_data_yaml_or_refuses_it_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVOLVECTL_DATASETS", str(tmp_path / "datasets"))  # `synthetic` is generated there
    args = parse_arguments(["--objective", "real", "--data", "synthetic", "--weights", "yolov5n-synthetic",
                            "--imgsz", "128", "--epochs", "3", "--seeds", "0"])
    settings = real_settings(args, tmp_path)
    assert settings == RealSettings("synthetic", args.hyp, args.optimizer, imgsz=128, epochs=3,
                                    weights="yolov5n-synthetic")
    assert not (tmp_path / "data.yaml").exists()  # nothing generated beside the runs
    args = parse_arguments(["--objective", "real", "--data", str(tmp_path / "missing.yaml"), "--seeds", "0"])
    with pytest.raises(UserError, match="missing.yaml"):
        real_settings(args, tmp_path)
