"""The benchmarks in bench/: their timing and bookkeeping helpers, and each script run end to end
at a tiny size, printing one JSON line with the expected keys and self-consistent numbers."""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench.bench_ddp import process_counts
from bench.bench_evolve import child_pids, resident_megabytes, summarise
from bench.bench_train import TimedBatches


class EndlessLoader:
    """Like the training loader: every iterator goes on epoch after epoch from the start epoch."""

    def __init__(self, batch_sizes: list[int]) -> None:
        self.batch_sizes = batch_sizes
        self.start_epoch = -1
        self.iterators = 0

    def start_at(self, epoch: int) -> None:
        self.start_epoch = epoch

    def __iter__(self) -> Any:
        self.iterators += 1
        return ((torch.zeros(size, 3, 8, 8), torch.zeros(0, 6), (), ()) for size in itertools.cycle(self.batch_sizes))


def test_timed_batches_draw_from_one_endless_iterator_and_time_every_step_after_the_warmup() -> None:
    loader = EndlessLoader([4, 4, 2])
    batches = TimedBatches(SimpleNamespace(train_loader=loader, train_batches=loader), count=7)
    seen = [int(images.shape[0]) for images, *_ in batches]
    assert seen == [4, 4, 2, 4, 4, 2, 4]
    assert (loader.start_epoch, loader.iterators) == (0, 1)
    assert len(batches.request_times) == 8  # one per batch, and one when the consumer asks past the last
    durations, images = batches.timed(warmup=3)
    assert len(durations) == 4 and all(duration >= 0 for duration in durations)
    assert images == 4 + 4 + 2 + 4
    assert sum(durations) == pytest.approx(batches.request_times[-1] - batches.request_times[3])


def test_process_counts_always_include_the_single_process_baseline() -> None:
    assert process_counts("2,4") == [1, 2, 4]
    assert process_counts("1, 2,2") == [1, 2]
    for bad in ("0,2", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--nprocs"):
            process_counts(bad)


def test_child_pids_and_their_resident_memory_are_read_from_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in child_pids()
        assert resident_megabytes(child.pid) > 0
    finally:
        child.kill()
        child.wait()
    assert child.pid not in child_pids()
    assert resident_megabytes(child.pid) == 0.0
    assert resident_megabytes() > 10


def record(seconds: float, overhead: float | None, rss: float, pids: list[int]) -> dict[str, Any]:
    return {"generation_s": seconds, "overhead_s": overhead, "rss_mb": rss,
            "loader_workers_rss_mb": 10 * rss, "loader_worker_pids": pids}


def test_summary_measures_growth_from_the_third_generation_and_sees_rebuilt_loaders() -> None:
    records = [record(3.0, None, 100, [7]), record(1.0, 0.02, 120, [7, 8]), record(1.2, 0.01, 130, [7, 8]),
               record(1.1, 0.05, 131, [7, 8])]
    summary = summarise(records, prepare_seconds=2.5, workers=1)
    assert summary["rss_growth_mb_generation_3_to_last"] == 1.0
    assert summary["loader_workers_rss_growth_mb_generation_3_to_last"] == 10.0
    assert summary["overhead_s"] == {"median": 0.02, "max": 0.05}
    assert summary["first_generation_extra_s"] == pytest.approx(1.9)
    assert summary["loader_workers_reused"] is True
    records[3]["loader_worker_pids"] = [9, 10]  # new workers: a loader was built again
    assert summarise(records, 2.5, workers=1)["loader_workers_reused"] is False
    assert summarise(records, 2.5, workers=0)["loader_workers_reused"] is False


def run_bench(script: str, *args: str, cwd: Path, timeout: float = 300) -> dict[str, Any]:
    finished = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], check=False,
                              cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, finished.stderr[-3000:]
    lines = finished.stdout.strip().splitlines()
    assert len(lines) == 1, finished.stdout
    return json.loads(lines[0])


MACHINE_KEYS = {"device_name", "torch", "cpu_count", "threads", "loadavg"}


@pytest.mark.slow
def test_bench_train_times_training_and_writes_a_yolov5_data_yaml(tiny_data: Path, tmp_path: Path) -> None:
    yolov5_data = tmp_path / "yolov5.yaml"
    result = run_bench("bench_train.py", "--data", str(tiny_data), "--imgsz", "64", "--batch-size", "4",
                       "--workers", "0", "--warmup", "1", "--iterations", "2", "--device", "cpu", "--threads", "1",
                       "--write-yolov5-data", str(yolov5_data), cwd=tmp_path)
    assert {"images_per_s", "s_per_iteration", "peak_memory_mb", "prepare_data_s", *MACHINE_KEYS} <= set(result)
    assert (result["mode"], result["iterations"], result["batch_size"], result["device"]) == ("train", 2, 4, "cpu")
    assert result["images_per_s"] == pytest.approx(4 / result["s_per_iteration"]["mean"], rel=0.02)
    assert result["peak_memory_mb"] > 100
    command = result["yolov5"]["command"]
    assert "--img 64 --batch 4 --cfg yolov5n.yaml --weights ''" in command and f"--data {yolov5_data}" in command
    # 32 images in batches of 4: 8 per epoch, so the 100-iteration warmup ends in epoch 13.
    assert result["yolov5"]["read_epochs"] == [13, 14] and "--epochs 15" in command
    written = yaml.safe_load(yolov5_data.read_text())
    assert len(written["names"]) == 6
    assert all(Path(folder).is_absolute() and Path(folder).is_dir() for folder in written["train"] + written["val"])


@pytest.mark.slow
def test_bench_train_data_only_times_the_loader(tiny_data: Path, tmp_path: Path) -> None:
    result = run_bench("bench_train.py", "--data", str(tiny_data), "--imgsz", "64", "--batch-size", "8",
                       "--workers", "1", "--warmup", "1", "--iterations", "3", "--device", "cpu", "--threads", "1", "--data-only",
                       cwd=tmp_path)
    assert (result["mode"], result["iterations"], result["workers"]) == ("data-only", 3, 1)
    assert result["images_per_s"] == pytest.approx(8 / result["s_per_iteration"]["mean"], rel=0.02)


@pytest.mark.slow
def test_bench_evolve_reuses_the_loaders_across_generations(tmp_path: Path) -> None:
    result = run_bench("bench_evolve.py", "--generations", "3", "--imgsz", "64", "--batch-size", "8",
                       "--train-images", "16", "--val-images", "8", "--workers", "1", "--device", "cpu", "--threads", "1",
                       cwd=tmp_path)
    assert (result["generations"], result["ok"], result["failed"]) == (3, 3, 0)
    series = result["series"]
    assert [entry["claim"] for entry in series] == [0, 1, 2]
    assert series[0]["overhead_s"] is None and all(entry["overhead_s"] >= 0 for entry in series[1:])
    assert len(series[-1]["loader_worker_pids"]) == 2  # one worker each for the train and val loaders
    assert result["loader_workers_reused"] is True
    assert all(entry["rss_mb"] > 100 for entry in series)
    assert {"prepare_data_s", "rss_growth_mb_generation_3_to_last", "overhead_s", *MACHINE_KEYS} <= set(result)


@pytest.mark.slow
def test_bench_ddp_reports_scaling_against_one_process(tiny_data: Path, tmp_path: Path) -> None:
    result = run_bench("bench_ddp.py", "--nprocs", "2", "--device", "cpu", "--batch-size", "2", "--imgsz", "64",
                       "--workers", "0", "--warmup", "1", "--iterations", "2", "--data", str(tiny_data),
                       cwd=tmp_path)
    assert [run["world_size"] for run in result["runs"]] == [1, 2]
    assert [run["batch_size"] for run in result["runs"]] == [2, 4]  # the same batch per process
    single, double = (run["images_per_s"] for run in result["runs"])
    assert result["scaling_efficiency"] == {"1": 1.0, "2": round(double / (2 * single), 3)}
    assert result["backend"] == "gloo"
