"""Real faults, met the way users meet them: a disk that fills up, a run folder that turns
read-only. Each runs the real worker or trainer process on a small file system made here (a
tmpfs; skipped with the reason where this machine cannot mount one) and checks the one-line
message, the exit code, and that nothing written before was lost."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FileServer, run_trainer, write_data_yaml

from orchestrator.evolution.journal import Journal, run_columns
from trainer.config import Hyp
from trainer.errors import CannotWrite

pytestmark = [pytest.mark.faults, pytest.mark.slow]

KEYS = run_columns(Hyp())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB file system of its own, mounted for this test."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}): needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk: Path) -> Path:
    """Write until the file system is full; returns the filler to delete later."""
    filler = disk / f"filler-{uuid.uuid4().hex}"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def _worker(data: Path, project: Path, generations: int, *more: str) -> subprocess.CompletedProcess:
    """One evolution worker, as a container runs it: `python -m trainer --evolve N ...`."""
    return run_trainer("--evolve", str(generations), "--data", str(data), "--epochs", "1", "--imgsz", "64",
                       "--batch-size", "8", "--workers", "0", "--device", "cpu", "--noautoanchor",
                       "--project", str(project), "--name", "run", *more, cwd=data.parent, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, *parts: str) -> None:
    assert result.returncode == CannotWrite.exit_code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot write ") and all(part in last for part in parts), last


def _journal_intact(run_dir: Path, rows: int) -> None:
    population = Journal(run_dir).read_population(KEYS)
    assert len(population) == rows and population.damaged == ()
    json.loads((run_dir / "claims.json").read_text())
    ok = [record for record in Journal(run_dir).read_records() if record["status"] == "ok"]
    assert sorted(record["row"] for record in ok) == list(range(rows))


def test_a_full_disk_stops_a_worker_with_one_line_and_loses_nothing(small_disk: Path, tmp_path: Path) -> None:
    data = write_data_yaml(tmp_path, train=16, val=8, size=64)
    assert _worker(data, small_disk, 1).returncode == 0  # the base hyp's generation
    filler = _fill(small_disk)
    full = _worker(data, small_disk, 3)
    _assert_one_line_error(full, str(small_disk / "run"), "No space left on device (ENOSPC)", "free space there")
    _journal_intact(small_disk / "run", 1)
    filler.unlink()  # space again: the same command goes on where the run stood
    resumed = _worker(data, small_disk, 3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _journal_intact(small_disk / "run", 3)


def test_a_read_only_run_folder_stops_a_worker_with_one_line(small_disk: Path, tmp_path: Path) -> None:
    data = write_data_yaml(tmp_path, train=16, val=8, size=64)
    assert _worker(data, small_disk, 1).returncode == 0
    before = (small_disk / "run" / "evolve.csv").read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    read_only = _worker(data, small_disk, 3)
    _assert_one_line_error(read_only, str(small_disk / "run"), "Read-only file system (EROFS)", "make it writable")
    assert (small_disk / "run" / "evolve.csv").read_bytes() == before


def test_a_full_disk_stops_a_training_with_one_line(small_disk: Path, tmp_path: Path) -> None:
    """The 2 MiB disk cannot hold a yolov5n checkpoint: the first save fails, atomically."""
    data = write_data_yaml(tmp_path, train=16, val=8, size=64)
    result = run_trainer("--data", str(data), "--epochs", "1", "--imgsz", "64", "--batch-size", "8",
                         "--workers", "0", "--device", "cpu", "--noautoanchor", "--noplots",
                         "--project", str(small_disk), "--name", "train", cwd=tmp_path, timeout=300)
    _assert_one_line_error(result, str(small_disk / "train" / "weights"), "(ENOSPC)")
    assert not [path for path in (small_disk / "train" / "weights").iterdir() if path.suffix == ".tmp"]


def test_the_local_supervisor_does_not_restart_a_worker_that_cannot_write(tmp_path: Path) -> None:
    """A full disk stays full: restarting would only spin. Any other failure is restarted."""
    state = tmp_path / "state.json"
    starts = tmp_path / "starts"
    for code, runs in ((CannotWrite.exit_code, 1), (1, 3)):
        starts.unlink(missing_ok=True)
        worker = [sys.executable, "-c", f"open({str(starts)!r}, 'a').write('x'); raise SystemExit({code})"]
        supervisor = subprocess.run([sys.executable, "-m", "orchestrator.backends.local.supervisor", "--state",
                                     str(state), "--max-restarts", "2", "--", *worker], check=False, timeout=60)
        assert supervisor.returncode == code
        assert len(starts.read_text()) == runs
        assert json.loads(state.read_text())["exit_code"] == code


def test_a_racy_yolov5_evolve_csv_seeds_a_run_with_its_whole_rows(tmp_path: Path) -> None:
    """Weeks of results from YOLOv5 containers that appended to one evolve.csv without a lock:
    repeated headers, a torn row, a NaN row. A real worker imports every whole row and says
    what it skipped."""
    data = write_data_yaml(tmp_path, train=16, val=8, size=64)
    assert _worker(data, tmp_path / "old", 2).returncode == 0
    header, *rows = (tmp_path / "old" / "run" / "evolve.csv").read_bytes().splitlines(keepends=True)
    nan_row = b",".join([b"%20s" % b"nan"] * 7 + rows[0].split(b",")[7:])
    racy = tmp_path / "racy.csv"
    racy.write_bytes(header + rows[0] + header + rows[1][:50] + b"\n" + nan_row + rows[1])
    result = _worker(data, tmp_path / "new", 3, "--evolve-population", str(racy))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{racy}: 2 whole rows to import, 3 skipped (1 with NaN values; line 3: a second header line; " \
           "line 4: 3 values where the header has" in result.stderr
    population = Journal(tmp_path / "new" / "run").read_population(KEYS)
    assert len(population) == 5 and population.damaged == ()  # 2 imported, then the budget of 3
    assert population.results[:2].tolist() == Journal(tmp_path / "old" / "run").read_population(KEYS).results.tolist()


def test_a_download_onto_a_full_disk_stops_with_one_line(small_disk: Path, tmp_path: Path,
                                                         server: FileServer) -> None:
    """`--weights yolov5n.pt` with the weights cache on a full disk: no traceback, no half file."""
    server.files["/yolov5n.pt"] = bytes(3 * 1024 * 1024)  # more than the 2 MiB disk holds
    result = run_trainer("--weights", "yolov5n.pt", "--epochs", "1", "--device", "cpu", cwd=tmp_path,
                         env={"EVOLVECTL_WEIGHTS_URL": server.url, "EVOLVECTL_WEIGHTS": str(small_disk)})
    _assert_one_line_error(result, str(small_disk / "yolov5n.pt.part"), "ENOSPC")
    assert not (small_disk / "yolov5n.pt").exists()
