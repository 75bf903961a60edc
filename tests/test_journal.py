"""The locked evolve.csv journal: its format, many writers at once, killed writers, derived files."""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from orchestrator.cli.render import summary_table
from orchestrator.evolution import artifacts
from orchestrator.evolution.journal import (
    Journal,
    Population,
    damage_report,
    format_header,
    format_rows,
    parse_evolve_csv,
    run_columns,
)
from trainer.config import Hyp
from trainer.errors import UserError
from trainer.results import RESULT_COLUMNS

KEYS = run_columns(Hyp())
BASE = np.array([Hyp().as_dict()[key] for key in KEYS])
FORK = multiprocessing.get_context("fork")


def _result(writer: int, index: int) -> np.ndarray:
    """A result row that says who wrote it, so every row can be accounted for."""
    return np.array([writer, index, 0.5, 0.25, 0.1, 0.2, 0.3])


def _new_journal(run_dir: Path) -> Journal:
    journal = Journal(run_dir, lock_timeout=20)
    run_dir.mkdir(parents=True, exist_ok=True)
    with journal.locked():
        journal.ensure_header(KEYS)
    return journal


def _written_pairs(journal: Journal) -> list[tuple[int, int]]:
    population = journal.read_population(KEYS)
    return [(int(row[0]), int(row[1])) for row in population.results]


def _assert_well_formed(path: Path) -> None:
    """Header once, then only complete rows of 20-character fields."""
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the file must end with a newline"
    width = len(RESULT_COLUMNS) + len(KEYS)
    header = lines[0].decode().split(",")
    assert [name.strip() for name in header] == [*RESULT_COLUMNS, *KEYS]
    assert all(len(name) == 20 or len(name.strip()) > 20 for name in header)
    for line in lines[1:-1]:
        fields = line.decode().split(",")
        assert len(fields) == width and all(len(field) == 20 for field in fields), line
        assert not line.decode().lstrip().startswith("metrics/")


def test_rows_are_yolov5_format_and_read_back(tmp_path: Path) -> None:
    journal = _new_journal(tmp_path / "run")
    hyps = np.vstack([BASE, BASE * 1.5])
    results = np.array([[0.61234567, 0.5, 0.4, 0.2, 0.031, 0.042, 0.0051], [0.7, 0.6, 0.5, 0.3, 0.02, 0.03, 0.004]])
    with journal.locked():
        assert journal.append_rows(results, hyps) == 0
        assert journal.append_rows(results[:1], hyps[:1]) == 2
    text = journal.csv_path.read_text()
    header, first = text.splitlines()[:2]
    assert header.startswith("   metrics/precision,      metrics/recall,     metrics/mAP_0.5,metrics/mAP_0.5:0.95,")
    assert header.endswith(",              mosaic,               mixup,          copy_paste")
    assert first.startswith("             0.61235,                 0.5,                 0.4,")
    _assert_well_formed(journal.csv_path)
    population = journal.read_population(KEYS)
    assert len(population) == 3 and journal.count_rows() == 3
    np.testing.assert_allclose(population.hyps[1], [float(f"{value:.5g}") for value in BASE * 1.5])
    assert population.results[0, 0] == 0.61235


def test_anchors_is_a_column_only_when_the_base_sets_it() -> None:
    assert "anchors" not in run_columns(Hyp())
    assert run_columns(Hyp(anchors=3.0))[-1] == "anchors"


def test_header_is_written_once_and_checked(tmp_path: Path) -> None:
    journal = _new_journal(tmp_path / "run")
    with journal.locked():
        journal.ensure_header(KEYS)
        with pytest.raises(UserError, match="missing anchors"):
            journal.ensure_header((*KEYS, "anchors"))
    assert journal.csv_path.read_text().count("metrics/precision") == 1


def test_writes_outside_the_lock_are_refused(tmp_path: Path) -> None:
    journal = _new_journal(tmp_path / "run")
    with pytest.raises(RuntimeError, match="inside Journal.locked"):
        journal.append_rows(_result(0, 0), BASE)


def test_torn_last_line_is_ignored_then_repaired(tmp_path: Path) -> None:
    journal = _new_journal(tmp_path / "run")
    with journal.locked():
        journal.append_rows(_result(0, 0), BASE)
    with journal.csv_path.open("ab") as handle:
        handle.write(b"                 0.5,        0.2")  # a writer died here
    assert _written_pairs(journal) == [(0, 0)]
    assert journal.count_rows() == 1
    with journal.locked():
        assert journal.append_rows(_result(0, 1), BASE) == 1
    assert _written_pairs(journal) == [(0, 0), (0, 1)]
    _assert_well_formed(journal.csv_path)


def test_torn_header_is_replaced_by_a_whole_one(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "run")
    journal.run_dir.mkdir()
    journal.csv_path.write_bytes(b"   metrics/precision,    metri")
    assert journal.read_header() is None
    assert len(journal.read_population()) == 0
    with journal.locked():
        journal.ensure_header(KEYS)
        journal.append_rows(_result(0, 0), BASE)
    _assert_well_formed(journal.csv_path)


def _append_many(run_dir: Path, writer: int, count: int) -> None:
    journal = Journal(run_dir, lock_timeout=60)
    for index in range(count):
        with journal.locked():
            journal.append_rows(_result(writer, index), BASE)
            journal.append_record({"writer": writer, "index": index})


def test_sixteen_processes_append_at_once_without_losing_or_tearing_a_row(tmp_path: Path) -> None:
    journal = _new_journal(tmp_path / "run")
    writers, rows_each = 16, 40
    processes = [FORK.Process(target=_append_many, args=(journal.run_dir, w, rows_each)) for w in range(writers)]
    for process in processes:
        process.start()
    reads = 0
    while any(process.is_alive() for process in processes):
        # Lock-free readers run alongside the writers and must never see a broken row.
        pairs = _written_pairs(journal)
        assert len(set(pairs)) == len(pairs)
        reads += 1
    for process in processes:
        process.join()
        assert process.exitcode == 0
    pairs = _written_pairs(journal)
    assert sorted(pairs) == [(w, i) for w in range(writers) for i in range(rows_each)]
    _assert_well_formed(journal.csv_path)
    records = journal.read_records()
    assert len(records) == writers * rows_each
    assert reads > 0


def _write_half_a_row_then_hang(run_dir: Path, ready: multiprocessing.synchronize.Event, writer: int) -> None:
    real_write = os.write

    def half_write(descriptor: int, data: bytes) -> int:
        real_write(descriptor, data[: len(data) // 2])
        ready.set()
        time.sleep(60)  # killed here, lock held, half a row on disk
        return 0

    os.write = half_write
    journal = Journal(run_dir)
    with journal.locked():
        journal.append_rows(_result(writer, 0), BASE)


def test_writers_killed_mid_append_lose_only_their_own_row(tmp_path: Path) -> None:
    journal = _new_journal(tmp_path / "run")
    journal.lock_timeout = 5  # a lock kept by a dead writer would make this test fail, not hang
    for round_index in range(4):
        ready = FORK.Event()
        victim = FORK.Process(target=_write_half_a_row_then_hang, args=(journal.run_dir, ready, 100 + round_index))
        victim.start()
        assert ready.wait(20)
        assert not journal.csv_path.read_bytes().endswith(b"\n")
        assert len(_written_pairs(journal)) == round_index  # readers skip the torn half
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        with journal.locked():  # the kernel released the dead writer's flock
            journal.append_rows(_result(0, round_index), BASE)
    assert _written_pairs(journal) == [(0, index) for index in range(4)]
    _assert_well_formed(journal.csv_path)


def test_best_row_is_the_fittest_and_nan_never_wins() -> None:
    results = np.array([[0, 0, 0.5, 0.3, 0, 0, 0], [0, 0, math.nan, 0.9, 0, 0, 0], [0, 0, 0.6, 0.4, 0, 0, 0]])
    population = Population(KEYS, results, np.vstack([BASE, BASE * 2, BASE * 3]))
    assert population.best_row() == 2
    empty = Population(KEYS, results[1:2], BASE[None])
    assert empty.best_row() is None


def test_best_row_ranks_repeated_genes_by_their_mean() -> None:
    results = np.zeros((3, 7))
    results[:, 3] = [0.5, 0.1, 0.4]  # rows 0 and 1 share their genes: mean 0.3, below row 2
    population = Population(KEYS, results, np.vstack([BASE, BASE, BASE * 2]))
    assert population.best_row() == 2
    assert list(population.ranked()) == [2, 0]
    assert "row3" in artifacts.render_evolve_population(population).split("\n")[1]


def test_a_file_that_is_not_an_evolve_csv_is_a_user_error() -> None:
    with pytest.raises(UserError, match="not an evolve.csv"):
        parse_evolve_csv(b"a,b,c\n1,2,3\n", "other.csv")


def test_damaged_lines_become_nan_rows_in_place_and_are_named() -> None:
    header = format_header(["lr0"])
    row = format_rows(np.arange(7.0), np.array([0.01]))
    data = header + row + header + row[:30] + b"\n" + b"\n" + row.replace(b"0.01", b"oops") + b"# tuned by hand\n" + row
    population = parse_evolve_csv(data + row[:40], "evolve.csv")  # and a torn last line, still ignored
    assert len(population) == 7 and population.hyp_keys == ("lr0",)
    assert [row.describe() for row in population.damaged] == [
        "line 3: a second header line",
        "line 4: 2 values where the header has 8 columns",
        "line 5: an empty line",
        "line 6: value 8 ('oops') is not a number",
        "line 7: 1 value where the header has 8 columns",
    ]
    assert list(population.whole()) == [0, 6]  # row numbers stay line - 2
    assert np.isnan(population.results[1:6]).all() and population.best_row() == 0
    report = damage_report("evolve.csv", population.damaged)
    assert report.startswith("evolve.csv: line 3: a second header line; line 4: ") and "and 2 more" in report
    assert parse_evolve_csv(header + row + row, "evolve.csv").damaged == ()  # the fast path


def _small_population() -> Population:
    hyps = np.vstack([BASE, BASE, BASE])
    hyps[1, KEYS.index("lr0")] = 0.02
    hyps[2, KEYS.index("mosaic")] = 0.5
    results = np.array(
        [
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1],
            [0.6, 0.5, 0.5, 0.4, 0.1, 0.1, 0.1],
            [0.5, 0.5, math.nan, 0.9, 0.1, 0.1, 0.1],
        ]
    )
    return Population(KEYS, results, hyps)


def test_hyp_evolve_yaml_holds_the_best_row_under_a_yolov5_style_header(tmp_path: Path) -> None:
    assert artifacts.write_hyp_evolve(tmp_path, _small_population())
    text = (tmp_path / "hyp_evolve.yaml").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# evolvectl")
    assert lines[1:3] == ["# Best generation: 1", "# Last generation: 2"]
    assert "metrics/mAP_0.5:0.95" in lines[3] and "0.4" in lines[4]
    best = yaml.safe_load(text)
    assert list(best) == list(KEYS) and best["lr0"] == 0.02
    assert Hyp.from_dict(best).lr0 == 0.02
    assert not artifacts.write_hyp_evolve(
        tmp_path / "none", Population(KEYS, _small_population().results[2:], BASE[None])
    )


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    assert artifacts.write_plots(tmp_path, _small_population(), ["lr0", "mosaic", "hsv_h"])
    for name in ("evolve.png", "fitness.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_summary_table_lists_the_best_rows_and_their_changes_from_base() -> None:
    table = summary_table(_small_population(), Hyp(), top=5)
    assert table.row_count == 2  # the NaN row is not ranked
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    text = console.file.getvalue()
    assert "lr0 0.01 → 0.02" in text and "(base hyp)" in text
    assert text.index("lr0 0.01 → 0.02") < text.index("(base hyp)")


def test_changed_genes_are_listed_by_how_far_they_moved_across_their_range() -> None:
    hyps = np.vstack([BASE, BASE])
    # lr0 0.01 → 0.005: half the base value, but a small step on its log range (1e-5 to 0.1);
    # mosaic 1.0 → 0.4: 60% of its range; degrees 0 → 0.5: about 1% of 0..45, an infinite ratio.
    for key, value in (("lr0", 0.005), ("mosaic", 0.4), ("degrees", 0.5)):
        hyps[1, KEYS.index(key)] = value
    results = np.array([[0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1], [0.6, 0.5, 0.5, 0.4, 0.1, 0.1, 0.1]])
    console = Console(file=io.StringIO(), width=300)
    console.print(summary_table(Population(KEYS, results, hyps), Hyp(), top=1))
    text = console.file.getvalue()
    assert text.index("mosaic 1 → 0.4") < text.index("lr0 0.01 → 0.005") < text.index("degrees 0 → 0.5")
