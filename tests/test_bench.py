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
from bench.compare_augmentation import main as compare_augmentation
from bench.compare_augmentation import sample_indices
from bench.compare_yolov5 import (
    EXIT_MARK,
    TIMELINE_FILE,
    compare,
    parse_seeds,
    resolve_data,
    run_phases,
    summarise_run,
)
from orchestrator.runs.status import read_results
from trainer.checkpoint import save_checkpoint
from trainer.data import load_data_config
from trainer.data.augment import MIN_SIDE
from trainer.data.labels import load_samples
from trainer.errors import UserError
from trainer.model import DetectionModel


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
                       "--workers", "1", "--warmup", "1", "--iterations", "3", "--device", "cpu", "--threads", "1",
                       "--data-only", cwd=tmp_path)
    assert (result["mode"], result["iterations"], result["workers"]) == ("data-only", 3, 1)
    assert result["images_per_s"] == pytest.approx(8 / result["s_per_iteration"]["mean"], rel=0.02)


@pytest.mark.slow
def test_bench_evolve_reuses_the_loaders_across_generations(tmp_path: Path) -> None:
    result = run_bench("bench_evolve.py", "--generations", "3", "--imgsz", "64", "--batch-size", "8",
                       "--train-images", "16", "--val-images", "8", "--workers", "1", "--device", "cpu",
                       "--threads", "1", cwd=tmp_path)
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


def write_results(path: Path, rows: list[tuple[float, float]], padded: bool) -> None:
    """A results.csv with (mAP@0.5, mAP@0.5:0.95) per epoch; YOLOv5 right-aligns its column names."""
    columns = ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
               "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss", "val/cls_loss"]
    lines = [",".join(f"{name:>20}" if padded else name for name in columns)]
    lines += [f"{epoch},0.1,0.05,0.04,0.6,0.7,{map50},{map_},0.09,0.03,0.02"
              for epoch, (map50, map_) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_a_run_is_summarised_by_its_last_epoch_and_its_best_fitness(tmp_path: Path) -> None:
    write_results(tmp_path / "results.csv", [(0.1, 0.05), (0.5, 0.3), (0.4, 0.2)], padded=True)
    rows = read_results(tmp_path)
    assert len(rows) == 3 and rows[0]["metrics/mAP_0.5"] == 0.1
    summary = summarise_run(rows)
    assert (summary["map50"], summary["map"], summary["box_loss"], summary["val_box_loss"]) == (0.4, 0.2, 0.1, 0.09)
    assert summary["best_fitness"] == pytest.approx(0.1 * 0.5 + 0.9 * 0.3)  # epoch 1, not the last


def test_comparison_gives_means_spreads_and_the_difference_with_its_standard_error() -> None:
    def run(trainer: str, map50: float) -> dict[str, Any]:
        return {"trainer": trainer, "map50": map50, "map": map50 / 2, "best_fitness": map50 / 2, "val_box_loss": 0.05}

    runs = [run("ours", 0.2), run("ours", 0.4), run("yolov5", 0.1), run("yolov5", 0.2), run("yolov5", 0.3)]
    summary = compare(runs)
    assert summary["ours"]["map50"] == {"mean": 0.3, "std": pytest.approx(0.14142, abs=1e-5), "n": 2}
    assert summary["yolov5"]["map50"] == {"mean": 0.2, "std": 0.1, "n": 3}
    # standard error of the difference: sqrt(0.02 / 2 + 0.01 / 3)
    assert summary["difference"]["map50"] == {"mean": pytest.approx(0.1),
                                              "standard_error": pytest.approx(0.11547, abs=1e-5)}
    assert summary["difference"]["map"]["mean"] == pytest.approx(0.05)
    assert summary["difference"]["val_box_loss"] == {"mean": 0.0, "standard_error": 0.0}


@pytest.mark.parametrize(("trainer", "first_epoch", "val_line"), [
    ("ours", 1, "                 all P 0.120  R 0.300  mAP50 0.100  mAP50-95 0.050"),
    ("yolov5", 0, "                   all         64        365      0.120      0.300      0.100      0.050"),
])
def test_run_phases_time_startup_training_and_validation_from_the_output(
    tmp_path: Path, trainer: str, first_epoch: int, val_line: str
) -> None:
    last = first_epoch + 2  # 3 epochs
    lines = [(1.0, "Starting training for 3 epochs...")]
    for epoch, (train_end, val_end) in enumerate([(7.0, 8.0), (10.0, 11.0), (13.5, 14.0)], start=first_epoch):
        lines += [(train_end - 1.5, f"   {epoch}/{last}    0G    0.17   0.002   0.049   99   64: 1/4"),
                  (train_end, f"   {epoch}/{last}    0G    0.17   0.002   0.049   99   64: 4/4"), (val_end, val_line)]
    lines += [(17.0, val_line), (18.0, EXIT_MARK)]  # the final validation prints the line again
    (tmp_path / TIMELINE_FILE).write_text("".join(f"{stamp}\t{text}\n" for stamp, text in lines))
    phases = run_phases(tmp_path, trainer, 3)
    # Start-up: until the first progress line (5.5 s). Training: 1.5, 2 and 2.5 s, a median of 2.
    assert phases == {"startup_s": 5.5, "train_epoch_s": 2.0, "val_epoch_s": 1.0, "end_s": 4.0, "whole_s": 18.0}
    assert run_phases(tmp_path, trainer, 4) is None  # not the epochs it ran: nothing to read
    assert run_phases(tmp_path / "missing", trainer, 3) is None


def test_seeds_are_a_list_of_at_least_two_integers() -> None:
    assert parse_seeds("2,0,1,1") == [0, 1, 2]
    for bad in ("0", "a,b", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
            parse_seeds(bad)


def test_compare_yolov5_generates_a_named_comparison_set_under_its_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "textures").mkdir()  # a folder of that name is not a data YAML: the name still counts
    data_yaml = resolve_data("textures", tmp_path / "project", train=3, val=2, size=64)
    assert data_yaml == str(tmp_path / "project" / "datasets" / "textures-3-2-64" / "data.yaml")
    assert yaml.safe_load(Path(data_yaml).read_text())["names"] == ["disc", "cross", "triangle", "crescent"]
    # Other sizes, another folder: the first set's images (which its finished runs trained on) stay.
    other = Path(resolve_data("textures", tmp_path / "project", train=4, val=2, size=64))
    assert other.parent.name == "textures-4-2-64" and len(list(Path(data_yaml).parent.glob("images/train/*"))) == 3
    assert resolve_data("synthetic", tmp_path) == "synthetic" and resolve_data("my.yaml", tmp_path) == "my.yaml"


@pytest.mark.slow
def test_compare_yolov5_trains_both_sides_per_seed_and_reuses_finished_runs(tiny_data: Path, tmp_path: Path) -> None:
    """Our own trainer stands in for YOLOv5's train.py: it takes the same command line."""
    project = tmp_path / "compare"
    args = ("--yolov5", f"{sys.executable} -m trainer", "--seeds", "0,1", "--epochs", "1", "--data", str(tiny_data),
            "--imgsz", "64", "--batch-size", "8", "--device", "cpu", "--workers", "0", "--project", str(project))
    result = run_bench("compare_yolov5.py", *args, cwd=tmp_path, timeout=600)
    runs = result["runs"]
    assert [(run["trainer"], run["seed"]) for run in runs] == [("ours", 0), ("yolov5", 0), ("ours", 1), ("yolov5", 1)]
    assert all(run["run_s"] > 0 and (project / Path(run["dir"]).name / "train.log").is_file() for run in runs)
    # The stand-in read the YOLOv5 data YAML: the same images, so seed for seed the same training.
    by_seed = {(run["trainer"], run["seed"]): run for run in runs}
    for seed in (0, 1):
        assert by_seed["ours", seed]["box_loss"] == by_seed["yolov5", seed]["box_loss"]
    assert by_seed["ours", 0]["box_loss"] != by_seed["ours", 1]["box_loss"]
    assert result["ours"]["map50"]["n"] == 2 and result["difference"]["map50"]["mean"] == 0.0
    # One epoch: start-up, its training, its validation and the end add up to the whole run.
    phases = by_seed["ours", 0]["phases"]
    assert 0 < phases["startup_s"] < phases["whole_s"] and min(phases.values()) >= 0
    parts = phases["startup_s"] + phases["train_epoch_s"] + phases["val_epoch_s"] + phases["end_s"]
    assert parts == pytest.approx(phases["whole_s"], abs=0.1)
    # Repeated: finished runs are read back, not trained again; an unfinished one is trained anew.
    unfinished = project / "ours-seed1" / "results.csv"
    unfinished.write_text(unfinished.read_text().splitlines()[0] + "\n")
    again = run_bench("compare_yolov5.py", *args, cwd=tmp_path, timeout=600)
    assert [run["run_s"] is None for run in again["runs"]] == [True, True, False, True]
    assert [run["box_loss"] for run in again["runs"]] == [run["box_loss"] for run in runs]
    # Other flags: no finished run is this run, so every one trains again.
    other = run_bench("compare_yolov5.py", *args[:-4], "--workers", "1", *args[-2:], cwd=tmp_path, timeout=600)
    assert all(run["run_s"] is not None for run in other["runs"])


def test_compare_augmentation_counts_what_the_pipeline_leaves_and_scores_it(tiny_data: Path, tmp_path: Path) -> None:
    save_checkpoint({"model": DetectionModel("yolov5n", nc=6).state_dict(), "config": {"cfg": "yolov5n"}},
                    tmp_path / "last.pt")
    args = ["--data", str(tiny_data), "--imgsz", "64", "--samples", "48", "--seed", "3", "--pipelines", "ours",
            "--weights", str(tmp_path / "last.pt")]
    # Without augmentation a sample is its image letterboxed: its labels stay but for slivers of
    # 2 pixels or less at 64 px (dropped as after any transform), and nothing else comes in.
    plain = compare_augmentation([*args, "--hyp", "hyp.no-augmentation"])["ours"]
    data = load_data_config(str(tiny_data))
    samples = load_samples(data.train, data.nc, "train")
    drawn = [int(((sample.labels[:, 3:5] * 64 / max(sample.width, sample.height)
                   * [sample.width, sample.height]) > MIN_SIDE).all(axis=1).sum())
             for sample in (samples[index] for index in sample_indices(48, len(samples), 3))]
    assert plain["samples"] == 48 and plain["boxes_per_image"] == pytest.approx(sum(drawn) / 48, abs=1e-4)
    augmented = compare_augmentation(args)["ours"]  # hyp.scratch-low: mosaics of four images
    # parts of four images, boxes cut at the edges dropped
    assert augmented["boxes_per_image"] > plain["boxes_per_image"]
    assert augmented["pixel_std"] != plain["pixel_std"]
    for result in (plain, augmented):
        [loss] = result["loss"].values()
        assert len(loss) == 3 and all(value > 0 for value in loss)


def test_compare_augmentation_without_yolov5_says_what_to_do(tiny_data: Path) -> None:
    try:  # the project's own environment does not install the yolov5 package
        import yolov5  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the yolov5 package is installed here")
    with pytest.raises(UserError, match="run this script with the Python that has it, or pass --pipelines ours"):
        compare_augmentation(["--data", str(tiny_data), "--imgsz", "64", "--samples", "16", "--pipelines", "yolov5"])
    with pytest.raises(UserError, match="--pipelines 'theirs'"):
        compare_augmentation(["--data", str(tiny_data), "--samples", "16", "--pipelines", "theirs"])
