"""The global budget of an evolution, handed out as leases kept alive by heartbeats.

`claims.json` holds a RunState. A worker takes a slot only while
`done + live leases + slots waiting for a retry < generations`, where
done = rows trained in this run + slots given up. So N workers produce exactly N results
whenever they join or leave.

A lease carries the child being trained (visible to every worker, so none draws it again)
and an expiry that a background thread pushes forward. When a worker dies its heartbeat
stops; the next worker that takes the lock finds the lease expired and queues the slot
for a retry with the same child, so a restart resumes the lost generation. A generation
that fails (diverged, out of memory, crashed) queues its slot for a retry with a new
child. Each slot gets `max_attempts` attempts in all (failures and expiries both count,
so a child that kills its worker cannot loop forever); then the slot is given up,
recorded as failed, and counts toward the budget.

Expiry compares wall-clock times written by different hosts, so their clocks must agree
(NTP) to well within the lease TTL (60 s by default).

All functions that change a RunState must be called under the journal's lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from orchestrator.evolution.journal import (
    Journal,
    PopulationSeed,
    check_hyp_keys,
    check_hyp_rows,
    load_population_seed,
    run_columns,
)
from orchestrator.evolution.pruning import Pruning
from orchestrator.evolution.search import DEFAULT_SEARCH, LEGACY_SEARCH
from orchestrator.evolution.search_space import SearchSpace
from trainer.config import Hyp
from trainer.errors import UserError

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass(frozen=True)
class WorkerIdentity:
    """Who holds a lease, for provenance and for telling live workers apart."""

    worker_id: str
    gpu: str | None = None
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


@dataclass
class Lease:
    claim: int
    attempt: int
    worker: str
    gpu: str | None
    host: str
    pid: int
    hyp: dict[str, float]
    parents: list[int]
    source: str
    started: float
    expires: float


@dataclass
class Retry:
    """A budget slot waiting for its next attempt; `hyp` is None when it needs a new child."""

    attempt: int
    hyp: dict[str, float] | None
    parents: list[int]
    source: str
    previous_claim: int


@dataclass(frozen=True)
class Offer:
    """A slot granted to a worker: which claim and attempt, and the child if already decided."""

    claim: int
    attempt: int
    hyp: dict[str, float] | None
    parents: list[int]
    source: str


@dataclass
class RunState:
    hyp_keys: list[str]
    generations: int
    search: str = LEGACY_SEARCH  # every worker of a run proposes children with this algorithm
    imported_rows: int = 0
    failed_slots: int = 0
    pruned_slots: int = 0  # generations stopped at a rung: part of the budget, never rows
    pruning: dict[str, Any] | None = None  # the run's Pruning, as JSON; None: off
    rung_results: dict[str, list[float]] = field(default_factory=dict)  # rung epoch -> fitness reported there
    created: float = field(default_factory=time.time)
    hours: float | None = None  # no new claims once this many hours have passed since `created`
    next_claim: int = 0
    queue: list[dict[str, Any]] = field(default_factory=list)  # {"hyp": ..., "source": ...}
    retry: list[Retry] = field(default_factory=list)
    leases: dict[int, Lease] = field(default_factory=dict)

    def done(self, rows: int) -> int:
        return rows - self.imported_rows + self.failed_slots + self.pruned_slots

    def time_spent(self, now: float) -> bool:
        return self.hours is not None and now >= self.created + self.hours * 3600

    def remaining(self, rows: int) -> int:
        return self.generations - self.done(rows)

    def progress(self, rows: int, now: float) -> float:
        """The share of the budget finished or in flight, which search schedules follow: of the
        generations, or of the time budget when that is further along."""
        share = (self.done(rows) + len(self.leases)) / max(self.generations, 1)
        if self.hours is not None:
            share = max(share, (now - self.created) / (self.hours * 3600))
        return min(1.0, share)

    def children_in_flight(self) -> list[dict[str, float]]:
        """Children decided but not yet results: leased, waiting for a retry, or queued."""
        retried = [entry.hyp for entry in self.retry if entry.hyp is not None]
        return [lease.hyp for lease in self.leases.values()] + retried + [item["hyp"] for item in self.queue]

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["leases"] = {str(claim): lease for claim, lease in values["leases"].items()}
        return {"format": STATE_FORMAT, **values}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RunState:
        values = {key: value for key, value in values.items() if key != "format"}
        values["retry"] = [Retry(**entry) for entry in values.get("retry", [])]
        values["leases"] = {int(claim): Lease(**lease) for claim, lease in values.get("leases", {}).items()}
        return cls(**values)


def load_state(journal: Journal) -> RunState | None:
    values = journal.read_state()
    return None if values is None else RunState.from_json(values)


def save_state(journal: Journal, state: RunState) -> None:
    journal.write_state(state.to_json())


@dataclass(frozen=True)
class RunRequest:
    """What a worker asks of the run it creates or joins, checked before anything is written.

    `generations` sets the run's budget (restarting with a larger total extends a run);
    `population` only seeds a new run; `search` (None: the run's own, or the default for a new
    run) must be the run's; `pruning` applies to a new run (a joining worker prunes as the run
    does); `hours`, when given, sets the run's time budget, counted from its creation.
    """

    base_hyp: Hyp
    space: SearchSpace
    generations: int
    population: Sequence[str | Path] = ()
    search: str | None = None
    pruning: Pruning | None = None
    hours: float | None = None


def prepare_run(journal: Journal, request: RunRequest) -> RunState:
    """Create the run, or join it; returns its state as joined.

    Every input is checked before anything is written (`check_run_inputs`), so a UserError
    leaves the run directory as it was.
    """
    hyp_keys, seed = check_run_inputs(journal, request)
    journal.run_dir.mkdir(parents=True, exist_ok=True)
    with journal.locked():
        journal.ensure_header(hyp_keys)
        state = load_state(journal)
        if state is None:
            state = _new_state(journal, hyp_keys, seed, request)
        elif request.population:
            logger.info("%s: joining an existing run, so its population is not seeded again", journal.run_dir)
        check_search(state.search, request.search, journal.run_dir)  # again under the lock: a run another made
        if state.generations != request.generations:
            logger.info("%s: budget changed from %d to %d generations", journal.run_dir, state.generations,
                        request.generations)
            state.generations = request.generations
        if request.hours is not None:
            state.hours = request.hours
        save_state(journal, state)
    return state


def check_run_inputs(journal: Journal, request: RunRequest) -> tuple[tuple[str, ...], PopulationSeed]:
    """Everything a worker checks before it joins a run, reading only: the budget, the search
    space against the run's columns, the population files, the search algorithm, and the run
    folder's own columns. Returns the run's hyperparameter columns and what the population seeds."""
    generations = request.generations
    if isinstance(generations, bool) or not isinstance(generations, int) or generations <= 0:
        raise UserError(f"generations={generations!r}: the run's total number of generations must be at least 1")
    hyp_keys = run_columns(request.base_hyp)
    request.space.require_evolvable(hyp_keys)
    seed = load_population_seed(request.population, request.base_hyp, hyp_keys)
    _check_existing_run(journal, hyp_keys, request.search)
    return hyp_keys, seed


def check_search(run_search: str, asked: str | None, run_dir: Path) -> None:
    """A worker may not breed with another algorithm than the run's: the run would be neither."""
    if asked is not None and asked != run_search:
        raise UserError(f"run {run_dir} searches with --search {run_search}; this worker asked for --search "
                        f"{asked}: drop --search, pass --search {run_search}, or start a new run (--name)")


def _check_existing_run(journal: Journal, hyp_keys: Sequence[str], search: str | None) -> None:
    """Read-only checks that the run directory holds this run's columns and search, before the lock is made."""
    try:
        values = journal.read_state()
    except ValueError as error:
        raise UserError(f"{journal.state_path} is not valid JSON ({error}); restore it or use a new run") from None
    if values is not None:
        check_hyp_keys(values.get("hyp_keys", []), hyp_keys, str(journal.state_path))
        check_search(values.get("search", LEGACY_SEARCH), search, journal.run_dir)
    header = journal.read_header()
    if header is not None:
        check_hyp_keys(header, hyp_keys, str(journal.csv_path))
        population = journal.read_population(hyp_keys)  # warns about damaged lines, which the workers skip
        if values is None:  # an evolve.csv from elsewhere (a YOLOv5 run), about to be continued
            check_hyp_rows(population, str(journal.csv_path))


def _new_state(journal: Journal, hyp_keys: Sequence[str], seed: PopulationSeed, request: RunRequest) -> RunState:
    """A fresh run: rows already in evolve.csv (a YOLOv5 run) and imported rows are not part of the budget."""
    state = RunState(list(hyp_keys), request.generations, request.search or DEFAULT_SEARCH,
                     imported_rows=journal.count_rows(), hours=request.hours,
                     pruning=request.pruning.to_json() if request.pruning is not None else None)
    for source, rows in seed.imported:
        if len(rows) == 0:
            continue
        first = journal.append_rows(rows.results, rows.hyps)
        state.imported_rows += len(rows)
        logger.info("%s: imported %d rows from %s", journal.csv_path, len(rows), source)
        span = [first, first + len(rows) - 1]
        journal.append_record({"status": "imported", "source": source, "rows": span, "end": timestamp(time.time())})
    state.queue = [{"hyp": hyp, "source": f"population:{source}"} for source, hyp in seed.queued]
    if not state.queue and state.imported_rows == 0:
        # The first generation of a fresh run trains the base hyp as it is.
        base = request.base_hyp.as_dict(include_unset=True)
        state.queue = [{"hyp": {key: float(base[key]) for key in hyp_keys}, "source": "base"}]
    return state


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds")


def lease_record(lease: Lease, status: str, now: float, **extra: Any) -> dict[str, Any]:
    """A provenance line describing how one attempt ended."""
    return {
        "status": status,
        "claim": lease.claim,
        "attempt": lease.attempt,
        "worker": lease.worker,
        "gpu": lease.gpu,
        "host": lease.host,
        "pid": lease.pid,
        "parents": lease.parents,
        "source": lease.source,
        "start": timestamp(lease.started),
        "end": timestamp(now),
        "seconds": round(now - lease.started, 3),
        **extra,
    }


def expire_leases(state: RunState, now: float, max_attempts: int) -> list[dict[str, Any]]:
    """Turn leases whose heartbeat stopped into retries of the same child; returns their records."""
    records = []
    for claim, lease in sorted(state.leases.items()):
        if lease.expires >= now:
            continue
        del state.leases[claim]
        given_up = lease.attempt >= max_attempts
        if given_up:
            state.failed_slots += 1
        else:
            state.retry.append(Retry(lease.attempt + 1, lease.hyp, lease.parents, lease.source, claim))
        reason = f"lease expired: worker {lease.worker} on {lease.host} stopped its heartbeat"
        records.append(lease_record(lease, "expired", now, reason=reason, slot_given_up=given_up, hyp=lease.hyp))
    return records


def offer_slot(state: RunState, rows: int) -> Offer | None:
    """The next slot to train, or None when every slot is done or in flight.

    Retries come first (their slot is already reserved), then queued children, then a
    fresh slot whose child the caller draws (hyp None).
    """
    if state.done(rows) + len(state.leases) >= state.generations:
        return None  # retries left over when a restart lowered the budget are not trained
    if state.retry:
        entry = state.retry.pop(0)
        source = f"retry of claim {entry.previous_claim}"
        offer = Offer(state.next_claim, entry.attempt, entry.hyp, entry.parents, source)
    else:
        queued = state.queue.pop(0) if state.queue else None
        hyp = queued["hyp"] if queued else None
        offer = Offer(state.next_claim, 1, hyp, [], queued["source"] if queued else "mutation")
    state.next_claim += 1
    return offer


def start_lease(
    state: RunState,
    offer: Offer,
    hyp: dict[str, float],
    parents: list[int],
    identity: WorkerIdentity,
    now: float,
    ttl: float,
) -> Lease:
    lease = Lease(
        claim=offer.claim,
        attempt=offer.attempt,
        worker=identity.worker_id,
        gpu=identity.gpu,
        host=identity.host,
        pid=identity.pid,
        hyp=hyp,
        parents=parents,
        source=offer.source,
        started=now,
        expires=now + ttl,
    )
    state.leases[offer.claim] = lease
    return lease


def reclaim_lease(state: RunState, lease: Lease) -> bool:
    """Take back the slot of a finished attempt; False when it was handed to someone else.

    A worker slower than its lease (paused, starved heartbeat) keeps its result if its
    expired slot still waits in the retry queue; once another worker holds it, the late
    result is stale and dropped so the budget is never exceeded.
    """
    if state.leases.pop(lease.claim, None) is not None:
        return True
    for entry in state.retry:
        if entry.previous_claim == lease.claim:
            state.retry.remove(entry)
            return True
    return False


def release_failed(state: RunState, lease: Lease, max_attempts: int) -> bool:
    """Queue a failed attempt's slot for a new child, or give it up; True when given up."""
    if lease.attempt >= max_attempts:
        state.failed_slots += 1
        return True
    state.retry.append(Retry(lease.attempt + 1, None, [], lease.source, lease.claim))
    return False


def refresh_lease(state: RunState, claim: int, now: float, ttl: float) -> bool:
    lease = state.leases.get(claim)
    if lease is None:
        return False
    lease.expires = now + ttl
    return True


class Heartbeat:
    """Keeps one lease alive from a background thread while its generation trains."""

    def __init__(self, journal: Journal, claim: int, ttl: float, interval: float) -> None:
        self.journal = journal
        self.claim = claim
        self.ttl = ttl
        self.interval = interval
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{claim}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.journal.locked():
                    state = load_state(self.journal)
                    if state is None or not refresh_lease(state, self.claim, time.time(), self.ttl):
                        if not self.lost:
                            logger.warning("claim %d: lease lost (expired and taken over)", self.claim)
                        self.lost = True
                        continue
                    save_state(self.journal, state)
            except Exception as error:  # noqa: BLE001 - a missed beat is survivable; the TTL spans several
                logger.warning("claim %d: heartbeat failed: %s", self.claim, error)
