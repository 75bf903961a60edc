"""DDP scaling efficiency: throughput with N processes / (N × throughput with one process).

For each N, launches bench_train.py under torch.distributed.run with N processes and the same
batch per process (so the total batch grows with N, as when GPUs are added to a run): NCCL on
GPUs 0..N-1 with `--device cuda`, gloo on the CPU with `--device cpu`. One process is always
measured, as the baseline. On the CPU each process gets `--threads` threads (default 1), the
counterpart of one GPU per process; the numbers then show that the DDP path works and what
gloo costs, not how GPUs scale.

    python bench/bench_ddp.py [--nprocs 1,2] [--device cuda|cpu] [--batch-size 16] [--imgsz 320]
        [--cfg yolov5n] [--workers 4] [--data synthetic] [--warmup 5] [--iterations 20]
        [--threads 1]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

BENCH_TRAIN = Path(__file__).resolve().with_name("bench_train.py")


def process_counts(text: str) -> list[int]:
    """`1,2,4` → [1, 2, 4], always with 1 (the baseline) first."""
    try:
        counts = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nprocs {text!r} must be a comma-separated list like 1,2,4") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--nprocs {text!r}: every count must be at least 1")
    return sorted(counts | {1})


def launch(nprocs: int, args: argparse.Namespace) -> dict[str, Any]:
    """bench_train.py under torch.distributed.run with `nprocs` processes; rank 0's JSON result."""
    # On the CPU the same threads per process for every N; torchrun alone would give one
    # process all cores but several processes one thread each.
    device = ",".join(str(index) for index in range(nprocs)) if args.device == "cuda" else "cpu"
    threads = args.threads if args.device == "cpu" else 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
               str(BENCH_TRAIN), "--device", device, "--threads", str(threads),
               "--batch-size", str(args.batch_size * nprocs), "--imgsz", str(args.imgsz), "--cfg", args.cfg,
               "--workers", str(args.workers), "--data", args.data, "--warmup", str(args.warmup),
               "--iterations", str(args.iterations)]
    finished = subprocess.run(command, check=False, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    if finished.returncode != 0 or not lines:
        sys.exit(f"{nprocs} process(es) failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    return json.loads(lines[-1])


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=process_counts, default=[1, 2], help="process counts, e.g. 1,2,4")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="images per process and step")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--cfg", default="yolov5n")
    parser.add_argument("--workers", type=int, default=4, help="loader workers per process")
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads per process")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for each launch")
    args = parser.parse_args()
    if args.device == "cuda" and max(args.nprocs) > torch.cuda.device_count():
        parser.error(f"--nprocs {max(args.nprocs)} needs that many GPUs; {torch.cuda.device_count()} visible")
    return args


def main() -> None:
    args = parse_arguments()
    runs = [launch(nprocs, args) for nprocs in args.nprocs]
    baseline = runs[0]["images_per_s"]
    keep = ("world_size", "images_per_s", "s_per_iteration", "batch_size", "threads", "peak_memory_mb", "loadavg")
    print(json.dumps({
        "bench": "ddp",
        "device": args.device,
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "device_name": runs[0]["device_name"],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cfg": args.cfg,
        "imgsz": args.imgsz,
        "per_process_batch": args.batch_size,
        "workers_per_process": args.workers,
        "iterations": args.iterations,
        "runs": [{key: run[key] for key in keep} for run in runs],
        "scaling_efficiency": {str(run["world_size"]): round(run["images_per_s"] / (run["world_size"] * baseline), 3)
                               for run in runs},
        "loadavg": [round(load, 2) for load in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
