"""Overhead of the evolution loop between two generations, with 10,000 rows in evolve.csv.

Imports 10,000 random rows into a fresh run, then lets a worker run a few generations
of an objective that returns at once. The time from the end of one objective call to
the start of the next is the loop's own cost: lock, read and parse the csv, choose a
parent, mutate, write the lease, then append the row and provenance and rewrite
hyp_evolve.yaml. Plots are timed apart (workers draw them outside the lock, throttled).

    python bench/bench_journal.py [--rows 10000] [--generations 20]

Prints one JSON line; `between_generations_s.max` should stay under 1 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.evolution import artifacts
from orchestrator.evolution.journal import (
    format_header,
    format_rows,
    read_evolve_csv,
    run_columns,
)
from orchestrator.evolution.loop import GenerationContext, run_worker
from orchestrator.evolution.search_space import SearchSpace
from trainer.config import Hyp
from trainer.results import ValidationResult


def write_random_evolve_csv(path: Path, rows: int, hyp_keys: tuple[str, ...], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = np.array([Hyp().as_dict()[key] for key in hyp_keys])
    hyps = base * rng.uniform(0.5, 1.5, size=(rows, len(hyp_keys)))
    results = rng.uniform(0.0, 1.0, size=(rows, 7))
    path.write_bytes(format_header(hyp_keys) + format_rows(results, hyps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--generations", type=int, default=20)
    args = parser.parse_args()

    hyp_keys = run_columns(Hyp())
    with tempfile.TemporaryDirectory() as folder:
        seed_csv = Path(folder) / "seed.csv"
        write_random_evolve_csv(seed_csv, args.rows, hyp_keys)
        started, ended = [], []

        def instant(hyp: Hyp, context: GenerationContext) -> ValidationResult:
            started.append(time.perf_counter())
            score = float(np.exp(-(((hyp.lr0 - 0.02) / 0.02) ** 2)))
            ended.append(time.perf_counter())
            return ValidationResult(score, score, score, score * 0.6, 0.1, 0.1, 0.1)

        run_dir = Path(folder) / "run"
        import_start = time.perf_counter()
        run_worker(
            run_dir, Hyp(), SearchSpace.load(), 1, instant, "bench", 0, population=[seed_csv], plot_interval=None
        )
        import_seconds = time.perf_counter() - import_start
        started.clear(), ended.clear()
        run_worker(run_dir, Hyp(), SearchSpace.load(), 1 + args.generations, instant, "bench", 0, plot_interval=None)
        gaps = [start - end for end, start in zip(ended, started[1:])]

        read_start = time.perf_counter()
        population = read_evolve_csv(run_dir / "evolve.csv")
        read_seconds = time.perf_counter() - read_start
        plot_start = time.perf_counter()
        artifacts.write_plots(run_dir, population, SearchSpace.load().evolved_keys(hyp_keys))
        plot_seconds = time.perf_counter() - plot_start

    print(
        json.dumps(
            {
                "rows": len(population),
                "generations_timed": len(gaps),
                "between_generations_s": {"median": round(statistics.median(gaps), 4), "max": round(max(gaps), 4)},
                "read_population_s": round(read_seconds, 4),
                "import_and_first_generation_s": round(import_seconds, 4),
                "plots_s": round(plot_seconds, 4),
                "target_s": 1.0,
            }
        )
    )


if __name__ == "__main__":
    main()
