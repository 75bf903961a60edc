"""Search quality per worker-second: every search algorithm on the same objective, workers and time.

For each method and seed, a fresh run folder and `--workers` worker processes on it, each in
`orchestrator.evolution.loop.run_worker`, all started together and stopped by the same time
budget (`hours`, from `--budget` full-length generations' worth of worker time). The methods:
the run's searches (`elite`, `population`, `classic`), each with and without pruning, and two
bench-only peers plugged in as `Search` objects: `random` (uniform in the unit space) and
`tpe` (Optuna's TPE, refitted from the journal at every proposal).

    python bench/bench_search.py [--objective synthetic|real] [--methods elite,classic,...] [--seeds 20]
        [--workers 2] [--budget 80] [--epochs 30] [--epoch-seconds 0.005] [--noise 0.01]
        [--plot PATH] [--runs-dir DIR]

The synthetic objective is a weighted, partly rotated Ackley function over the real search
space's unit coordinates, with a learning curve whose speed depends on the genes, evaluation
noise, and a sleep per epoch so that worker-seconds are real. Prints one JSON line per run (the
best-so-far fitness of evolve.csv against cumulative worker-seconds), one per method (the
summary), the evaluation noise of the base hyp, and the rank correlation between the fitness at
each rung and the final fitness. See bench/README.md for what was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trainer  # noqa: F401, I001  (sets OpenMP's wait policy before torch can load)

import numpy as np

from orchestrator.evolution.elite import EliteSearch
from orchestrator.evolution.journal import Journal, run_columns
from orchestrator.evolution.loop import GenerationContext, Objective, run_worker
from orchestrator.evolution.proposals import Proposal, SearchContext, UnitSpace, first_untaken
from orchestrator.evolution.pruning import GenerationPruned, Pruning
from orchestrator.evolution.search import SEARCHES, Search
from orchestrator.evolution.search_space import SearchSpace
from trainer.config import Hyp
from trainer.results import ValidationResult

METHODS = ("elite", "elite+pruning", "elite-norepeat", "elite-norepeat+pruning", "population",
           "population+pruning", "classic", "classic+pruning", "random", "tpe")
REFERENCE = "classic"  # the method whose final best the others must reach
LARGE_GENERATIONS = 10**6  # the time budget ends every run


# --- Peers: searches that exist only in this bench -------------------------------------------

def unit_space(context: SearchContext) -> tuple[UnitSpace, np.ndarray]:
    space = UnitSpace.of(context)
    return space, np.flatnonzero(space.evolving)


@dataclass(frozen=True)
class RandomSearch:
    """Uniform in the unit space: log-uniform for lr0 and lrf, uniform for the other genes."""

    name: ClassVar[str] = "random"

    def propose(self, context: SearchContext, rng: np.random.Generator) -> Proposal:
        space, genes = unit_space(context)

        def draw() -> np.ndarray:
            unit = np.zeros(context.base.size)
            unit[genes] = rng.random(genes.size)
            return space.genes(unit, context.base)

        return Proposal(first_untaken(draw, context.taken), ())


@dataclass(frozen=True)
class TpeSearch:
    """Optuna's multivariate TPE, refitted from the journal at every proposal.

    An in-memory study gets every finished row as a completed trial and every child in flight
    as a running one (constant liar keeps concurrent workers apart); `ask` then samples the
    evolving genes in the unit space. Frozen genes keep the base hyp's values.
    """

    name: ClassVar[str] = "tpe"

    def propose(self, context: SearchContext, rng: np.random.Generator) -> Proposal:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space, genes = unit_space(context)
        keys = [f"g{gene}" for gene in genes]
        distributions = {key: optuna.distributions.FloatDistribution(0.0, 1.0) for key in keys}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=int(rng.integers(2**31)), constant_liar=True,
                                                 multivariate=True)
        study = optuna.create_study(direction="maximize", sampler=sampler)

        def trial(values: np.ndarray, fitness: float | None) -> optuna.trial.FrozenTrial:
            params = dict(zip(keys, map(float, space.to_unit(values)[genes])))
            state = optuna.trial.TrialState.COMPLETE if fitness is not None else optuna.trial.TrialState.RUNNING
            return optuna.trial.create_trial(state=state, params=params, distributions=distributions, value=fitness)

        finished = [trial(context.hyps[row], float(context.fitness[row])) for row in context.ranked()]
        in_flight = [trial(values, None) for values in context.taken[len(context.hyps):]]
        study.add_trials(finished + in_flight)

        def draw() -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                asked = study.ask(distributions)
            unit = np.zeros(context.base.size)
            unit[genes] = [asked.params[key] for key in keys]
            return space.genes(unit, context.base)

        return Proposal(first_untaken(draw, context.taken), ())


PEERS: dict[str, type] = {"random": RandomSearch, "tpe": TpeSearch}
# Our default without its repeats of the best rows at the end (repeats.py), to measure what they give.
ABLATIONS: dict[str, Callable[[], Search]] = {"elite-norepeat": lambda: EliteSearch(confirm_share=0.0)}


@dataclass(frozen=True)
class TimedSearch:
    """A search under its own name, with the time each proposal takes recorded. (Under a time
    budget the run's own progress follows the share of the time spent, so schedules move.)"""

    inner: Any
    durations: list[float] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def propose(self, context: SearchContext, rng: np.random.Generator) -> Proposal:
        begin = time.perf_counter()
        try:
            return self.inner.propose(context, rng)
        finally:
            self.durations.append(time.perf_counter() - begin)


def make_search(method: str) -> Search:
    name = method.removesuffix("+pruning")
    factory = PEERS.get(name) or ABLATIONS.get(name) or SEARCHES[name]
    return factory()


# --- Objective B: a synthetic landscape over the real search space ---------------------------

def run_space() -> tuple[Hyp, SearchSpace, tuple[str, ...], UnitSpace]:
    """The bundled search space on the default hyp's columns, and its unit space."""
    base, space = Hyp(), SearchSpace.load()
    keys = run_columns(base)
    gains, lows, highs = space.bounds(keys)
    empty = np.zeros((0, len(keys)))
    context = SearchContext(empty, np.zeros(0), empty, vector(base, keys), gains, lows, highs)
    return base, space, keys, UnitSpace.of(context)


def vector(hyp: Hyp, keys: Sequence[str]) -> np.ndarray:
    values = hyp.as_dict(include_unset=True)
    return np.array([values[key] for key in keys], dtype=float)


@dataclass(frozen=True)
class Landscape:
    """Final fitness and learning speed as functions of the unit coordinates of the evolving genes.

    Four genes matter a lot, four moderately, the rest little (weights 3, 1 and 0.25, assigned at
    random); the eight that matter are mixed by a random rotation, so good values of one depend
    on the others. The optimum is a fixed point 0.1 to 0.3 of each gene's range away from the base
    hyp. Ackley's function of the weighted, rotated distance to it sets the final fitness:
    0.6 × exp(-c·ackley), with c such that the base hyp scores 0.3.
    """

    optimum: np.ndarray  # unit coordinates, one per evolving gene
    weights: np.ndarray
    mixed: np.ndarray  # indices of the genes that the rotation mixes
    rotation: np.ndarray
    scale: float
    speed_genes: tuple[int, int, int, int]  # lr0, warmup_epochs, mosaic, scale among the evolving genes
    best: ClassVar[float] = 0.6

    @classmethod
    def build(cls, base_unit: np.ndarray, evolved_keys: Sequence[str], seed: int = 0) -> Landscape:
        rng = np.random.default_rng(seed)
        count = len(evolved_keys)
        weights = np.full(count, 0.25)
        order = rng.permutation(count)
        weights[order[:4]], weights[order[4:8]] = 3.0, 1.0
        # Near the base hyp (a sensible default is closer to the optimum than a random point), not at it.
        optimum = np.clip(base_unit + rng.choice([-1, 1], count) * rng.uniform(0.1, 0.3, count), 0.05, 0.95)
        rotation, _ = np.linalg.qr(rng.standard_normal((8, 8)))
        speed = tuple(list(evolved_keys).index(key) for key in ("lr0", "warmup_epochs", "mosaic", "scale"))
        landscape = cls(optimum, weights, np.sort(order[:8]), rotation, 1.0, speed)
        return dataclasses.replace(landscape, scale=math.log(2) / landscape.ackley(base_unit))

    def ackley(self, unit: np.ndarray) -> float:
        z = self.weights * (unit - self.optimum)
        z[self.mixed] = self.rotation @ z[self.mixed]
        return float(-20 * np.exp(-0.2 * np.sqrt(np.mean(z**2))) - np.exp(np.mean(np.cos(2 * np.pi * z)))
                     + 20 + math.e)

    def final(self, unit: np.ndarray) -> float:
        return self.best * math.exp(-self.scale * self.ackley(unit))

    def time_constant(self, unit: np.ndarray, epochs: int) -> float:
        """Epochs to 63% of the final fitness, from epochs/15 (fast) to epochs/2.5 (slow): a higher
        lr0 learns faster, longer warmups and heavier augmentation slower."""
        lr0, warmup, mosaic, scale = (unit[gene] for gene in self.speed_genes)
        speed = np.clip(0.5 + 0.8 * (lr0 - self.optimum[self.speed_genes[0]]) - 0.4 * (warmup - 0.5)
                        - 0.3 * (mosaic - 0.5) - 0.3 * (scale - 0.5), 0.0, 1.0)
        return epochs / 2.5 * (2.5 / 15) ** float(speed)


@dataclass(frozen=True)
class SyntheticObjective:
    """Objective B: `epochs` epochs of `epoch_seconds` each, reporting at the context's rungs."""

    epochs: int = 30
    epoch_seconds: float = 0.005
    noise: float = 0.01
    landscape_seed: int = 0

    def landscape(self) -> tuple[tuple[str, ...], UnitSpace, Landscape]:
        base, _, keys, units = run_space()
        evolved = [key for key, evolves in zip(keys, units.evolving) if evolves]
        base_unit = units.to_unit(vector(base, keys))[units.evolving]
        return keys, units, Landscape.build(base_unit, evolved, self.landscape_seed)

    def curve(self, hyp: Hyp) -> np.ndarray:
        """The noise-free fitness after each epoch."""
        keys, units, landscape = _landscape_of(self)
        unit = units.to_unit(vector(hyp, keys))[units.evolving]
        epochs = np.arange(1, self.epochs + 1)
        return landscape.final(unit) * (1 - np.exp(-epochs / landscape.time_constant(unit, self.epochs)))

    def __call__(self, hyp: Hyp, context: GenerationContext) -> ValidationResult:
        worker = zlib.crc32(context.worker_id.encode())
        rng = np.random.default_rng([context.seed, context.claim, context.attempt, worker])
        observed = np.clip(self.curve(hyp) + rng.normal(0.0, self.noise, self.epochs), 0.0, None)
        for epoch in range(1, self.epochs + 1):
            time.sleep(self.epoch_seconds)
            if epoch in context.rungs and context.report(epoch, float(observed[epoch - 1])):
                raise GenerationPruned(epoch, float(observed[epoch - 1]))
        return result_for(float(observed[-1]))


_LANDSCAPES: dict[SyntheticObjective, tuple[tuple[str, ...], UnitSpace, Landscape]] = {}


def _landscape_of(objective: SyntheticObjective) -> tuple[tuple[str, ...], UnitSpace, Landscape]:
    if objective not in _LANDSCAPES:  # built once per process: it reads the search space file
        _LANDSCAPES[objective] = objective.landscape()
    return _LANDSCAPES[objective]


def result_for(fitness: float) -> ValidationResult:
    """Seven plausible validation values whose fitness (0.1·mAP@0.5 + 0.9·mAP) is `fitness`."""
    map_ = fitness / (0.1 * 1.8 + 0.9)
    map50 = 1.8 * map_
    return ValidationResult(min(1.0, map50 + 0.1), 0.9 * map50, map50, map_, 0.08 - 0.05 * fitness,
                            0.05 - 0.03 * fitness, 0.02 - 0.015 * fitness)


# --- Objective A: the real trainer -------------------------------------------------------------

@dataclass(frozen=True)
class RealSettings:
    data: str
    hyp: str = "configs/hyps/hyp.quickstart.yaml"
    optimizer: str = "AdamW"
    cfg: str = "yolov5n"
    imgsz: int = 64
    batch_size: int = 16
    epochs: int = 10
    threads: int = 1
    device: str = "cpu"
    weights: str = ""

    def objective(self) -> Objective:
        import torch

        from orchestrator.evolution.objective import TrainerObjective
        from trainer.config import TrainConfig

        torch.set_num_threads(self.threads)
        return TrainerObjective.prepare(TrainConfig(
            data=self.data, cfg=self.cfg, hyp=Hyp.from_yaml(self.hyp), hyp_path=self.hyp, optimizer=self.optimizer,
            epochs=self.epochs, imgsz=self.imgsz, batch_size=self.batch_size, device=self.device, weights=self.weights,
            workers=0, cache="ram"))


_OBJECTIVES: dict[Any, Objective] = {}


def objective_for(settings: SyntheticObjective | RealSettings) -> tuple[Objective, Hyp]:
    """The objective and its base hyp; a real trainer's data is prepared once per process."""
    if isinstance(settings, SyntheticObjective):
        return settings, Hyp()
    if settings not in _OBJECTIVES:
        _OBJECTIVES[settings] = settings.objective()
    return _OBJECTIVES[settings], _OBJECTIVES[settings].cfg.hyp  # type: ignore[attr-defined]


# --- Running: a pool of worker processes that start each run together --------------------------

@dataclass(frozen=True)
class Task:
    run_dir: str
    method: str
    seed: int
    worker_id: str
    hours: float
    pruning: Pruning | None
    objective: SyntheticObjective | RealSettings


def worker_main(tasks: Any, results: Any, barrier: Any) -> None:
    """One worker process: for each task, wait for the other workers, then evolve until time is up.
    A failure goes back to the parent as `error`, after the barrier, so no other worker waits forever."""
    import logging
    import traceback

    logging.basicConfig(level=logging.WARNING)
    while (task := tasks.get()) is not None:
        try:
            objective, base = objective_for(task.objective)
        except Exception:  # noqa: BLE001 (any failure goes back to the parent, which stops the bench)
            objective, error = None, traceback.format_exc()
        barrier.wait()
        started = time.time()
        search = TimedSearch(make_search(task.method))
        try:
            if objective is None:
                raise RuntimeError(error)
            summary = run_worker(task.run_dir, base, SearchSpace.load(), LARGE_GENERATIONS, objective,
                                 task.worker_id, task.seed, search=search, pruning=task.pruning, hours=task.hours,
                                 plot_interval=None, hparams=False)
        except Exception:  # noqa: BLE001 (as above)
            results.put({"worker": task.worker_id, "error": traceback.format_exc()})
            continue
        results.put({"worker": task.worker_id, "ok": summary.ok, "pruned": summary.pruned, "failed": summary.failed,
                     "exit_reason": summary.exit_reason, "wall_s": time.time() - started,
                     "propose_s": search.durations})


class WorkerPool:
    """`count` spawned processes, reused for every run so that start-up is paid once."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.barrier = context.Barrier(count)
        self.results = context.Queue()
        self.queues = [context.Queue() for _ in range(count)]
        self.processes = [context.Process(target=worker_main, args=(queue, self.results, self.barrier), daemon=True)
                          for queue in self.queues]
        for process in self.processes:
            process.start()

    def run(self, tasks: Sequence[Task]) -> list[dict[str, Any]]:
        for queue, task in zip(self.queues, tasks):
            queue.put(task)
        answers = [self.results.get(timeout=max(600.0, tasks[0].hours * 3600 * 4)) for _ in tasks]
        errors = [answer["error"] for answer in answers if "error" in answer]
        if errors:
            raise RuntimeError(f"a worker of {tasks[0].run_dir} failed:\n{errors[0]}")
        return answers

    def close(self) -> None:
        for queue in self.queues:
            queue.put(None)
        for process in self.processes:
            process.join(timeout=30)


# --- Reading a run back ------------------------------------------------------------------------

def run_series(run_dir: Path) -> tuple[list[list[float | None]], dict[str, int]]:
    """Best-so-far fitness of evolve.csv's rows against cumulative worker-seconds (every finished
    attempt counts, pruned and failed too), in the order the attempts ended."""
    journal = Journal(run_dir)
    fitness = journal.read_population().fitness
    ended = sorted((record for record in journal.read_records() if "seconds" in record and record["status"] != "rung"),
                   key=lambda record: record["end"])
    counts: dict[str, int] = {}
    total, best, series = 0.0, -math.inf, []
    for record in ended:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
        total += record["seconds"]
        if record["status"] == "ok" and math.isfinite(fitness[record["row"]]):
            best = max(best, float(fitness[record["row"]]))
        series.append([round(total, 3), round(best, 5) if math.isfinite(best) else None])
    return series, counts


def rung_pairs(run_dir: Path) -> dict[int, list[tuple[float, float]]]:
    """(fitness at the rung, final fitness) of every generation that reached full length, per rung epoch."""
    journal = Journal(run_dir)
    fitness = journal.read_population().fitness
    records = journal.read_records()
    final = {(record["claim"], record["attempt"]): float(fitness[record["row"]])
             for record in records if record["status"] == "ok"}
    pairs: dict[int, list[tuple[float, float]]] = {}
    for record in records:
        key = (record["claim"], record["attempt"])
        if record["status"] == "rung" and key in final:
            pairs.setdefault(record["epoch"], []).append((record["fitness"], final[key]))
    return pairs


def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(first: Sequence[float], second: Sequence[float]) -> float | None:
    if len(first) < 3:
        return None
    x, y = ranks(first), ranks(second)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def best_at(series: Sequence[Sequence[float | None]], seconds: float) -> float:
    """The best-so-far fitness after `seconds` worker-seconds; NaN before the first row."""
    best = math.nan
    for total, value in series:
        if total > seconds:
            break
        best = math.nan if value is None else value
    return best


def seconds_to_reach(series: Sequence[Sequence[float | None]], target: float) -> float | None:
    return next((total for total, value in series if value is not None and value >= target), None)


def describe(values: Sequence[float], digits: int = 4) -> dict[str, float | None]:
    values = [value for value in values if math.isfinite(value)]
    if not values:
        return {"median": None, "mean": None, "se": None, "q1": None, "q3": None}
    q1, q3 = np.percentile(values, [25, 75])
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"median": round(statistics.median(values), digits), "mean": round(statistics.mean(values), digits),
            "se": None if se is None else round(se, digits), "q1": round(float(q1), digits),
            "q3": round(float(q3), digits)}


def paired_difference(own: Sequence[dict[str, Any]], by_key: dict[tuple[str, int], dict[str, Any]],
                      key: str = "final_best") -> dict[str, Any]:
    """`key` minus the reference's of the same seed: mean and standard error over seeds."""
    differences = [run[key] - by_key[(REFERENCE, run["seed"])][key] for run in own
                   if run.get(key) is not None and by_key.get((REFERENCE, run["seed"]), {}).get(key) is not None]
    se = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else None
    return {"mean": round(statistics.mean(differences), 4) if differences else None,
            "se": None if se is None else round(se, 4), "seeds": len(differences)}


def summarise(runs: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One line per method: final best, the best at the worker-seconds every run reached, and the
    worker-seconds to reach the reference's final best of the same seed."""
    by_key = {(run["method"], run["seed"]): run for run in runs}
    # The same wall-clock budget gives each method slightly different generation time (the journal's
    # own work per row is outside it), so the best is also compared at the least any run reached.
    common = min((run["worker_s"] for run in runs), default=0.0)
    lines = []
    for method in methods:
        own = [run for run in runs if run["method"] == method]
        reach = []
        for run in own:
            reference = by_key.get((REFERENCE, run["seed"]))
            if reference is not None and reference["final_best"] is not None:
                reach.append(seconds_to_reach(run["series"], reference["final_best"]))
        reached = sorted(math.inf if value is None else value for value in reach)
        median = statistics.median(reached) if reached else math.inf
        lines.append({
            "bench": "search", "kind": "summary", "method": method, "seeds": len(own),
            "final_best": describe([run["final_best"] if run["final_best"] is not None else math.nan for run in own]),
            "best_at_common_worker_s": {"worker_s": round(common, 3),
                                        **describe([best_at(run["series"], common) for run in own])},
            f"minus_{REFERENCE}": paired_difference(own, by_key),
            **({"final_best_noise_free": describe([run["final_best_noise_free"] for run in own]),
                f"noise_free_minus_{REFERENCE}": paired_difference(own, by_key, "final_best_noise_free")}
               if own and all(run.get("final_best_noise_free") is not None for run in own) else {}),
            f"worker_s_to_{REFERENCE}_best": {"median": round(median, 2) if math.isfinite(median) else None,
                                                "reached": sum(math.isfinite(value) for value in reached),
                                                "of": len(reached)},
            "worker_s": describe([run["worker_s"] for run in own], 2),
            "generations": {status: round(statistics.mean(run["generations"].get(status, 0) for run in own), 1)
                            for status in ("ok", "pruned", "failed")},
            "propose_ms_median": round(statistics.median(run["propose_ms_median"] for run in own), 2) if own else None,
        })
    return lines


# --- The benchmark -----------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchPlan:
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    workers: int
    budget_worker_s: float  # every run's time budget, in worker-seconds
    objective: SyntheticObjective | RealSettings
    pruning: Pruning | None

    @property
    def hours(self) -> float:
        return self.budget_worker_s / self.workers / 3600


def run_one(pool: WorkerPool, plan: BenchPlan, method: str, seed: int, run_dir: Path,
            pruning: Pruning | None) -> dict[str, Any]:
    tasks = [Task(str(run_dir), method, seed, f"w{index}", plan.hours, pruning, plan.objective)
             for index in range(plan.workers)]
    workers = pool.run(tasks)
    series, counts = run_series(run_dir)
    proposals = [seconds for worker in workers for seconds in worker["propose_s"]]
    extra = {}
    if isinstance(plan.objective, SyntheticObjective):
        extra["final_best_noise_free"] = picked_quality(plan.objective, run_dir)
    return {
        "bench": "search", "kind": "run", "method": method, "seed": seed, "workers": plan.workers,
        "budget_worker_s": round(plan.budget_worker_s, 3),
        "worker_s": series[-1][0] if series else 0.0,  # generation time, what the series counts
        "wall_worker_s": round(sum(worker["wall_s"] for worker in workers), 3),  # also claims, proposals, waits
        "final_best": next((value for _, value in reversed(series) if value is not None), None),
        **extra,
        "generations": counts,
        "propose_ms_median": round(1000 * statistics.median(proposals), 2) if proposals else 0.0,
        "exit_reasons": sorted({worker["exit_reason"] for worker in workers}),
        "series": series,
    }


def picked_quality(objective: SyntheticObjective, run_dir: Path) -> float | None:
    """The noise-free final fitness of the row the run ranks best: what a user who takes it gets."""
    population = Journal(run_dir).read_population()
    row = population.best_row()
    return None if row is None else round(float(objective.curve(Hyp.from_dict(population.hyp_at(row)))[-1]), 5)


def method_pruning(plan: BenchPlan, method: str) -> Pruning | None:
    return plan.pruning if method.endswith("+pruning") else None


def run_bench(plan: BenchPlan, runs_dir: Path, emit: Callable[[dict[str, Any]], None],
              correlation_seeds: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Every (seed, method) run, seed by seed so that a change in the machine's load hits all methods
    alike; then the rung correlation pass. Returns the run lines."""
    runs = []
    pool = WorkerPool(plan.workers)
    try:
        for seed in plan.seeds:
            for method in plan.methods:
                run_dir = runs_dir / f"{method}-seed{seed}"
                line = run_one(pool, plan, method, seed, run_dir, method_pruning(plan, method))
                emit(line)
                runs.append(line)
        if plan.pruning is not None:
            # Pruning that only records: min_count so high that no rung ever has enough values to prune.
            recording = dataclasses.replace(plan.pruning, min_count=10**9)
            for method in ("random", "elite"):
                emit(rung_correlation(pool, plan, method, correlation_seeds, runs_dir, recording))
    finally:
        pool.close()
    return runs


def rung_correlation(pool: WorkerPool, plan: BenchPlan, method: str, seeds: Sequence[int], runs_dir: Path,
                     recording: Pruning) -> dict[str, Any]:
    per_rung: dict[int, list[float | None]] = {rung: [] for rung in recording.rungs}
    sizes: dict[int, list[int]] = {rung: [] for rung in recording.rungs}
    for seed in seeds:
        run_dir = runs_dir / f"correlation-{method}-seed{seed}"
        run_one(pool, plan, method, seed, run_dir, recording)
        pairs = rung_pairs(run_dir)
        for rung in recording.rungs:
            found = pairs.get(rung, [])
            per_rung[rung].append(spearman([at for at, _ in found], [end for _, end in found]))
            sizes[rung].append(len(found))
    return {"bench": "search", "kind": "rung_correlation", "search": method, "seeds": list(seeds),
            "rungs": {str(rung): {"spearman_mean": _mean(values), "per_seed": [_round(value) for value in values],
                                  "generations_per_seed": sizes[rung]} for rung, values in per_rung.items()}}


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.mean(present), 3) if present else None


def base_noise(objective: SyntheticObjective | RealSettings, seeds: Sequence[int], run_dir: Path) -> dict[str, Any]:
    """The fitness of the base hyp, trained once per seed: the evaluation noise a search has to see through."""
    call, base = objective_for(objective)
    values, seconds = [], []
    for seed in seeds:
        context = GenerationContext(run_dir, claim=0, attempt=1, worker_id="noise", seed=seed, gpu=None, parents=(),
                                    source="base")
        started = time.perf_counter()
        values.append(call(base, context).fitness)
        seconds.append(time.perf_counter() - started)
    line = {"bench": "search", "kind": "noise", "seeds": len(values),
            "base_fitness": {"mean": round(statistics.mean(values), 4),
                             "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
                             "values": [round(value, 4) for value in values]},
            "generation_s": {"median": round(statistics.median(seconds), 3), "max": round(max(seconds), 3)}}
    if isinstance(objective, SyntheticObjective):
        keys, units, landscape = _landscape_of(objective)
        line["base_fitness"]["noise_free"] = round(float(objective.curve(base)[-1]), 4)
        optimum = Hyp.from_dict(dict(zip(keys, units.from_unit(_embed(units, landscape.optimum), vector(base, keys)))))
        line["optimum_fitness_noise_free"] = round(float(objective.curve(optimum)[-1]), 4)
    return line


def _embed(units: UnitSpace, evolving_values: np.ndarray) -> np.ndarray:
    unit = np.zeros(units.evolving.size)
    unit[units.evolving] = evolving_values
    return unit


def plot(runs: Sequence[dict[str, Any]], methods: Sequence[str], path: Path, budget: float) -> None:
    """Median best-so-far against worker-seconds per method, with the inter-quartile band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, max([budget] + [run["worker_s"] for run in runs]), 200)
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for method in methods:
        curves = np.array([[best_at(run["series"], seconds) for seconds in grid]
                           for run in runs if run["method"] == method])
        if curves.size == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # before the first row every value is NaN
            low, median, high = np.nanpercentile(curves, [25, 50, 75], axis=0)
        style = "--" if method.endswith("+pruning") else "-"
        (drawn,) = axes.plot(grid, median, style, label=method)
        axes.fill_between(grid, low, high, color=drawn.get_color(), alpha=0.12)
    axes.set_xlabel("worker-seconds (generation time, all workers)")
    axes.set_ylabel("best fitness so far (median, IQR band)")
    axes.set_title(f"{len({run['seed'] for run in runs})} seeds per method")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"--methods {','.join(unknown)}: choose among {','.join(METHODS)}")
    return methods


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--methods", type=parse_methods, default=METHODS)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default: 20 synthetic, 3 real)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per run")
    parser.add_argument("--budget", type=float, default=80,
                        help="time budget per run, in full-length generations' worth of worker-seconds")
    parser.add_argument("--epochs", type=int, default=None, help="full length (default: 30 synthetic, 10 real)")
    parser.add_argument("--epoch-seconds", type=float, default=0.005, help="synthetic: sleep per epoch")
    parser.add_argument("--noise", type=float, default=0.01, help="synthetic: std of the evaluation noise")
    parser.add_argument("--generation-seconds", type=float, default=None,
                        help="real: one full generation's worker-seconds, for the budget (measure with --seeds 0)")
    parser.add_argument("--prune-rungs", default=None, help="rung epochs, e.g. 3,10 (default: epochs/9, epochs/3)")
    parser.add_argument("--prune-eta", type=float, default=3.0)
    parser.add_argument("--noise-seeds", type=int, default=None,
                        help="base-hyp evaluations (default: 20 synthetic, 3 real)")
    parser.add_argument("--correlation-seeds", type=int, default=3, help="runs per search of the rung-correlation pass")
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--val-images", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="real: the device every worker trains on")
    parser.add_argument("--weights", default="", help="real: initial weights (default: from scratch)")
    parser.add_argument("--val-on-train", action="store_true", help="real: validate on the training images")
    parser.add_argument("--data", default=None,
                        help="real: a data YAML or bundled name (e.g. synthetic, the main job's) "
                             "instead of a generated set")
    parser.add_argument("--hyp", default="configs/hyps/hyp.quickstart.yaml")
    parser.add_argument("--optimizer", default="AdamW")
    parser.add_argument("--plot", type=Path, default=None, help="write the best-so-far picture here (PNG)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--from-lines", type=Path, default=None,
                        help="no runs: summarise (and --plot) the run lines of an earlier output file")
    args = parser.parse_args(argv)
    synthetic = args.objective == "synthetic"
    args.seeds = args.seeds if args.seeds is not None else (20 if synthetic else 3)
    args.epochs = args.epochs or (30 if synthetic else 10)
    args.noise_seeds = args.noise_seeds if args.noise_seeds is not None else (20 if synthetic else 3)
    if args.workers < 1 or args.budget <= 0 or args.epochs < 2:
        parser.error("--workers, --budget and --epochs must be positive (--epochs at least 2)")
    if not synthetic and args.seeds and args.generation_seconds is None:
        parser.error("--objective real needs --generation-seconds (run with --seeds 0 first: its noise line times one)")
    return args


def real_settings(args: argparse.Namespace, folder: Path) -> RealSettings:
    """The trainer settings, on `--data` or on a small generated synthetic dataset (written once, here)."""
    import yaml

    from trainer.data import load_data_config

    if args.data:
        load_data_config(args.data)  # a clear error before any worker starts, and generated once
        return RealSettings(args.data, args.hyp, args.optimizer, imgsz=args.imgsz, batch_size=args.batch_size,
                            epochs=args.epochs, device=args.device, weights=args.weights)
    names = ["disc", "square", "triangle", "cross", "ring", "diamond"]
    # --val-on-train: the score is how well the training images are learnt in the time, which a
    # short run on a small set can raise well above the noise; held-out images stay near 0 there.
    val = "images/train" if args.val_on_train else "images/val"
    config = {"path": str(folder / "data"), "train": "images/train", "val": val, "names": names,
              "synthetic": {"seed": 0, "train": args.train_images, "val": args.val_images, "size": args.imgsz}}
    data = folder / "data.yaml"
    data.write_text(yaml.safe_dump(config, sort_keys=False))
    load_data_config(str(data))  # generates the images before any worker reads them
    return RealSettings(str(data), args.hyp, args.optimizer, imgsz=args.imgsz, batch_size=args.batch_size,
                        epochs=args.epochs, device=args.device, weights=args.weights)


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def summarise_file(path: Path, picture: Path | None, emit: Callable[[dict[str, Any]], None]) -> None:
    lines = [json.loads(text) for text in path.read_text().splitlines() if text.strip()]
    runs = [line for line in lines if line.get("kind") == "run"]
    methods = [method for method in METHODS if any(run["method"] == method for run in runs)]
    for line in summarise(runs, methods):
        emit(line)
    if picture:
        plot(runs, methods, picture, max(run["budget_worker_s"] for run in runs))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.from_lines:
        summarise_file(args.from_lines, args.plot, emit)
        return
    with tempfile.TemporaryDirectory() as temporary:
        runs_dir = args.runs_dir or Path(temporary)
        runs_dir.mkdir(parents=True, exist_ok=True)
        if args.objective == "synthetic":
            objective: SyntheticObjective | RealSettings = SyntheticObjective(args.epochs, args.epoch_seconds,
                                                                              args.noise)
            generation_seconds = args.epochs * args.epoch_seconds
        else:
            objective = real_settings(args, runs_dir)
            generation_seconds = args.generation_seconds or 0.0
        rungs = None if args.prune_rungs is None else tuple(int(part) for part in args.prune_rungs.split(","))
        pruning = Pruning.for_epochs(args.epochs, rungs, args.prune_eta)
        emit(base_noise(objective, range(args.noise_seeds), runs_dir / "noise") | {"objective": args.objective})
        if not args.seeds:
            return
        plan = BenchPlan(args.methods, tuple(range(args.seeds)), args.workers, args.budget * generation_seconds,
                         objective, pruning)
        emit({"bench": "search", "kind": "settings", "objective": args.objective, "methods": list(plan.methods),
              "seeds": args.seeds, "workers": plan.workers, "budget_generations": args.budget,
              "budget_worker_s": plan.budget_worker_s, "hours": plan.hours,
              "pruning": pruning.to_json() if pruning else None,
              "objective_settings": dataclasses.asdict(objective), "cpu_count": multiprocessing.cpu_count()})
        correlation = range(1000, 1000 + args.correlation_seeds)
        runs = run_bench(plan, runs_dir, emit, correlation)
        for line in summarise(runs, plan.methods):
            emit(line)
        if args.plot:
            plot(runs, plan.methods, args.plot, plan.budget_worker_s)


if __name__ == "__main__":
    main()
