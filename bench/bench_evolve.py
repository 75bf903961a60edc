"""A real evolution worker, in this process: memory and overhead over many generations.

Runs `orchestrator.worker.run_worker` with the trainer's own objective
(`trainer.evolve.make_objective`), as `python -m trainer --evolve` does, on a tiny
configuration (yolov5n, 96 px, one epoch, a small synthetic dataset). `prepare_data`
(label checks, the RAM image cache, the loaders) runs once, before the first generation,
and its time is reported apart. Each generation records the wall time of the objective, the
time spent outside it since the previous generation (the worker's own overhead: lock, parent
choice, lease, journal), the main process's RSS, the loader workers' RSS and process ids,
and CUDA allocated/reserved memory on a GPU.

    python bench/bench_evolve.py [--generations 20] [--imgsz 96] [--batch-size 16] [--device ""]
        [--workers 2] [--train-images 64] [--val-images 16] [--cache ram] [--threads N] [--data PATH]

Unchanged loader worker ids show the loaders were not rebuilt; the RSS growth from the third
generation to the last shows whether anything accumulates. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# First, before torch: importing trainer sets OpenMP's wait policy, which only takes effect
# if set before torch loads OpenMP; the bench must run as `python -m trainer` does.
import trainer  # noqa: F401, I001

import click
import torch
import yaml
from bench.bench_train import machine_settings
from orchestrator.search_space import SearchSpace
from orchestrator.worker import GenerationContext, GenerationResult, Objective, run_worker
from trainer import dist
from trainer.cli import build_config, split_training_options
from trainer.config import Hyp
from trainer.data import load_data_config
from trainer.evolve import make_objective
from trainer.paths import resolve_config
from trainer.train import prepare_data

MEGABYTE = 2**20


def resident_megabytes(pid: int | str = "self") -> float:
    """VmRSS from /proc (Linux); 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def child_pids() -> list[int]:
    """Processes started by this one: here, the DataLoader workers."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The name field may hold spaces; the parent id is the second field after it.
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid():
            children.append(int(stat.parent.name))
    return sorted(children)


@dataclass
class GenerationLog:
    """Wraps the objective and records each call and what surrounds it."""

    objective: Objective
    device: torch.device
    records: list[dict[str, Any]] = field(default_factory=list)
    last_end: float | None = None

    def __call__(self, hyp: Hyp, context: GenerationContext) -> GenerationResult:
        start = time.perf_counter()
        overhead = None if self.last_end is None else start - self.last_end
        try:
            return self.objective(hyp, context)
        finally:
            seconds = time.perf_counter() - start
            self.records.append(self._record(context.claim, seconds, overhead))
            self.last_end = time.perf_counter()  # the recording above is the bench's cost, not the worker's

    def _record(self, claim: int, seconds: float, overhead: float | None) -> dict[str, Any]:
        workers = child_pids()
        record = {
            "claim": claim,
            "generation_s": round(seconds, 3),
            "overhead_s": None if overhead is None else round(overhead, 4),
            "rss_mb": round(resident_megabytes(), 1),
            "loader_workers_rss_mb": round(sum(resident_megabytes(pid) for pid in workers), 1),
            "loader_worker_pids": workers,
        }
        if self.device.type == "cuda":
            record["cuda_allocated_mb"] = round(torch.cuda.memory_allocated(self.device) / MEGABYTE, 1)
            record["cuda_reserved_mb"] = round(torch.cuda.memory_reserved(self.device) / MEGABYTE, 1)
        return record


def write_tiny_data(folder: Path, train: int, val: int, size: int) -> Path:
    """The built-in synthetic dataset's config, smaller, generated under `folder` on first load."""
    config = yaml.safe_load(resolve_config("synthetic", "data").read_text())
    config["path"] = str(folder / "data")
    config["synthetic"] = {**config["synthetic"], "train": train, "val": val, "size": size}
    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def summarise(records: list[dict[str, Any]], prepare_seconds: float, workers: int) -> dict[str, Any]:
    overheads = [record["overhead_s"] for record in records if record["overhead_s"] is not None]
    times = [record["generation_s"] for record in records]
    third = records[min(2, len(records) - 1)]
    worker_sets = {tuple(record["loader_worker_pids"]) for record in records[1:]}
    return {
        "prepare_data_s": round(prepare_seconds, 3),
        "generation_s": {"median": round(statistics.median(times), 3), "max": round(max(times), 3)},
        # The first generation also starts the persistent loader workers: a cost paid once.
        "first_generation_extra_s": round(times[0] - statistics.median(times[1:]), 3),
        "overhead_s": {"median": round(statistics.median(overheads), 4) if overheads else None,
                       "max": round(max(overheads), 4) if overheads else None},
        "rss_growth_mb_generation_3_to_last": round(records[-1]["rss_mb"] - third["rss_mb"], 1),
        "loader_workers_rss_growth_mb_generation_3_to_last":
            round(records[-1]["loader_workers_rss_mb"] - third["loader_workers_rss_mb"], 1),
        # From the second generation on both loaders have started; rebuilt loaders would bring new workers.
        "loader_workers_reused": workers > 0 and len(worker_sets) == 1 and bool(next(iter(worker_sets), ())),
    }


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--cfg", default="yolov5n")
    parser.add_argument("--imgsz", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="", help="cpu, 0, … (default: the first GPU if any)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--val-images", type=int, default=16)
    parser.add_argument("--cache", default="ram", choices=["", "ram"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data", default=None, help="a data YAML instead of the generated tiny set")
    args = parser.parse_args()
    if args.generations < 3:
        parser.error(f"--generations {args.generations}: give at least 3 (growth is measured from the third)")
    return args


def main() -> None:
    args = parse_arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = dist.init_distributed(args.device)
    with tempfile.TemporaryDirectory() as folder:
        data = args.data or str(write_tiny_data(Path(folder), args.train_images, args.val_images, args.imgsz))
        started = time.perf_counter()
        load_data_config(data)  # generates the synthetic images, which is not what prepare_data costs
        generation_seconds = time.perf_counter() - started
        options = {**vars(args), "data": data, "epochs": 1, "hyp": "hyp.scratch-low"}
        cfg = build_config(split_training_options(options)[0])
        started = time.perf_counter()
        prepared = prepare_data(cfg, ctx)
        prepare_seconds = time.perf_counter() - started
        log = GenerationLog(make_objective(cfg, ctx, prepared), ctx.device)
        summary = run_worker(Path(folder) / "run", cfg.hyp, SearchSpace.load(), args.generations, log, "bench",
                             cfg.seed, gpu=str(ctx.device), plot_interval=None)
    print(json.dumps({
        "bench": "evolve",
        "cfg": cfg.cfg, "imgsz": cfg.imgsz, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
        "device": str(ctx.device), "workers": cfg.workers, "cache": cfg.cache or "off",
        "train_images": len(prepared.train_set), "val_images": len(prepared.val_set),
        "generations": len(log.records), "ok": summary.ok, "failed": summary.failed,
        "dataset_generation_s": round(generation_seconds, 2),
        **summarise(log.records, prepare_seconds, cfg.workers),
        "series": log.records,
        **machine_settings(ctx.device),
    }))


if __name__ == "__main__":
    try:
        main()
    except click.ClickException as error:  # a user mistake (bad --data, --cfg, --device): a message, not a traceback
        error.show()
        sys.exit(error.exit_code)
