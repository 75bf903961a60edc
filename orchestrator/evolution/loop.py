"""One evolution worker: claim a slot, train a child, record the result, until the budget is met.

A worker per GPU runs `run_worker` against the same run directory. Each generation is:
under the lock, claim a slot and draw its child (recorded in the lease, so every worker
sees it); train it with the lock released while a heartbeat keeps the lease alive; under
the lock again, append the result (or record the failure) and rewrite hyp_evolve.yaml.

The trainer plugs in as an `Objective`: a callable taking the child `Hyp` and a
`GenerationContext`, returning a `ValidationResult`, or raising `GenerationFailed` (or
any exception) when the generation diverges, runs out of memory or crashes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from orchestrator.evolution import artifacts
from orchestrator.evolution.ga import child_generator
from orchestrator.evolution.journal import Journal
from orchestrator.evolution.leases import (
    Heartbeat,
    Lease,
    RunRequest,
    RunState,
    WorkerIdentity,
    expire_leases,
    lease_record,
    load_state,
    offer_slot,
    prepare_run,
    reclaim_lease,
    release_failed,
    save_state,
    start_lease,
)
from orchestrator.evolution.proposals import SearchContext
from orchestrator.evolution.pruning import GenerationPruned, Pruning
from orchestrator.evolution.repeats import trainings_of
from orchestrator.evolution.search import Search, search_named
from orchestrator.evolution.search_space import SearchSpace
from trainer.config import Hyp
from trainer.errors import CannotWrite, TrainingDiverged
from trainer.results import ValidationResult

logger = logging.getLogger(__name__)

FailureKind = Literal["diverged", "oom", "crash"]


class GenerationFailed(Exception):
    """A generation that produced no usable result; `kind` is diverged, oom or crash."""

    def __init__(self, reason: str, kind: FailureKind = "crash") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class GenerationContext:
    """What the objective may need to know about the generation it trains."""

    run_dir: Path
    claim: int  # unique per run; also seeds the child's mutation
    attempt: int  # 1 for a slot's first try, more after failures or expired leases
    worker_id: str
    seed: int  # the run seed, so results compare fairly; plus the earlier trainings of a repeat's genes
    gpu: str | None
    parents: tuple[int, ...]  # evolve.csv rows the child came from
    source: str  # base, population:<file>, mutation, repeat of row N, retry of claim N
    rungs: tuple[int, ...] = ()  # epochs (from 1) after which the objective reports its fitness
    report: Callable[[int, float], bool] = lambda epoch, fitness: False  # True: stop (raise GenerationPruned)


Objective = Callable[[Hyp, GenerationContext], ValidationResult]


@dataclass(frozen=True)
class WorkerSummary:
    worker_id: str
    ok: int  # results appended to evolve.csv
    failed: int  # attempts recorded as failed
    stale: int  # results dropped because the lease had been handed to another worker
    claims: tuple[int, ...]
    exit_reason: str  # "budget reached", "time budget spent" or "stop requested"
    pruned: int = 0  # generations stopped early at a rung


@dataclass(frozen=True)
class _Plan:
    """Everything fixed for the life of one worker."""

    journal: Journal
    base_hyp: Hyp
    hyp_keys: tuple[str, ...]
    bounds: tuple[np.ndarray, np.ndarray, np.ndarray]
    evolved_keys: tuple[str, ...]
    identity: WorkerIdentity
    seed: int
    search: Search
    pruning: Pruning | None
    lease_ttl: float
    max_attempts: int
    hparams: bool  # a TensorBoard HParams record per generation

    @property
    def base_values(self) -> np.ndarray:
        base = self.base_hyp.as_dict(include_unset=True)
        return np.array([base[key] for key in self.hyp_keys], dtype=float)

    @property
    def poll_interval(self) -> float:
        return min(self.lease_ttl / 4, 5.0)


class NoLease(enum.Enum):
    """Why a claim granted no lease."""

    WAIT = "every open slot is in flight elsewhere"
    BUDGET_REACHED = "budget reached"
    TIME_SPENT = "time budget spent"


def run_worker(
    run_dir: str | Path,
    base_hyp: Hyp,
    space: SearchSpace,
    generations: int,
    objective: Objective,
    worker_id: str,
    seed: int,
    gpu: str | None = None,
    *,
    population: Sequence[str | Path] = (),
    search: str | Search | None = None,
    pruning: Pruning | None = None,
    hours: float | None = None,
    lease_ttl: float = 60.0,
    max_attempts: int = 3,
    stop: threading.Event | None = None,
    soft_lock: bool = False,
    plot_interval: float | None = 60.0,
    hparams: bool = True,
) -> WorkerSummary:
    """Evolve until `generations` results exist in the run (a total shared by all workers).

    Bad input raises UserError before the run directory is touched. `stop` (or SIGTERM,
    or a STOP file in the run directory) makes the worker finish its current generation
    and return. `population` seeds a new run from hyp YAMLs and/or YOLOv5 evolve.csv files.
    `search` names the algorithm that proposes children (None: the run's own, or the default
    for a new run; a `Search` object brings its own, under its name); a worker asking for
    another than the run's is refused. `pruning` (a new run's; None: off) stops generations
    early at rungs, and `hours` stops new claims once the run is that old.
    Plots are redrawn at most every `plot_interval` seconds and on exit (None: never), and each
    row gets a TensorBoard HParams record unless `hparams` is False.
    """
    journal = Journal(run_dir, soft_lock=soft_lock)
    searcher = search_named(search) if isinstance(search, str) else search  # an unknown name fails here, first
    name = searcher.name if searcher is not None else None
    state = prepare_run(journal, RunRequest(base_hyp, space, generations, population, name, pruning, hours))
    hyp_keys = tuple(state.hyp_keys)
    searcher = searcher or search_named(state.search)
    plan = _Plan(journal, base_hyp, hyp_keys, space.bounds(hyp_keys), tuple(space.evolved_keys(hyp_keys)),
                 WorkerIdentity(worker_id, gpu), seed, searcher, Pruning.from_json(state.pruning), lease_ttl,
                 max_attempts, hparams)
    stop = stop or threading.Event()
    with _stop_on_sigterm(stop):
        counts, claims, exit_reason = _work(plan, objective, stop, plot_interval)
    logger.info("worker %s: %s after %d claims (%s)", worker_id, exit_reason, len(claims), dict(counts))
    return WorkerSummary(worker_id, counts["ok"], counts["failed"], counts["stale"], tuple(claims), exit_reason,
                         counts["pruned"])


def _work(plan: _Plan, objective: Objective, stop: threading.Event,
          plot_interval: float | None) -> tuple[Counter[str], list[int], str]:
    """Claim and train generations until the budget or the time is spent, or a stop is asked for."""
    counts: Counter[str] = Counter()
    claims: list[int] = []
    exit_reason = NoLease.BUDGET_REACHED.value
    last_plot = time.monotonic()
    while not (stop.is_set() or plan.journal.stop_requested()):
        lease = _claim(plan)
        if lease in (NoLease.BUDGET_REACHED, NoLease.TIME_SPENT):
            exit_reason = lease.value
            break
        if lease is NoLease.WAIT:  # wait for a slot in flight elsewhere to end or expire
            stop.wait(plan.poll_interval)
            continue
        claims.append(lease.claim)
        counts[_run_generation(plan, lease, objective)] += 1
        if plot_interval is not None and time.monotonic() - last_plot >= plot_interval:
            _write_plots(plan)
            last_plot = time.monotonic()
    if plot_interval is not None:
        _write_plots(plan)
    if stop.is_set() or plan.journal.stop_requested():
        exit_reason = "stop requested"
    return counts, claims, exit_reason


def _claim(plan: _Plan) -> Lease | NoLease:
    """Under the lock: expire dead leases, take a slot, draw its child, record the lease."""
    journal = plan.journal
    with journal.locked():
        state = load_state(journal)
        if state is None:
            raise RuntimeError(f"{journal.state_path} disappeared while the run was going on")
        now = time.time()
        expired = expire_leases(state, now, plan.max_attempts)
        rows = journal.count_rows()
        offer = None if state.time_spent(now) else offer_slot(state, rows)
        lease = None
        if offer is not None:
            hyp, parents = offer.hyp, offer.parents
            if hyp is None:
                hyp, parents, repeat = _draw_child(plan, state, offer.claim)
                if repeat:
                    offer = dataclasses.replace(offer, source=f"repeat of row {parents[0]}")
            lease = start_lease(state, offer, hyp, parents, plan.identity, now, plan.lease_ttl)
        if lease is not None or expired:
            save_state(journal, state)
        for record in expired:  # after the state: a death in between must not expire a lease twice
            journal.append_record(record)
    if lease is None:
        if state.time_spent(now):
            return NoLease.TIME_SPENT
        return NoLease.BUDGET_REACHED if state.remaining(rows) <= 0 else NoLease.WAIT
    logger.info("claim %d (attempt %d, %s): training", lease.claim, lease.attempt, lease.source)
    return lease


def _draw_child(plan: _Plan, state: RunState, claim: int) -> tuple[dict[str, float], list[int], bool]:
    """A new child of the population, unlike every row and every child in flight, or a row to
    train again (True)."""
    population = plan.journal.read_population(plan.hyp_keys)
    in_flight = [[child[key] for key in plan.hyp_keys] for child in state.children_in_flight()]
    taken = np.vstack([population.hyps, np.reshape(in_flight, (-1, len(plan.hyp_keys)))])
    rng = child_generator(plan.seed, plan.identity.worker_id, claim)
    context = SearchContext(population.hyps, population.fitness, taken, plan.base_values, *plan.bounds,
                            progress=state.progress(len(population.hyps), time.time()))
    proposal = plan.search.propose(context, rng)
    return dict(zip(plan.hyp_keys, map(float, proposal.child))), list(proposal.parents), proposal.repeat


def _run_generation(plan: _Plan, lease: Lease, objective: Objective) -> str:
    """Train one child with its lease kept alive, then record how it ended; returns the status.

    A child whose genes already have rows is a repeat (repeats.py): it trains with the run seed
    plus their number, and is never pruned."""
    rows = plan.journal.read_population(plan.hyp_keys).hyps  # lock-free: no other claim trains these genes now
    repeat = trainings_of(np.array([lease.hyp[key] for key in plan.hyp_keys]), rows)
    context = GenerationContext(
        run_dir=plan.journal.run_dir,
        claim=lease.claim,
        attempt=lease.attempt,
        worker_id=plan.identity.worker_id,
        seed=plan.seed + repeat,
        gpu=plan.identity.gpu,
        parents=tuple(lease.parents),
        source=lease.source,
        rungs=plan.pruning.rungs if plan.pruning and not repeat else (),
        report=lambda epoch, fitness: _report_rung(plan, lease, epoch, fitness),
    )
    hyp = Hyp.from_dict({**plan.base_hyp.as_dict(include_unset=True), **lease.hyp}, source=f"claim {lease.claim}")
    heartbeat_interval = min(plan.lease_ttl / 4, 5.0)
    with Heartbeat(plan.journal, lease.claim, plan.lease_ttl, heartbeat_interval):
        outcome = _evaluate(objective, hyp, context)
    return _finish(plan, lease, outcome, context.seed)


@dataclass(frozen=True)
class _Outcome:
    """How a generation ended: `ok` with its values, `failed` with a kind and reason, or `pruned` at an epoch."""

    status: Literal["ok", "failed", "pruned"]
    values: np.ndarray | None = None
    kind: str = ""
    reason: str = ""
    epoch: int = 0
    fitness: float = math.nan


def _evaluate(objective: Objective, hyp: Hyp, context: GenerationContext) -> _Outcome:
    """Call the objective and classify how it ended. Raises only CannotWrite (a full or read-only
    disk), which no retry can fix."""
    try:
        result = objective(hyp, context)
    except GenerationPruned as pruned:
        return _Outcome("pruned", epoch=pruned.epoch, fitness=pruned.fitness)
    except GenerationFailed as failure:
        return _Outcome("failed", kind=failure.kind, reason=failure.reason)
    except TrainingDiverged as error:
        return _Outcome("failed", kind="diverged", reason=str(error))
    except Exception as error:
        if isinstance(error, OSError) and (full := CannotWrite.from_os_error(error, context.run_dir)) is not None:
            raise full from None  # every later generation would fail the same way: the worker stops
        # torch.cuda.OutOfMemoryError is recognised by name so this module needs no torch.
        kind = "oom" if type(error).__name__ == "OutOfMemoryError" else "crash"
        logger.exception("claim %d: generation failed", context.claim)
        return _Outcome("failed", kind=kind, reason=f"{type(error).__name__}: {error}")
    if not isinstance(result, ValidationResult):
        return _Outcome("failed", kind="crash",
                        reason=f"objective returned {type(result).__name__}, not a ValidationResult")
    values = np.array(result.values())
    if not np.all(np.isfinite(values)):
        return _Outcome("failed", kind="diverged",
                        reason=f"non-finite result: {', '.join(f'{value:g}' for value in values)}")
    return _Outcome("ok", values=values)


def _report_rung(plan: _Plan, lease: Lease, epoch: int, fitness: float) -> bool:
    """Under the lock: record the generation's fitness at a rung; True when it should stop there."""
    if plan.pruning is None or epoch not in plan.pruning.rungs:
        return False
    journal = plan.journal
    with journal.locked():
        state = load_state(journal)
        if state is None or lease.claim not in state.leases:
            return True  # the lease expired (its slot waits for, or went to, another worker): stop
        recorded = state.rung_results.setdefault(str(epoch), [])
        recorded.append(float(fitness))
        keeps = plan.pruning.keeps(float(fitness), recorded)
        save_state(journal, state)
        journal.append_record({"status": "rung", "claim": lease.claim, "attempt": lease.attempt, "epoch": epoch,
                               "fitness": round(float(fitness), 6), "continues": keeps, "at_rung": len(recorded)})
    logger.info("claim %d: fitness %.4f after epoch %d, %s", lease.claim, fitness, epoch,
                "goes on" if keeps else "pruned")
    return not keeps


def _finish(plan: _Plan, lease: Lease, outcome: _Outcome, seed: int) -> str:
    """Under the lock: close the lease, then append the row (or record the failure or the pruning)."""
    journal = plan.journal
    with journal.locked():
        state = load_state(journal)
        now = time.time()
        common = {"seed": seed, "hyp": lease.hyp}
        if state is None or not reclaim_lease(state, lease):
            reason = "lease expired and its slot went to another worker; result dropped"
            journal.append_record(lease_record(lease, "stale", now, reason=reason, **common))
            return "stale"
        if outcome.status == "pruned":
            state.pruned_slots += 1
            save_state(journal, state)
            journal.append_record(lease_record(lease, "pruned", now, epoch=outcome.epoch,
                                               fitness=round(outcome.fitness, 6), **common))
            return "pruned"
        if outcome.status == "failed":
            given_up = release_failed(state, lease, plan.max_attempts)
            save_state(journal, state)
            record = lease_record(lease, "failed", now, kind=outcome.kind, reason=outcome.reason,
                                  slot_given_up=given_up, **common)
            journal.append_record(record)
            logger.warning("claim %d failed (%s): %s", lease.claim, outcome.kind, outcome.reason)
            return "failed"
        # State first: dying between the two writes re-offers the slot instead of overshooting the budget.
        save_state(journal, state)
        child = np.array([lease.hyp[key] for key in plan.hyp_keys])
        row = journal.append_rows(outcome.values, child)
        journal.append_record(lease_record(lease, "ok", now, row=row, seed=seed))  # its hyp is the row
        population = journal.read_population(plan.hyp_keys)
        artifacts.write_hyp_evolve(journal.run_dir, population)
        artifacts.write_evolve_population(journal.run_dir, population)
    if plan.hparams:
        artifacts.write_tensorboard_generation(journal.run_dir, row, lease.hyp, outcome.values)
    return "ok"


def _write_plots(plan: _Plan) -> None:
    """Render plots from a lock-free read: they may lag a row behind, never tear."""
    try:
        journal = plan.journal
        artifacts.write_plots(journal.run_dir, journal.read_population(plan.hyp_keys), plan.evolved_keys,
                              artifacts.pruned_points(journal.read_records()))
    except Exception as error:  # noqa: BLE001 - a plot must never stop an evolution
        logger.warning("could not write plots: %s", error)


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """Turn SIGTERM (docker stop) into a graceful stop; only the main thread can install it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = [
    "GenerationContext",
    "GenerationFailed",
    "Objective",
    "WorkerSummary",
    "run_worker",
]
