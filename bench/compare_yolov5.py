"""mAP after the same training: our trainer against YOLOv5's train.py, over several seeds.

    python bench/compare_yolov5.py --yolov5 "python /path/to/yolov5/train.py" [--seeds 0,1,2]
        [--epochs 12] [--data synthetic-4k.yaml | mixed | textures | shapes] [--cfg yolov5n] [--imgsz 320]
        [--batch-size 16] [--device ""] [--workers 8] [--project runs/compare]
        [--train-images 256] [--val-images 64] [--data-size 320]

For each seed, `python -m trainer` and the `--yolov5` command train one after the other with
the same command line (YOLOv5's flags, which our trainer accepts too) on the same images:
`--data` is given to ours and rewritten as a YOLOv5 data YAML for the other. Each run's
`results.csv` (the same columns in both) gives its last epoch's mAP. After a few epochs the
seed alone moves mAP by several points, so one run each says little: the summary has each
trainer's mean and standard deviation over the seeds, and the difference of the means
(ours − YOLOv5) with its standard error.

`--data mixed`, `textures` or `shapes` compares on a dataset nobody tuned for (bench/compare_data.py):
it is generated on first use (seed 0; by default 256 training and 64 validation images of 320 px,
`--train-images`, `--val-images` and `--data-size` to change them) into `<project>/datasets/<name>`,
or `<name>-<train>-<val>-<size>` for other sizes, and the same folder is read by every run after.

Runs go to `<project>/ours-seed<N>` and `<project>/yolov5-seed<N>`. A run whose results.csv
already holds every epoch, trained by the same command line (`command.txt` beside it), is read,
not trained again, so the same command, repeated, completes an interrupted comparison; an
unfinished run, or one trained with other flags or data, is started over. Each run's output
goes to `train.log` beside it. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import click
import torch

from bench.bench_train import machine_settings, write_yolov5_data
from bench.compare_data import DEFAULT_SIZES, RECIPES, make_dataset
from orchestrator.runs.status import read_results
from trainer.data import load_data_config
from trainer.results import RESULT_COLUMNS, ValidationResult, fitness

TRAINERS = ("ours", "yolov5")
COMMAND_FILE = "command.txt"
TIMELINE_FILE = "timeline.tsv"
EXIT_MARK = "<exit>"
METRICS = {name: ValidationResult.column(name) for name in ("map50", "map")}
LOSSES = {**{name: f"train/{name}" for name in ("box_loss", "obj_loss", "cls_loss")},
          **{f"val_{name}": ValidationResult.column(name) for name in ("box_loss", "obj_loss", "cls_loss")}}
# Summarised over the seeds. The validation box loss is comparable between the two trainers (the same
# loss on the same images); their training losses are not (each trains on its own augmentations).
COMPARED = (*METRICS, "best_fitness", "val_box_loss")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give integers separated by commas, e.g. 0,1,2") from None
    if len(seeds) < 2:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give at least two seeds, to see the spread they cause")
    return seeds


def resolve_data(data: str, project: Path, **sizes: int) -> str:
    """The data YAML our trainer reads. A comparison set's name (`mixed`, `textures`, `shapes`) becomes the
    YAML of that set under `project`, generated there first if it is not yet; `sizes` are
    make_dataset's train, val and size. Other sizes than the defaults get a folder of their own, so
    that a finished run (which names its data YAML) is never read back against other images.
    Anything else (a path, `synthetic`) is passed on as it is."""
    if data in RECIPES and not Path(data).is_file():
        sizes = {**DEFAULT_SIZES, **sizes}
        folder = data if sizes == DEFAULT_SIZES else "-".join(map(str, (data, *sizes.values())))
        return str(make_dataset(data, project / "datasets" / folder, **sizes))
    return data


def training_flags(args: argparse.Namespace, data_yaml: Path, seed: int, run_dir: Path) -> list[str]:
    """YOLOv5 train.py's flags for this run; `python -m trainer` takes the same. A model name
    becomes `<name>.yaml`, which both find among their bundled models."""
    cfg = args.cfg if args.cfg.endswith(".yaml") else f"{args.cfg}.yaml"
    flags = ["--imgsz", str(args.imgsz), "--batch-size", str(args.batch_size), "--cfg", cfg,
             "--weights", "", "--data", str(data_yaml), "--workers", str(args.workers), "--epochs", str(args.epochs),
             "--seed", str(seed), "--project", str(run_dir.parent), "--name", run_dir.name, "--exist-ok"]
    return flags + (["--device", args.device] if args.device else [])


def summarise_run(rows: list[dict[str, float]]) -> dict[str, Any]:
    """The last epoch's mAP and losses, and the best fitness over the epochs. `rows` come from
    `read_results`, by column name, which copes with YOLOv5's space-padded names."""
    best = max(fitness([row[column] for column in RESULT_COLUMNS])[0] for row in rows)
    return {**{name: round(rows[-1][column], 5) for name, column in {**METRICS, **LOSSES}.items()},
            "best_fitness": round(best, 5)}


def train(command: list[str], run_dir: Path) -> float:
    """Train into a fresh run_dir; the seconds it took. The output goes to `train.log` as it is,
    and to `timeline.tsv` as (seconds since the start, line) for every line or progress-bar
    update, unbuffered, so that `run_phases` can time start-up, training and validation."""
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run: its results.csv would be appended to
    run_dir.mkdir(parents=True)
    (run_dir / COMMAND_FILE).write_text(shlex.join(command))
    log = run_dir / "train.log"
    print(f"training {run_dir.name}: {shlex.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as output, (run_dir / TIMELINE_FILE).open("w") as timeline:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        pending = b""
        while chunk := os.read(process.stdout.fileno(), 65536):
            output.write(chunk)
            stamp = time.perf_counter() - started
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            timeline.writelines(f"{stamp:.3f}\t{line.decode(errors='replace')}\n" for line in lines if line.strip())
        returncode = process.wait()
        timeline.write(f"{time.perf_counter() - started:.3f}\t{EXIT_MARK}\n")
    if returncode:
        raise click.ClickException(f"{run_dir.name} failed with exit code {returncode}; see {log}")
    return time.perf_counter() - started


# A training progress line of either trainer: "  12/60   0G   0.05 ...", the epoch first (YOLOv5
# counts from 0 to epochs - 1, we count from 1 to epochs). The line that ends an epoch's validation: ours prints
# "all P 0.5 R ...", YOLOv5 "all  64  365  0.5 ...".
TRAIN_LINE = re.compile(r"^\s*(\d+)/(\d+)\s+\S*G\s")
VAL_END = {"ours": re.compile(r"^\s*all P "), "yolov5": re.compile(r"^\s*all\s+\d+\s+\d+\s")}


def run_phases(run_dir: Path, trainer: str, epochs: int) -> dict[str, float] | None:
    """Seconds of start-up, training per epoch, validation per epoch and the end (final
    validation, plots, saving) of one run, from its timeline; None without one.

    Start-up ends at the first progress line of training. Epoch e's training ends at its last
    progress line and its validation at the next validation line; its training began where the
    previous validation ended (epoch 1's where start-up ended)."""
    path = run_dir / TIMELINE_FILE
    if not path.is_file():
        return None
    last_epoch = epochs if trainer == "ours" else epochs - 1  # YOLOv5 prints epoch 0/59 .. 59/59
    train_end: list[float] = []
    val_end: list[float] = []
    current, ended, started = None, 0.0, None
    for line in path.read_text().splitlines():
        stamp, _, text = line.partition("\t")
        if text == EXIT_MARK:
            ended = float(stamp)
        elif (match := TRAIN_LINE.match(text)) and int(match[2]) == last_epoch:
            started = float(stamp) if started is None else started
            if current is not None and current != match[1] and len(val_end) < len(train_end):
                return None  # an epoch without its validation line: not a timeline this reads
            current = match[1]
            if len(train_end) == len(val_end):
                train_end.append(float(stamp))
            else:
                train_end[-1] = float(stamp)
        elif VAL_END[trainer].match(text) and len(val_end) < len(train_end):
            val_end.append(float(stamp))
    if len(val_end) != epochs or not ended or started is None:
        return None
    starts = [started, *val_end[:-1]]
    training = [end - start for start, end in zip(starts, train_end)]
    validation = [end - start for start, end in zip(train_end, val_end)]
    return {"startup_s": round(started, 2), "train_epoch_s": round(statistics.median(training), 3),
            "val_epoch_s": round(statistics.median(validation), 3), "end_s": round(ended - val_end[-1], 2),
            "whole_s": round(ended, 1)}


def recorded_command(run_dir: Path) -> str | None:
    """The command a run folder was trained with; a finished run is reused only for the same one."""
    path = run_dir / COMMAND_FILE
    return path.read_text() if path.is_file() else None


def describe(values: list[float]) -> dict[str, float | int]:
    return {"mean": round(statistics.fmean(values), 5), "std": round(statistics.stdev(values), 5), "n": len(values)}


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per trainer, each metric's mean and standard deviation over the seeds; and the difference
    of the means, ours − YOLOv5, with its standard error (the seeds of the two are independent)."""
    summary: dict[str, Any] = {trainer: {} for trainer in TRAINERS}
    summary["difference"] = {}
    for metric in COMPARED:
        values = {trainer: [run[metric] for run in runs if run["trainer"] == trainer] for trainer in TRAINERS}
        for trainer in TRAINERS:
            summary[trainer][metric] = describe(values[trainer])
        error = math.sqrt(sum(statistics.variance(values[trainer]) / len(values[trainer]) for trainer in TRAINERS))
        difference = statistics.fmean(values["ours"]) - statistics.fmean(values["yolov5"])
        summary["difference"][metric] = {"mean": round(difference, 5), "standard_error": round(error, 5)}
    for trainer in TRAINERS:  # the mean of each phase over the runs that have a timeline
        timed = [run["phases"] for run in runs if run["trainer"] == trainer and run.get("phases")]
        summary[trainer]["phases"] = ({phase: round(statistics.fmean(timing[phase] for timing in timed), 3)
                                       for phase in timed[0]} if timed else None)
    return summary


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yolov5", required=True, type=shlex.split,
                        help='the command that runs YOLOv5 v7.0\'s train.py, e.g. "python ~/yolov5/train.py"')
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0,1,2"), help="comma-separated, at least two")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--data", default="synthetic",
                        help=f"our data YAML path or bundled name, or a generated comparison set: {', '.join(RECIPES)}")
    parser.add_argument("--cfg", default="yolov5n", help="model: yolov5n/s/m/l/x, or a YAML path both can read")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="", help="cpu, 0, … (default: each trainer's own choice)")
    parser.add_argument("--workers", type=int, default=8, help="loader workers")
    parser.add_argument("--project", type=Path, default=Path("runs/compare"), help="where the runs go")
    parser.add_argument("--train-images", type=int, default=DEFAULT_SIZES["train"],
                        help="training images of a generated comparison set")
    parser.add_argument("--val-images", type=int, default=DEFAULT_SIZES["val"],
                        help="validation images of a generated comparison set")
    parser.add_argument("--data-size", type=int, default=DEFAULT_SIZES["size"],
                        help="image side in pixels of a generated comparison set")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs} must be at least 1")
    args.project = args.project.resolve()  # YOLOv5 runs elsewhere would resolve a relative one differently
    return args


def main() -> None:
    args = parse_arguments()
    args.project.mkdir(parents=True, exist_ok=True)
    our_data = resolve_data(args.data, args.project, train=args.train_images, val=args.val_images,
                            size=args.data_size)
    yolov5_data = args.project / "yolov5-data.yaml"
    write_yolov5_data(load_data_config(our_data), yolov5_data)  # generates a synthetic set on first use
    commands = {"ours": [sys.executable, "-m", "trainer"], "yolov5": args.yolov5}
    data = {"ours": our_data, "yolov5": yolov5_data}
    runs = []
    for seed in args.seeds:
        for trainer in TRAINERS:
            run_dir = args.project / f"{trainer}-seed{seed}"
            command = commands[trainer] + training_flags(args, data[trainer], seed, run_dir)
            rows, seconds = read_results(run_dir), None
            if len(rows) < args.epochs or recorded_command(run_dir) != shlex.join(command):  # not this run, finished
                seconds = train(command, run_dir)
                rows = read_results(run_dir)
            if len(rows) < args.epochs:
                raise click.ClickException(f"{run_dir}/results.csv has {len(rows)} of {args.epochs} epochs")
            runs.append({"trainer": trainer, "seed": seed, **summarise_run(rows),
                         "run_s": None if seconds is None else round(seconds, 1),
                         "phases": run_phases(run_dir, trainer, args.epochs), "dir": str(run_dir)})
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    result = {"bench": "compare_yolov5", "cfg": args.cfg, "imgsz": args.imgsz, "batch_size": args.batch_size,
              "epochs": args.epochs, "device": args.device, "workers": args.workers, "data": args.data,
              "data_yaml": our_data, "yolov5_command": shlex.join(args.yolov5), "seeds": args.seeds, "runs": runs,
              **compare(runs), **machine_settings(device)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    try:
        main()
    except click.ClickException as error:  # a user mistake (bad --data, a failed run): a message, not a traceback
        error.show()
        sys.exit(error.exit_code)
