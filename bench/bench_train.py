"""Training throughput in images per second: the real training step, or the data loader alone.

Times `trainer.engine.train_one_epoch`, the loop `python -m trainer` runs, fed by the run's
own loader (`trainer.train.prepare_data`) and driving the run's model, loss, optimiser, AMP
and EMA, built as `trainer.train.run` builds them. The counter starts past the LR warmup, so
the timed steps are the steady state: one optimiser step and EMA update per 64 images.
A step is timed from the request for its batch to the request for the next one (waiting for
data included); `--warmup` steps are run first and not timed. `--data-only` times the
loader alone: if it is much faster than training, compute bounds the run, else data does.

    python bench/bench_train.py [--cfg yolov5n] [--imgsz 320] [--batch-size 16] [--device ""]
        [--workers N] [--data synthetic] [--warmup 5] [--iterations 20] [--threads N] [--data-only]
        [--write-yolov5-data PATH]

Under torch.distributed.run, --batch-size is the total over all processes (as for
`python -m trainer`) and rank 0 prints the result; bench_ddp.py launches it that way.
`--write-yolov5-data` writes a data YAML that YOLOv5's train.py reads, for the same images.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# First, before torch: importing trainer sets OpenMP's wait policy, which only takes effect
# if set before torch loads OpenMP; the bench must run as `python -m trainer` does.
import trainer  # noqa: F401, I001

import click
import torch
import yaml
from trainer import dist
from trainer.cli import build_config, split_training_options
from trainer.config import TrainConfig
from trainer.data import DataConfig
from trainer.dist import DistContext
from trainer.engine import train_one_epoch
from trainer.optim import Warmup
from trainer.parts import StepCounter, amp_dtype_for, build_model, build_training_parts
from trainer.progress import EpochProgress
from trainer.train import PreparedData, capture_graphs, prepare_data, seed_everything


class TimedBatches:
    """`count` batches from the training loader, epoch after epoch, noting when each is asked for.

    The gap between two requests is one whole step: waiting for the batch, then training on
    it. One more time is noted when the consumer asks for a batch after the last, so the last
    step is timed too. Like `run()`, it draws every batch from one iterator, from epoch 0 on,
    so epoch boundaries cost what they cost in a run.
    """

    def __init__(self, prepared: PreparedData, count: int) -> None:
        self.prepared = prepared
        self.count = count
        self.request_times: list[float] = []
        self.batch_images: list[int] = []

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        self.prepared.train_batches.start_at(0)
        batches = iter(self.prepared.train_loader)  # endless, one epoch after another
        for _ in range(self.count):
            self.request_times.append(time.perf_counter())
            batch = next(batches)
            self.batch_images.append(int(batch[0].shape[0]))
            yield batch
        self.request_times.append(time.perf_counter())

    def timed(self, warmup: int) -> tuple[list[float], int]:
        """Durations of the steps after the first `warmup`, and the images they took (this process)."""
        times = self.request_times[warmup:]
        return [end - start for start, end in itertools.pairwise(times)], sum(self.batch_images[warmup:])


def train_steps(cfg: TrainConfig, ctx: DistContext, prepared: PreparedData, count: int) -> TimedBatches:
    """Run `count` steady-state training steps through `train_one_epoch`, timing each."""
    seed_everything(cfg.seed, cfg.deterministic)
    model = build_model(cfg, prepared.data.nc, ctx.device)
    parts = build_training_parts(cfg, ctx, model, len(prepared.train_loader))
    # Past the warmup every step accumulates to the nominal batch, as in most of a real run.
    parts.counter = StepCounter(iteration=parts.warmup.iterations, last_step=parts.warmup.iterations - 1)
    capture_graphs(parts, cfg.batch_size // ctx.world_size, cfg.imgsz, ctx.device, steps=count)
    if ctx.device.type == "cuda":  # after the model is on the GPU: before any allocation, torch refuses
        torch.cuda.reset_peak_memory_stats(ctx.device)
    batches = TimedBatches(prepared, count)
    progress = EpochProgress(False, 0, cfg.epochs, count, ctx.device)
    train_one_epoch(parts, batches, 0, ctx, progress)
    return batches


def load_steps(prepared: PreparedData, count: int) -> TimedBatches:
    """Draw `count` batches and do nothing with them: the loader's own throughput."""
    batches = TimedBatches(prepared, count)
    for _ in batches:
        pass
    return batches


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_settings(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on besides the code; the load average shows a shared machine."""
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg": [round(load, 2) for load in os.getloadavg()],
    }


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda max_memory_allocated"}
    # ru_maxrss is in kilobytes on Linux; DataLoader worker processes are not included.
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_memory_kind": "max RSS of the main process"}


def write_yolov5_data(data: DataConfig, path: Path) -> None:
    """The same images as a YOLOv5 data YAML, with absolute folders so it reads the same from
    any working directory (YOLOv5 runs from its own checkout)."""
    config = {"path": str(data.root), "train": [str(source) for source in data.train],
              "val": [str(source) for source in data.val], "names": list(data.names)}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def yolov5_comparison(cfg: TrainConfig, train_images: int, data_yaml: str) -> dict[str, Any]:
    """How to measure YOLOv5 v7.0's train.py with these settings, and which of its epochs to read.

    Its warmup follows the same rule as ours (`Warmup.for_run`), so the epochs after it are the
    steady state this bench times; two of them are run and read.
    """
    batches = math.ceil(train_images / cfg.batch_size)
    warmup = Warmup.for_run(cfg.hyp.warmup_epochs, batches, cfg.batch_size, 0.0, 0.0, 0.0)
    first = math.ceil(warmup.iterations / batches)
    device = f" --device {cfg.device}" if cfg.device else ""
    command = (f"python train.py --img {cfg.imgsz} --batch {cfg.batch_size} --cfg {Path(cfg.cfg).stem}.yaml "
               f"--weights '' --data {data_yaml} --workers {cfg.workers} --epochs {first + 2}{device}")
    return {"command": command, "read_epochs": [first, first + 1],
            "images_per_s": f"{cfg.batch_size} x the it/s of those epochs' training bars"}


def summary(args: argparse.Namespace, cfg: TrainConfig, ctx: DistContext, prepared: PreparedData,
            batches: TimedBatches, prepare_seconds: float) -> dict[str, Any]:
    durations, images = batches.timed(args.warmup)
    seconds = sum(durations)
    amp_dtype = amp_dtype_for(ctx.device)
    result = {
        "bench": "train",
        "mode": "data-only" if args.data_only else "train",
        "cfg": cfg.cfg,
        "imgsz": cfg.imgsz,
        "batch_size": cfg.batch_size,
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "workers": cfg.workers,
        "data": cfg.data,
        "train_images": len(prepared.train_set),
        "warmup_iterations": args.warmup,
        "iterations": len(durations),
        # Every process takes the same share of the batch, so the total is this process's × world size.
        "images_per_s": round(images * ctx.world_size / seconds, 2),
        "s_per_iteration": {"mean": round(seconds / len(durations), 4),
                            "median": round(statistics.median(durations), 4), "max": round(max(durations), 4)},
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
        "deterministic": cfg.deterministic,
        "prepare_data_s": round(prepare_seconds, 2),
        **peak_memory(ctx.device),
        **machine_settings(ctx.device),
    }
    if not ctx.distributed:
        data_yaml = str(args.write_yolov5_data or "<data yaml from --write-yolov5-data>")
        result["yolov5"] = yolov5_comparison(cfg, len(prepared.train_set), data_yaml)
    return result


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="yolov5n", help="model YAML path or bundled name")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16, help="total over all processes")
    parser.add_argument("--device", default="", help="cpu, 0, … (default: the first GPU if any)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers per process")
    parser.add_argument("--data", default="synthetic", help="data YAML path or bundled name")
    parser.add_argument("--hyp", default="hyp.scratch-low")
    parser.add_argument("--cache", default="", choices=["", "ram", "disk"])
    parser.add_argument("--warmup", type=int, default=5, help="steps run before timing")
    parser.add_argument("--iterations", type=int, default=20, help="timed steps")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data-only", action="store_true", help="time the data loader alone")
    parser.add_argument("--write-yolov5-data", type=Path, default=None, help="write a YOLOv5 data YAML here")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        parser.error(f"--iterations {args.iterations} must be >= 1 and --warmup {args.warmup} >= 0")
    return args


def main() -> None:
    args = parse_arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = dist.init_distributed(args.device)
    try:
        cfg = build_config(split_training_options(vars(args))[0])
        started = time.perf_counter()
        prepared = prepare_data(cfg, ctx)
        prepare_seconds = time.perf_counter() - started
        count = args.warmup + args.iterations
        batches = load_steps(prepared, count) if args.data_only else train_steps(cfg, ctx, prepared, count)
        if args.write_yolov5_data and ctx.is_main:
            write_yolov5_data(prepared.data, args.write_yolov5_data)
        if ctx.is_main:
            print(json.dumps(summary(args, cfg, ctx, prepared, batches, prepare_seconds)), flush=True)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    try:
        main()
    except click.ClickException as error:  # a user mistake (bad --data, --cfg, --device): a message, not a traceback
        error.show()
        sys.exit(error.exit_code)
