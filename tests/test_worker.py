"""The worker loop and its leases: global budget, failures, killed workers, stop and restart."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from orchestrator.evolution.command import evolution_inputs
from orchestrator.evolution.command import main as evolution_main
from orchestrator.evolution.journal import (
    Journal,
    JournalLockTimeout,
    format_header,
    format_rows,
    run_columns,
)
from orchestrator.evolution.leases import (
    RunState,
    WorkerIdentity,
    expire_leases,
    offer_slot,
    reclaim_lease,
    start_lease,
)
from orchestrator.evolution.loop import (
    GenerationContext,
    GenerationFailed,
    run_worker,
)
from orchestrator.evolution.search_space import SearchSpace
from trainer.cli import parse_arguments
from trainer.config import Hyp
from trainer.errors import UserError
from trainer.results import RESULT_COLUMNS, ValidationResult

SPACE = SearchSpace.load()
KEYS = run_columns(Hyp())
BASE = np.array([Hyp().as_dict()[key] for key in KEYS])
FORK = multiprocessing.get_context("fork")


def smooth_objective(hyp: Hyp, context: GenerationContext, delay: float = 0.0) -> ValidationResult:
    """A cheap stand-in for training: a smooth bump around lr0=0.02, momentum=0.9."""
    time.sleep(delay)
    score = math.exp(-(((hyp.lr0 - 0.02) / 0.02) ** 2) - ((hyp.momentum - 0.9) / 0.1) ** 2)
    return ValidationResult(score, score, score, 0.6 * score, 1 - score, 1 - score, 0.1)


def _evolve(run_dir: Path, generations: int, objective: Callable = smooth_objective, **options: object):
    options = {"worker_id": "w0", "seed": 3, "lease_ttl": 5.0, "plot_interval": None, **options}
    return run_worker(run_dir, Hyp(), SPACE, generations, objective, **options)


def _worker_process(run_dir: Path, worker_id: str, generations: int, delay: float, ttl: float) -> None:
    _evolve(run_dir, generations, partial(smooth_objective, delay=delay), worker_id=worker_id, lease_ttl=ttl)


def _records(run_dir: Path, status: str) -> list[dict]:
    return [record for record in Journal(run_dir).read_records() if record["status"] == status]


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "claims.json").read_text())


def _workers_seen(run_dir: Path) -> set[str]:
    """Workers that hold a lease or have finished a generation."""
    if not (run_dir / "claims.json").exists():
        return set()
    leased = {lease["worker"] for lease in _state(run_dir)["leases"].values()}
    return leased | {record["worker"] for record in _records(run_dir, "ok")}


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _assert_exact_budget(run_dir: Path, generations: int) -> None:
    """Exactly `generations` rows, each from its own claim, no child trained twice (but for the
    repeats of a best row that the search asks for), nothing in flight."""
    population = Journal(run_dir).read_population(KEYS)
    assert len(population) == generations
    ok = _records(run_dir, "ok")
    assert sorted(record["row"] for record in ok) == list(range(generations))
    assert len({record["claim"] for record in ok}) == generations
    repeats = [record for record in ok if record["source"].startswith("repeat of row")]
    assert len({tuple(row) for row in population.hyps}) == generations - len(repeats)
    state = _state(run_dir)
    assert state["leases"] == {} and state["retry"] == []


def test_one_worker_trains_the_base_first_then_exactly_the_budget(tmp_path: Path) -> None:
    summary = _evolve(tmp_path / "run", 4)
    assert (summary.ok, summary.failed, summary.exit_reason) == (4, 0, "budget reached")
    _assert_exact_budget(tmp_path / "run", 4)
    population = Journal(tmp_path / "run").read_population(KEYS)
    np.testing.assert_array_equal(population.hyps[0], BASE)
    sources = [record["source"] for record in _records(tmp_path / "run", "ok")]
    assert sources == ["base", "mutation", "mutation", "mutation"]
    assert (tmp_path / "run" / "hyp_evolve.yaml").exists()


def test_failures_are_recorded_not_rows_never_parents_and_retried(tmp_path: Path) -> None:
    first_tries = iter(["ok", "raise", "nan", "crash"])

    def flaky(hyp: Hyp, context: GenerationContext) -> ValidationResult:
        outcome = next(first_tries, "ok") if context.attempt == 1 else "ok"
        if outcome == "raise":
            raise GenerationFailed("loss is NaN at epoch 2", kind="diverged")
        if outcome == "nan":
            return ValidationResult(math.nan, 0, 0, 0, 0, 0, 0)
        if outcome == "crash":
            raise RuntimeError("CUDA error: an illegal memory access")
        return smooth_objective(hyp, context)

    summary = _evolve(tmp_path / "run", 4, flaky)
    assert (summary.ok, summary.failed) == (4, 3)
    _assert_exact_budget(tmp_path / "run", 4)
    failed = _records(tmp_path / "run", "failed")
    assert [record["kind"] for record in failed] == ["diverged", "diverged", "crash"]
    assert "non-finite result" in failed[1]["reason"] and "illegal memory access" in failed[2]["reason"]
    assert not any(record["slot_given_up"] for record in failed)
    rows = {tuple(row) for row in Journal(tmp_path / "run").read_population(KEYS).hyps}
    for record in failed:
        assert tuple(record["hyp"][key] for key in KEYS) not in rows
    retried = [record["source"] for record in _records(tmp_path / "run", "ok") if record["attempt"] == 2]
    assert retried == [f"retry of claim {record['claim']}" for record in failed]


def test_a_slot_failing_every_attempt_is_given_up_and_counts_toward_the_budget(tmp_path: Path) -> None:
    def always_oom(hyp: Hyp, context: GenerationContext) -> ValidationResult:
        raise GenerationFailed("CUDA out of memory", kind="oom")

    summary = _evolve(tmp_path / "run", 2, always_oom, max_attempts=3)
    assert (summary.ok, summary.failed, summary.exit_reason) == (0, 6, "budget reached")
    failed = _records(tmp_path / "run", "failed")
    assert sorted(record["attempt"] for record in failed) == [1, 1, 2, 2, 3, 3]
    assert sum(record["slot_given_up"] for record in failed) == 2
    assert _state(tmp_path / "run")["failed_slots"] == 2
    assert Journal(tmp_path / "run").count_rows() == 0
    assert not (tmp_path / "run" / "hyp_evolve.yaml").exists()


def test_same_seed_gives_the_same_evolution(tmp_path: Path) -> None:
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        _evolve(tmp_path / name, 4, seed=seed)
    csv = {name: (tmp_path / name / "evolve.csv").read_bytes() for name in "abc"}
    assert csv["a"] == csv["b"]
    assert csv["a"] != csv["c"]


def test_heartbeat_keeps_a_long_generation_alive_while_another_worker_waits(tmp_path: Path) -> None:
    ttl = 1.0
    seen_expiries: list[float] = []

    def slow(hyp: Hyp, context: GenerationContext) -> ValidationResult:
        time.sleep(2.5 * ttl)
        seen_expiries.append(_state(context.run_dir)["leases"][str(context.claim)]["expires"] - time.time())
        return smooth_objective(hyp, context)

    run_dir = tmp_path / "run"
    summaries = []
    other = threading.Thread(target=lambda: summaries.append(_evolve(run_dir, 1, slow, worker_id="w1", lease_ttl=ttl)))
    other.start()  # both workers start on a fresh run: one creates it, the other joins it
    summaries.append(_evolve(run_dir, 1, slow, lease_ttl=ttl))
    other.join()
    assert sorted(summary.ok for summary in summaries) == [0, 1]  # the waiting worker never took over
    assert len(seen_expiries) == 1 and 0 < seen_expiries[0] <= ttl
    assert _records(run_dir, "expired") == []
    _assert_exact_budget(run_dir, 1)


def test_stop_event_and_stop_file_end_the_worker_after_its_generation(tmp_path: Path) -> None:
    stop = threading.Event()

    def stop_during(hyp: Hyp, context: GenerationContext) -> ValidationResult:
        stop.set()
        return smooth_objective(hyp, context)

    summary = _evolve(tmp_path / "run", 5, stop_during, stop=stop)
    assert (summary.ok, summary.exit_reason) == (1, "stop requested")
    Journal(tmp_path / "run").request_stop()
    assert _evolve(tmp_path / "run", 5).ok == 0
    Journal(tmp_path / "run").clear_stop()
    assert _evolve(tmp_path / "run", 5).ok == 4
    _assert_exact_budget(tmp_path / "run", 5)


def test_population_yaml_children_come_first_and_csv_rows_are_imported(tmp_path: Path) -> None:
    seed_yaml = tmp_path / "seed.yaml"
    seed_yaml.write_text("lr0: 0.03\nmosaic: 0.5\n")
    _evolve(tmp_path / "first", 2, population=[seed_yaml])
    first = Journal(tmp_path / "first").read_population(KEYS)
    assert first.hyp_at(0)["lr0"] == 0.03 and first.hyp_at(0)["mosaic"] == 0.5 and first.hyp_at(0)["lrf"] == 0.01
    assert _records(tmp_path / "first", "ok")[0]["source"] == f"population:{seed_yaml}"

    _evolve(tmp_path / "second", 2, population=[tmp_path / "first" / "evolve.csv"])
    second = Journal(tmp_path / "second").read_population(KEYS)
    assert len(second) == 4  # 2 imported rows, then a budget of 2 new ones
    np.testing.assert_array_equal(second.hyps[:2], first.hyps)
    assert _records(tmp_path / "second", "imported")[0]["rows"] == [0, 1]
    new = _records(tmp_path / "second", "ok")
    assert all(record["source"] == "mutation" and set(record["parents"]) <= {0, 1, 2} for record in new)


def _snapshot(path: Path) -> dict[str, bytes] | None:
    if not path.exists():
        return None
    return {str(item.relative_to(path)): item.read_bytes() if item.is_file() else b"<dir>" for item in path.rglob("*")}


def _yolov5_run(path: Path, **changes: float) -> None:
    """A YOLOv5 run directory whose evolve.csv also evolves anchors (a column this run lacks)."""
    path.mkdir()
    names = [*RESULT_COLUMNS, *KEYS, "anchors"]
    row = [0.5] * 7 + [changes.get(key, value) for key, value in zip(KEYS, BASE)] + [3.0]
    (path / "evolve.csv").write_text(
        ",".join(f"{n:>20s}" for n in names) + "\n" + ",".join(f"{v:20.5g}" for v in row) + "\n"
    )


BAD_INPUTS: dict[str, Callable[[Path, Path], object]] = {
    "zero budget": lambda run, tmp: _evolve(run, 0),
    "negative budget": lambda run, tmp: _evolve(run, -3),
    "unknown key in space": lambda run, tmp: SearchSpace.from_mapping({"lr": [1, 0, 1]}),
    "low above high": lambda run, tmp: SearchSpace.from_mapping({"lr0": [1, 0.1, 0.01]}),
    "nothing to evolve": lambda run, tmp: run_worker(
        run, Hyp(), SearchSpace.from_mapping({"lr0": [0, 0, 1]}), 3, smooth_objective, "w0", 0, plot_interval=None
    ),
    "population csv with no hyp column of ours": lambda run, tmp: (
        (tmp / "other.csv").write_text(",".join(f"{n:>20s}" for n in (*RESULT_COLUMNS, "lr")) + "\n"),
        _evolve(run, 3, population=[tmp / "other.csv"]),
    ),
    "population csv row out of range": lambda run, tmp: (
        _yolov5_run(tmp / "old", momentum=1.5),
        run_worker(run, Hyp(anchors=3.0), SPACE, 3, smooth_objective, "w0", 0, plot_interval=None,
                   population=[tmp / "old" / "evolve.csv"]),
    ),
    "population yaml out of range": lambda run, tmp: (
        (tmp / "p.yaml").write_text("lr0: -0.01\n"),
        _evolve(run, 3, population=[tmp / "p.yaml"]),
    ),
    "population yaml unknown key": lambda run, tmp: (
        (tmp / "p.yaml").write_text("lr: 0.1\n"),
        _evolve(run, 3, population=[tmp / "p.yaml"]),
    ),
}


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_user_error_and_leaves_the_run_directory_untouched(
    tmp_path: Path, case: str, existing: bool
) -> None:
    run_dir = tmp_path / "run"
    if existing:
        _evolve(run_dir, 1)
    before = _snapshot(run_dir)
    with pytest.raises(UserError):
        BAD_INPUTS[case](run_dir, tmp_path)
    assert _snapshot(run_dir) == before


def test_a_run_directory_with_other_columns_is_refused_untouched(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "yolov5"
    _evolve(ours, 1)
    _yolov5_run(theirs)  # evolves anchors, which an anchor-less base hyp has no column for
    before = {path: _snapshot(path) for path in (ours, theirs)}
    with pytest.raises(UserError, match="anchors"):
        run_worker(ours, Hyp(anchors=3.0), SPACE, 3, smooth_objective, "w0", 0, plot_interval=None)
    with pytest.raises(UserError, match="anchors"):
        _evolve(theirs, 3)
    assert {path: _snapshot(path) for path in (ours, theirs)} == before


def test_a_yolov5_run_directory_with_a_row_out_of_range_is_refused_untouched(tmp_path: Path) -> None:
    run_dir = tmp_path / "yolov5"
    _yolov5_run(run_dir, fliplr=2.0)
    before = _snapshot(run_dir)
    with pytest.raises(UserError, match="evolve.csv, data row 1: fliplr=2 is out of range: fliplr must be from 0 to 1"):
        run_worker(run_dir, Hyp(anchors=3.0), SPACE, 2, smooth_objective, "w0", 0, plot_interval=None)
    assert _snapshot(run_dir) == before


def test_a_yolov5_run_directory_with_matching_columns_is_continued(tmp_path: Path) -> None:
    run_dir = tmp_path / "yolov5"
    _yolov5_run(run_dir)
    run_worker(run_dir, Hyp(anchors=3.0), SPACE, 2, smooth_objective, "w0", 0, plot_interval=None)
    population = Journal(run_dir).read_population((*KEYS, "anchors"))
    assert len(population) == 3  # its own row is kept as a result, then 2 new generations
    assert _state(run_dir)["imported_rows"] == 1


def test_a_damaged_row_mid_file_is_skipped_with_one_warning_and_left_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    _evolve(run_dir, 3)
    csv = run_dir / "evolve.csv"
    lines = csv.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:60] + b"\n"  # row 1 torn by a hand edit or a writer without the lock
    csv.write_bytes(b"".join(lines))
    worker = FORK.Process(target=_worker_process, args=(run_dir, "w1", 6, 0.0, 5.0))  # a real worker process
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0
    after = csv.read_bytes().splitlines(keepends=True)
    assert after[:4] == lines and len(after) == 7  # nothing lost: the line is where it was, 3 rows after it
    population = Journal(run_dir).read_population(KEYS)
    assert [row.line for row in population.damaged] == [3] and 1 not in population.ranked()
    new = _records(run_dir, "ok")[3:]
    assert len(new) == 3 and all(1 not in record["parents"] for record in new)
    with caplog.at_level(logging.WARNING):
        _evolve(run_dir, 7)  # in this process: the warning names the file, the line and what to do
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warning.startswith(f"{csv}: line 3: 3 values where the header has {len(lines[1].split(b','))} columns.")
    assert "Ignored and left in the file; repair a line in place" in warning


def test_a_racy_yolov5_csv_imports_every_whole_row_and_says_what_it_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Several YOLOv5 processes appending to one evolve.csv without a lock: repeated headers, a
    torn row, and a NaN row from a training that diverged."""
    header = format_header(KEYS)
    hyps = np.repeat(BASE[None], 3, axis=0)
    hyps[:, KEYS.index("lr0")] = [0.01, 0.011, 0.012]
    rows = [format_rows(np.full(7, 0.1 * (i + 1)), hyps[i]) for i in range(3)]
    nan_row = format_rows(np.full(7, math.nan), BASE)
    racy = tmp_path / "racy.csv"
    racy.write_bytes(header + rows[0] + header + rows[1][:100] + b"\n" + rows[1] + nan_row + header + rows[2])
    with caplog.at_level(logging.WARNING):
        _evolve(tmp_path / "run", 2, population=[racy])
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warning == (f"{racy}: 3 whole rows to import, 4 skipped (1 with NaN values; line 3: a second header "
                       "line; line 4: 5 values where the header has 35 columns; line 7: a second header line)")
    population = Journal(tmp_path / "run").read_population(KEYS)
    np.testing.assert_allclose(population.hyps[:3], hyps, rtol=1e-4)
    assert len(population) == 5 and population.damaged == ()
    assert _records(tmp_path / "run", "imported")[0]["rows"] == [0, 2]


def test_a_csv_of_another_yolov5_version_is_imported_by_column_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An extra column (anchors, which this run does not evolve) is dropped; a missing one takes
    the base hyp's value; the rest are matched by name, in any order."""
    keys = [key for key in reversed(KEYS) if key != "fl_gamma"] + ["anchors"]
    values = {**Hyp().as_dict(), "lr0": 0.02}
    row = [0.5] * 7 + [values[key] for key in keys[:-1]] + [3.0]
    old = tmp_path / "v6.csv"
    old.write_text(",".join(f"{n:>20s}" for n in (*RESULT_COLUMNS, *keys)) + "\n"
                   + ",".join(f"{v:20.5g}" for v in row) + "\n")
    with caplog.at_level(logging.WARNING):
        _evolve(tmp_path / "run", 1, population=[old])
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warning == f"{old}: other hyperparameter columns than this run's: fl_gamma taken from the base hyp; " \
                      "anchors ignored"
    imported = Journal(tmp_path / "run").read_population(KEYS).hyp_at(0)
    assert imported == pytest.approx({**Hyp().as_dict(), "lr0": 0.02}, rel=1e-4)


def test_the_articles_per_container_command_joins_the_run(tmp_path: Path) -> None:
    """`train.py --project gbr --name search --exist-ok --resume --evolve 60`, one per container in
    the Docker evolution article: --resume is ignored, as YOLOv5 does when it evolves."""
    inputs = evolution_inputs(parse_arguments(["--project", str(tmp_path), "--name", "search", "--exist-ok", "--resume",
                                               "--evolve", "60"], command=evolution_main))
    assert inputs.cfg.resume == "" and inputs.cfg.exist_ok and inputs.request.generations == 60


def test_every_generation_leaves_a_tensorboard_hparams_record(tmp_path: Path) -> None:
    """`tensorboard --logdir <run>` shows the search: one HParams session per evolve.csv row."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _evolve(tmp_path / "run", 3)
    population = Journal(tmp_path / "run").read_population(KEYS)
    folders = sorted((tmp_path / "run" / "tensorboard").iterdir())
    assert [folder.name for folder in folders] == ["generation0", "generation1", "generation2"]
    for row, folder in enumerate(folders):
        events = EventAccumulator(str(folder))
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        genes = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert {key: genes[key].number_value for key in KEYS} == pytest.approx(dict(zip(KEYS, population.hyps[row])))
        [fitness_event] = events.Scalars("fitness")
        assert fitness_event.value == pytest.approx(population.fitness[row], abs=1e-4)  # csv: 5 digits


@pytest.mark.slow
def test_the_bash_while_loop_of_evolve_1_stops_after_one_generation_with_a_message(tiny_data: Path,
                                                                                     tmp_path: Path) -> None:
    """The training-tricks text's loop, `while python train.py --evolve 1; do :; done`: here --evolve N
    is the run's total, so the second process explains that and exits non-zero, and the loop ends
    instead of spinning. A larger N trains one more; --generations N (what evolvectl passes) is
    the run's budget as before and exits 0 on a finished run, as restarted workers must."""
    trainer = (f"{sys.executable} -m trainer --data {tiny_data} --epochs 1 --imgsz 64 --batch-size 8 --workers 0 "
               "--device cpu --noautoanchor --project runs/evolve --name loop")
    script = f"n=0; while {trainer} --evolve 1; do n=$((n+1)); [ $n -ge 4 ] && break; done; echo loops=$n"
    loop = subprocess.run(["bash", "-c", script],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert "loops=1" in loop.stdout, loop.stdout + loop.stderr[-3000:]
    assert "already has 1 of its 1 generation(s): --evolve N is the total of the run" in loop.stderr
    assert "--evolve 2 trains one more" in loop.stderr and "Traceback" not in loop.stderr
    csv_path = tmp_path / "runs" / "evolve" / "loop" / "evolve.csv"
    assert len(csv_path.read_text().splitlines()) == 2
    again = subprocess.run(["bash", "-c", f"{trainer} --generations 1 && {trainer} --evolve 2"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(csv_path.read_text().splitlines()) == 3


def test_leases_expire_into_retries_of_the_same_child_then_are_given_up() -> None:
    state = RunState(list(KEYS[:1]), generations=2)
    identity = WorkerIdentity("w0", host="h", pid=1)
    first = offer_slot(state, rows=0)
    start_lease(state, first, {"lr0": 0.02}, [], identity, now=100.0, ttl=10.0)
    second = offer_slot(state, rows=0)
    start_lease(state, second, {"lr0": 0.03}, [], identity, now=100.0, ttl=50.0)
    assert offer_slot(state, rows=0) is None  # both slots in flight
    assert expire_leases(state, now=105.0, max_attempts=2) == []
    [record] = expire_leases(state, now=111.0, max_attempts=2)
    assert (record["status"], record["claim"], record["slot_given_up"]) == ("expired", 0, False)
    retry = offer_slot(state, rows=0)
    assert (retry.claim, retry.attempt, retry.hyp, retry.source) == (2, 2, {"lr0": 0.02}, "retry of claim 0")
    lease = start_lease(state, retry, retry.hyp, [], identity, now=111.0, ttl=10.0)
    [record] = expire_leases(state, now=140.0, max_attempts=2)  # the second lease lives until 150
    assert record["slot_given_up"] and state.failed_slots == 1 and state.done(rows=0) == 1
    assert not reclaim_lease(state, lease)  # its slot was given up: a late result is stale
    assert offer_slot(state, rows=1) is None  # 1 row + 1 given up = the budget of 2


def test_a_late_result_keeps_its_slot_only_until_someone_else_takes_it() -> None:
    state = RunState(list(KEYS[:1]), generations=1)
    identity = WorkerIdentity("w0", host="h", pid=1)
    lease = start_lease(state, offer_slot(state, rows=0), {"lr0": 0.02}, [], identity, now=0.0, ttl=1.0)
    expire_leases(state, now=5.0, max_attempts=3)
    assert reclaim_lease(state, lease) and state.retry == []  # nobody took the slot: the result counts
    lease = start_lease(state, offer_slot(state, rows=0), {"lr0": 0.02}, [], identity, now=6.0, ttl=1.0)
    expire_leases(state, now=10.0, max_attempts=3)
    offer_slot(state, rows=0)  # another worker takes the retry
    assert not reclaim_lease(state, lease)


def test_three_workers_with_one_killed_mid_generation_end_with_exactly_the_budget(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    victim = FORK.Process(target=_worker_process, args=(run_dir, "w1", 9, 60.0, 1.0))  # hangs in training
    victim.start()
    _wait_for(lambda: "w1" in _workers_seen(run_dir))
    workers = {name: FORK.Process(target=_worker_process, args=(run_dir, name, 9, 0.2, 1.0)) for name in ("w0", "w2")}
    for process in workers.values():
        process.start()
    _wait_for(lambda: {"w0", "w2"} <= _workers_seen(run_dir))
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    for process in workers.values():
        process.join(60)
        assert process.exitcode == 0
    _assert_exact_budget(run_dir, 9)
    [expired] = _records(run_dir, "expired")
    assert expired["worker"] == "w1"
    [resumed] = [
        record for record in _records(run_dir, "ok") if record["source"] == f"retry of claim {expired['claim']}"
    ]
    population = Journal(run_dir).read_population(KEYS)
    assert population.hyp_at(resumed["row"]) == expired["hyp"]  # the lost child was trained, not dropped


def _freeze_outside_the_lock(run_dir: Path, pid: int) -> None:
    """SIGSTOP a worker while it trains, not while it holds the journal's lock (a frozen holder
    would stall every worker until it thaws: the lock's timeout is for that)."""
    while True:
        os.kill(pid, signal.SIGSTOP)
        journal = Journal(run_dir, lock_timeout=0.5)
        try:
            with journal.locked():
                return
        except JournalLockTimeout:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)


@pytest.mark.faults
def test_a_frozen_worker_that_thaws_after_its_lease_has_its_result_dropped_as_stale(tmp_path: Path) -> None:
    """`docker pause`, SIGSTOP or a stalled mount: the worker is not dead, only silent past its lease."""
    run_dir = tmp_path / "run"
    frozen = FORK.Process(target=_worker_process, args=(run_dir, "w1", 6, 1.5, 1.0))
    frozen.start()
    _wait_for(lambda: "w1" in _workers_seen(run_dir))
    _freeze_outside_the_lock(run_dir, frozen.pid)
    other = FORK.Process(target=_worker_process, args=(run_dir, "w0", 6, 0.1, 1.0))
    other.start()  # takes the frozen worker's slot once its lease expires, then the rest of the budget
    other.join(60)
    assert other.exitcode == 0
    os.kill(frozen.pid, signal.SIGCONT)  # it thaws and tries to record the generation it trained
    frozen.join(60)
    assert frozen.exitcode == 0
    _assert_exact_budget(run_dir, 6)
    [stale] = _records(run_dir, "stale")
    [expired] = _records(run_dir, "expired")
    assert stale["worker"] == expired["worker"] == "w1" and stale["claim"] == expired["claim"]
    assert all(record["worker"] == "w0" for record in _records(run_dir, "ok"))


def test_sigterm_then_restart_continues_at_the_right_count(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = [FORK.Process(target=_worker_process, args=(run_dir, f"w{i}", 12, 0.3, 1.0)) for i in range(2)]
    for process in first:
        process.start()
    _wait_for(lambda: {"w0", "w1"} <= _workers_seen(run_dir) and Journal(run_dir).count_rows() >= 2)
    for process in first:
        os.kill(process.pid, signal.SIGTERM)  # what `docker stop` sends
    for process in first:
        process.join(30)
        assert process.exitcode == 0
    stopped_at = Journal(run_dir).count_rows()
    assert 2 <= stopped_at < 12 and _state(run_dir)["leases"] == {}  # each finished its generation
    assert _records(run_dir, "expired") == [] and _records(run_dir, "failed") == []
    second = [FORK.Process(target=_worker_process, args=(run_dir, f"w{i}", 12, 0.05, 1.0)) for i in range(2)]
    for process in second:
        process.start()
    for process in second:
        process.join(60)
        assert process.exitcode == 0
    _assert_exact_budget(run_dir, 12)


def test_killing_every_worker_then_restarting_trains_the_lost_children(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    hung = [FORK.Process(target=_worker_process, args=(run_dir, f"w{i}", 4, 60.0, 0.5)) for i in range(2)]
    for process in hung:
        process.start()
    _wait_for(lambda: (run_dir / "claims.json").exists() and len(_state(run_dir)["leases"]) == 2)
    lost = [lease["hyp"] for lease in _state(run_dir)["leases"].values()]
    for process in hung:
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    restarted = [FORK.Process(target=_worker_process, args=(run_dir, f"w{i}", 4, 0.05, 0.5)) for i in range(2)]
    for process in restarted:
        process.start()
    for process in restarted:
        process.join(60)
        assert process.exitcode == 0
    _assert_exact_budget(run_dir, 4)
    population = Journal(run_dir).read_population(KEYS)
    trained = [population.hyp_at(row) for row in range(len(population))]
    assert all(child in trained for child in lost)
    assert BASE.tolist() in population.hyps.tolist()  # claim 0, the base hyp, was among the lost
