"""The run directory's evolve files, and the lock that makes many writers safe.

This module is the only writer of a run directory's journal:
- `evolve.csv`: YOLOv5's format, byte for byte (header once, names `%20s`, rows `%20.5g`,
  comma-joined), so YOLOv5's own tools read it. Only successful generations are rows.
- `evolve_meta.jsonl`: provenance, one JSON line per event (ok, failed, expired, ...).
- `claims.json`: the budget, the live leases and the slots waiting for a retry.
- `evolve.lock`: the lock file. Everything above is written while holding it.

Appends are one `os.write` of whole lines on an O_APPEND descriptor, then fsync, all under
the lock. A writer killed mid-write leaves a last line without a newline: readers ignore
it and the next writer truncates it before appending. `claims.json` and derived files are
replaced atomically (temporary file in the same folder, fsync, `os.replace`). A damaged line in
the middle of a file (a hand edit, a writer without our lock) is skipped with one warning and
left where it is, so row numbers keep matching the file's lines.

NFS: `FileLock` uses flock(2). The kernel drops a flock when its holder dies, so a killed
worker never blocks the others. On NFSv4 Linux maps flock to POSIX byte-range locks held
by the server, which works across hosts (a dead client's locks go when its NFS lease
expires, about 90 s). On NFSv3 it needs the lockd/statd services; with `nolock` mounts the
lock is local to each host and does NOT exclude writers on other hosts: use a local run
directory there, or `soft_lock=True` (a lock file created with O_EXCL, which a killed
holder leaves behind: delete it by hand once no worker runs). NFS clients see each
other's rows because every writer fsyncs before it releases the lock and every reader
opens the files again after taking it (close-to-open consistency).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, SoftFileLock, Timeout

from orchestrator.evolution.repeats import distinct_ranked, pooled_fitness
from trainer.config import Hyp
from trainer.errors import UserError
from trainer.files import read_yaml, write_atomic
from trainer.results import RESULT_COLUMNS, fitness

CSV_NAME = "evolve.csv"
META_NAME = "evolve_meta.jsonl"
STATE_NAME = "claims.json"
LOCK_NAME = "evolve.lock"
STOP_NAME = "STOP"

logger = logging.getLogger(__name__)


class JournalLockTimeout(RuntimeError):
    """The run directory's lock could not be taken in time."""


def run_columns(base_hyp: Hyp) -> tuple[str, ...]:
    """The hyperparameter columns of a run: every Hyp key, `anchors` only when the base sets it."""
    return tuple(key for key in Hyp.keys()  # noqa: SIM118 - Hyp is a dataclass; keys() is its classmethod
                 if key != "anchors" or base_hyp.anchors is not None)


def format_header(hyp_keys: Sequence[str]) -> bytes:
    return (",".join(f"{name:>20s}" for name in (*RESULT_COLUMNS, *hyp_keys)) + "\n").encode()


def format_rows(results: np.ndarray, hyps: np.ndarray) -> bytes:
    rows = np.hstack([np.atleast_2d(results), np.atleast_2d(hyps)])
    return "".join(",".join(f"{value:20.5g}" for value in row) + "\n" for row in rows).encode()


@dataclass(frozen=True)
class DamagedRow:
    """A line of an evolve.csv that is not a row of numbers: a hand edit, a torn write by a writer
    without our lock, a second header where two runs were concatenated."""

    line: int  # in the file, from 1 (the header)
    reason: str

    def describe(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class Population:
    """The rows of evolve.csv: 7 results and the hyperparameters of each generation."""

    hyp_keys: tuple[str, ...]
    results: np.ndarray  # (rows, 7)
    hyps: np.ndarray  # (rows, len(hyp_keys))
    damaged: tuple[DamagedRow, ...] = ()  # lines that are not rows: all NaN here, so row numbers stay line - 2

    def __len__(self) -> int:
        return len(self.results)

    @property
    def fitness(self) -> np.ndarray:
        return fitness(self.results)

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the mean fitness of the rows with its genes, and how many those are (repeats.py)."""
        return pooled_fitness(self.hyps, self.fitness)

    def ranked(self) -> np.ndarray:
        """Rows best first by pooled fitness, one per distinct set of genes; NaN never ranks."""
        return distinct_ranked(self.hyps, self.fitness)

    def best_row(self) -> int | None:
        """The fittest row by pooled fitness (the earliest of its repeats); None when no row has a
        finite fitness."""
        ranked = self.ranked()
        return int(ranked[0]) if ranked.size else None

    def whole(self) -> np.ndarray:
        """Rows whose results and genes are all numbers (not damaged lines, not NaN results)."""
        finite = np.all(np.isfinite(self.results), axis=1) & np.all(np.isfinite(self.hyps), axis=1)
        return np.flatnonzero(finite)

    def hyp_at(self, row: int) -> dict[str, float]:
        return {key: float(value) for key, value in zip(self.hyp_keys, self.hyps[row])}

    @classmethod
    def empty(cls, hyp_keys: Sequence[str]) -> Population:
        return cls(tuple(hyp_keys), np.zeros((0, len(RESULT_COLUMNS))), np.zeros((0, len(hyp_keys))))


def parse_evolve_csv(data: bytes, source: str) -> Population:
    """Parse evolve.csv bytes, ignoring a torn last line (one without its newline).

    A line in the middle that is not a row of numbers (`DamagedRow`) does not stop the reading:
    it becomes a row of NaN, which never ranks and is never a parent, and is listed in
    `Population.damaged`. The file itself is left as it is.
    """
    complete = data[: data.rfind(b"\n") + 1]
    header, _, body = complete.partition(b"\n")
    names = [name.strip() for name in header.decode(errors="replace").split(",")] if header else []
    if tuple(names[: len(RESULT_COLUMNS)]) != RESULT_COLUMNS:
        raise UserError(f"{source} is not an evolve.csv: its header must start with {', '.join(RESULT_COLUMNS)}")
    hyp_keys = tuple(names[len(RESULT_COLUMNS) :])
    if not body:
        return Population.empty(hyp_keys)
    lines = body.split(b"\n")[:-1]
    table = None
    if body.strip():  # numpy warns on a body of blank lines; those are damaged rows, read below
        with contextlib.suppress(ValueError):
            table = np.loadtxt(io.BytesIO(body), delimiter=",", ndmin=2, comments=None)
    if table is None or table.shape != (len(lines), len(names)):  # an empty line is skipped by numpy, not here
        table, damaged = _parse_lines(lines, len(names))
    else:
        damaged = ()
    return Population(hyp_keys, table[:, : len(RESULT_COLUMNS)], table[:, len(RESULT_COLUMNS) :], damaged)


def _parse_lines(lines: Sequence[bytes], width: int) -> tuple[np.ndarray, tuple[DamagedRow, ...]]:
    """The slow path: every line on its own, damaged ones as NaN rows."""
    table = np.full((len(lines), width), np.nan)
    damaged = []
    for index, line in enumerate(lines):
        values, reason = _parse_line(line, width)
        if reason is None:
            table[index] = values
        else:
            damaged.append(DamagedRow(index + 2, reason))
    return table, tuple(damaged)


def _parse_line(line: bytes, width: int) -> tuple[list[float], str | None]:
    fields = line.decode(errors="replace").split(",")
    if not line.strip():
        return [], "an empty line"
    if fields[0].strip() == RESULT_COLUMNS[0]:
        return [], "a second header line"
    if len(fields) != width:
        return [], f"{len(fields)} value{'s' if len(fields) > 1 else ''} where the header has {width} columns"
    values = []
    for column, field in enumerate(fields, start=1):
        try:
            values.append(float(field))
        except ValueError:
            shown = field.strip()
            shown = shown if len(shown) <= 24 else shown[:21] + "..."
            return [], f"value {column} ({shown!r}) is not a number"
    return values, None


def damage_report(source: str | Path, damaged: Sequence[DamagedRow], limit: int = 3) -> str:
    """One line for the user: which lines are damaged (the first few), and what happens to them."""
    shown = "; ".join(row.describe() for row in damaged[:limit])
    more = f"; and {len(damaged) - limit} more" if len(damaged) > limit else ""
    advice = "" if str(source).endswith(META_NAME) else (
        "; repair a line in place to use its row (deleting a line renumbers the rows after it)")
    return f"{source}: {shown}{more}. Ignored and left in the file{advice}"


def read_evolve_csv(path: Path) -> Population:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    return parse_evolve_csv(data, str(path))


def check_hyp_keys(found: Sequence[str], expected: Sequence[str], source: str) -> None:
    """A UserError naming the difference when a file's hyperparameter columns are not the run's."""
    if list(found) == list(expected):
        return
    missing = [key for key in expected if key not in found]
    extra = [key for key in found if key not in expected]
    detail = "; ".join(
        part
        for part in (
            f"missing {', '.join(missing)}" if missing else "",
            f"unexpected {', '.join(extra)}" if extra else "",
            "same keys in another order" if not missing and not extra else "",
        )
        if part
    )
    hint = " (anchors is a column only when the base hyp sets anchors)" if "anchors" in missing + extra else ""
    raise UserError(f"{source}: hyperparameter columns differ from this run's: {detail}{hint}")


def check_hyp_rows(population: Population, source: str) -> None:
    """A UserError naming the first row of a file not written by this run whose hyperparameters
    are outside their valid ranges: as a parent, it would pass them on to its children."""
    for row in population.whole():
        Hyp.from_dict(population.hyp_at(row), source=f"{source}, data row {row + 1}")


@dataclass(frozen=True)
class PopulationSeed:
    """What `--evolve-population` brings to a new run: rows to import, children to train first."""

    imported: tuple[tuple[str, Population], ...]  # (source file, its rows in the run's column order)
    queued: tuple[tuple[str, dict[str, float]], ...]  # (source file, child hyp)


def load_population_seed(paths: Sequence[str | Path], base_hyp: Hyp, hyp_keys: Sequence[str]) -> PopulationSeed:
    """Read YOLOv5 evolve.csv files (rows to import) and hyp YAMLs (children to queue).

    A csv's columns are matched by name: YOLOv5 versions differ, so a column the run lacks is
    dropped and a column the csv lacks takes the base hyp's value, with a warning. A YAML's
    missing keys take the base hyp's values. Every problem is a UserError, raised before any write.
    """
    imported: list[tuple[str, Population]] = []
    queued: list[tuple[str, dict[str, float]]] = []
    base = base_hyp.as_dict(include_unset=True)
    for path in map(Path, paths):
        if path.suffix == ".csv":
            found = _in_run_columns(read_evolve_csv(path), hyp_keys, base, path)
            check_hyp_rows(found, str(path))
            imported.append((str(path), _whole_rows(found, path)))
            continue
        for name, given in _seed_hyps(path):
            if given.get("anchors") is not None and "anchors" not in hyp_keys:
                raise UserError(f"{name} sets anchors but the base hyp does not: set anchors in the base hyp to "
                                "evolve it")
            queued.append((str(path), {key: float(given.get(key, base[key])) for key in hyp_keys}))
    return PopulationSeed(tuple(imported), tuple(queued))


def _in_run_columns(found: Population, hyp_keys: Sequence[str], base: dict[str, Any], path: Path) -> Population:
    """The csv's rows in the run's hyperparameter columns, matched by name."""
    if found.hyp_keys == tuple(hyp_keys):
        return found
    if not set(found.hyp_keys) & set(hyp_keys):
        raise UserError(f"{path}: none of its columns {', '.join(found.hyp_keys) or '(none)'} is a hyperparameter "
                        f"of this run: is it an evolve.csv of a YOLOv5 evolution?")
    missing = [key for key in hyp_keys if key not in found.hyp_keys]
    extra = [key for key in found.hyp_keys if key not in hyp_keys]
    if missing or extra:
        logger.warning("%s: other hyperparameter columns than this run's: %s", path, "; ".join(filter(None, [
            f"{', '.join(missing)} taken from the base hyp" if missing else "",
            f"{', '.join(extra)} ignored" if extra else ""])))
    columns = [found.hyps[:, found.hyp_keys.index(key)] if key in found.hyp_keys else np.full(len(found), base[key])
               for key in hyp_keys]
    return dataclasses.replace(found, hyp_keys=tuple(hyp_keys), hyps=np.column_stack(columns))


def _whole_rows(found: Population, path: Path) -> Population:
    """The rows of a population file worth importing: a file written by several YOLOv5 processes
    without a lock holds repeated headers and torn rows, and a diverged training leaves NaN."""
    whole = found.whole()
    skipped = len(found) - len(whole)
    if skipped:
        nan_rows = skipped - len(found.damaged)
        reasons = [f"{nan_rows} with NaN values"] if nan_rows else []
        reasons += [row.describe() for row in found.damaged[:3]] + (["..."] if len(found.damaged) > 3 else [])
        logger.warning("%s: %d whole rows to import, %d skipped (%s)", path, len(whole), skipped, "; ".join(reasons))
    return Population(found.hyp_keys, found.results[whole], found.hyps[whole])


def _seed_hyps(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The hyps of one YAML: a hyp file, or a population file (`evolve_population.yaml`, YOLOv5's
    `--resume_evolve` format: a mapping of individual name to hyp). Each is validated as a hyp."""
    values = read_yaml(path, "population file")
    if isinstance(values, dict) and values and all(isinstance(value, dict) for value in values.values()):
        individuals = [(f"{path} [{name}]", value) for name, value in values.items()]
        for source, value in individuals:
            Hyp.from_dict(value, source=source)
        return individuals
    Hyp.from_yaml(path)  # raises a UserError for an unreadable file, unknown key or non-number
    return [(str(path), values)]


class Journal:
    """A run directory's evolve files; every write method must run inside `locked()`."""

    def __init__(self, run_dir: str | Path, soft_lock: bool = False, lock_timeout: float = 120.0) -> None:
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / CSV_NAME
        self.meta_path = self.run_dir / META_NAME
        self.state_path = self.run_dir / STATE_NAME
        self.lock_path = self.run_dir / LOCK_NAME
        self.stop_path = self.run_dir / STOP_NAME
        self.soft_lock = soft_lock
        self.lock_timeout = lock_timeout
        self._holding = threading.local()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory's lock; a fresh lock object per call keeps threads independent."""
        lock_type = SoftFileLock if self.soft_lock else FileLock
        lock = lock_type(str(self.lock_path), timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise JournalLockTimeout(
                f"could not lock {self.lock_path} within {self.lock_timeout:g} s; another worker holds it"
                + (" (a soft lock left by a killed worker must be deleted by hand)" if self.soft_lock else "")
            ) from None
        self._holding.active = True
        try:
            yield
        finally:
            self._holding.active = False
            lock.release()

    def _require_lock(self) -> None:
        if not getattr(self._holding, "active", False):
            raise RuntimeError("journal writes must happen inside Journal.locked()")

    # Reading: safe without the lock (a torn last line is ignored), fresh after taking it.

    def read_header(self) -> tuple[str, ...] | None:
        """The csv's hyperparameter columns, or None when there is no complete header yet."""
        try:
            with self.csv_path.open("rb") as handle:
                first = handle.readline()
        except FileNotFoundError:
            return None
        if not first.endswith(b"\n"):
            return None
        return parse_evolve_csv(first, str(self.csv_path)).hyp_keys

    def read_population(self, hyp_keys: Sequence[str] | None = None) -> Population:
        try:
            data = self.csv_path.read_bytes()
        except FileNotFoundError:
            return Population.empty(hyp_keys or ())
        if b"\n" not in data:
            return Population.empty(hyp_keys or ())
        population = parse_evolve_csv(data, str(self.csv_path))
        _warn_once(self.csv_path, population.damaged)
        if hyp_keys is not None:
            check_hyp_keys(population.hyp_keys, hyp_keys, str(self.csv_path))
        return population

    def count_rows(self) -> int:
        """Complete data rows in evolve.csv, without parsing them."""
        try:
            data = self.csv_path.read_bytes()
        except FileNotFoundError:
            return 0
        return max(data.count(b"\n") - 1, 0)

    def read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None

    def read_records(self) -> list[dict[str, Any]]:
        """Every complete provenance record, oldest first."""
        try:
            data = self.meta_path.read_bytes()
        except FileNotFoundError:
            return []
        records, damaged = [], []
        for number, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif line.strip():
                damaged.append(DamagedRow(number, "not a JSON object"))
        _warn_once(self.meta_path, damaged)
        return records

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    # Writing: only under the lock.

    def ensure_header(self, hyp_keys: Sequence[str]) -> None:
        """Write the csv header if the file has none; check it against `hyp_keys` otherwise."""
        self._require_lock()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        existing = self.read_header()
        if existing is not None:
            check_hyp_keys(existing, hyp_keys, str(self.csv_path))
            return
        _append_lines(self.csv_path, format_header(hyp_keys))

    def append_rows(self, results: np.ndarray, hyps: np.ndarray) -> int:
        """Append whole rows after the header; returns the index of the first new row."""
        self._require_lock()
        if self.read_header() is None:
            raise RuntimeError(f"{self.csv_path} has no header; call ensure_header first")
        lines_before = _append_lines(self.csv_path, format_rows(results, hyps), count_lines=True)
        return lines_before - 1  # the header is the first line

    def append_record(self, record: dict[str, Any]) -> None:
        self._require_lock()
        _append_lines(self.meta_path, (json.dumps(record, sort_keys=True) + "\n").encode())

    def write_state(self, state: dict[str, Any]) -> None:
        self._require_lock()
        write_atomic(self.state_path, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())

    def request_stop(self) -> None:
        """Ask every worker to finish its current generation and exit."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop_path.touch()

    def clear_stop(self) -> None:
        self.stop_path.unlink(missing_ok=True)


_warned: set[tuple[str, tuple[int, ...]]] = set()


def _warn_once(path: Path, damaged: Sequence[DamagedRow]) -> None:
    """Log the damaged lines of a run's file once per process, and again when they change."""
    key = (str(path), tuple(row.line for row in damaged))
    if damaged and key not in _warned:
        _warned.add(key)
        logger.warning("%s", damage_report(path, damaged))


def _append_lines(path: Path, lines: bytes, count_lines: bool = False) -> int:
    """Repair a torn tail, append `lines` with one write, fsync.

    Returns how many complete lines came before them when `count_lines`, else 0.
    """
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = _truncate_torn_tail(descriptor)
        existing = os.pread(descriptor, size, 0).count(b"\n") if count_lines and size else 0
        try:
            written = os.write(descriptor, lines)
            while written < len(lines):  # a short write is rare on local disks but legal
                written += os.write(descriptor, lines[written:])
            os.fsync(descriptor)
        except OSError:
            os.ftruncate(descriptor, size)  # a full disk took some of the lines: none of them count
            raise
    except OSError as error:
        error.filename = error.filename or str(path)  # a failed write names no file
        raise
    finally:
        os.close(descriptor)
    return existing


def _truncate_torn_tail(descriptor: int) -> int:
    """Cut a last line left without its newline by a killed writer; returns the new size."""
    size = os.fstat(descriptor).st_size
    if size == 0 or os.pread(descriptor, 1, size - 1) == b"\n":
        return size
    data = os.pread(descriptor, size, 0)
    keep = data.rfind(b"\n") + 1
    os.ftruncate(descriptor, keep)
    os.fsync(descriptor)
    return keep
