"""`python -m trainer`: YOLOv5 train.py's flags, one training, one evolution worker, or a DDP launch."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import sys
from pathlib import Path
from typing import Any

import click

from trainer import __version__, dist
from trainer.config import Hyp, TrainConfig
from trainer.errors import UserError
from trainer.paths import resolve_config
from trainer.progress import setup_logging

LOGGER = logging.getLogger("trainer")
DEFAULT_MODEL = TrainConfig.cfg


def latest_checkpoint(search_root: Path = Path("runs")) -> Path:
    candidates = sorted(search_root.glob("**/weights/last.pt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise UserError(f"--resume found no last.pt under {search_root}/: pass the checkpoint path")
    return candidates[-1]


class FrozenLayers(click.ParamType):
    """YOLOv5's --freeze: `10` freezes layers 0 to 9 (the backbone of the bundled models), a list
    such as `0,1,2` freezes those layers; `0` freezes nothing."""

    name = "N|LIST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = [int(part) for part in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a layer count or a list of layer indices such as 0,1,2", param, ctx)
        if any(number < 0 for number in numbers):
            self.fail(f"{value!r}: layer indices are 0 or more", param, ctx)
        return tuple(range(numbers[0])) if len(numbers) == 1 else tuple(sorted(set(numbers)))


def build_config(options: dict[str, Any]) -> TrainConfig:
    """Turn parsed flags into the run's frozen config (the hyp file is read and validated here;
    a wrong model name or weights file fails here too, before the data is prepared).

    Without --cfg the model is the one the --weights were trained with, as in YOLOv5, else yolov5n.
    """
    from trainer.checkpoint import load_weights

    hyp = Hyp.from_yaml(resolve_config(options["hyp"], "hyps"))
    weights = load_weights(options["weights"]) if options.get("weights") else None
    model = options.get("cfg") or (weights.model_name() if weights else DEFAULT_MODEL)
    resolve_config(model, "models")
    fields = {name: options[name] for name in TrainConfig.__dataclass_fields__ if name in options}
    return TrainConfig(**{**fields, "cfg": model, "hyp": hyp, "hyp_path": str(options["hyp"])})


def parse_arguments(arguments: list[str]) -> dict[str, Any]:
    """The options `python -m trainer` would run with, for a launcher that checks them first; a
    flag the trainer does not know, or a bad value, is a UserError naming it."""
    try:
        return main.make_context("python -m trainer", list(arguments)).params
    except click.UsageError as error:  # no such option, a bad value, a missing argument
        raise UserError(f"trainer flags {' '.join(arguments)}: {error.format_message()} "
                        "(see python -m trainer --help)") from None


def check_training_arguments(arguments: list[str]) -> TrainConfig:
    """What a training started with these flags would refuse before it prepares any data."""
    return build_config(parse_arguments(arguments))


def launch_ddp(devices: list[str], options: dict[str, Any]) -> int:
    """Re-run this command under torch.distributed.run, one process per GPU on this node.

    We never fall back to DataParallel: `--device 0,1` means DDP. The rendezvous port is
    chosen free on a single node, so two jobs on one machine do not clash.
    """
    single_node = options["nnodes"] == 1
    port = options["master_port"] or (dist.free_port() if single_node else 29500)
    nproc = 1 if devices == ["cpu"] else len(devices)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--nnodes={options['nnodes']}", f"--node_rank={options['node_rank']}",
               f"--master_addr={options['master_addr']}", f"--master_port={port}",
               "-m", "trainer", *sys.argv[1:]]
    LOGGER.info("Starting DDP: %d process(es) on this node, %d node(s), rendezvous %s:%d",
                nproc, options["nnodes"], options["master_addr"], port)
    from trainer.ranks import signal_ranks

    process = subprocess.Popen(command)
    # SIGTERM goes to the ranks themselves: each finishes its epoch, rank 0 saves, all exit.
    # torchrun would signal their whole process groups, dataloader workers included, mid-epoch.
    signal.signal(signal.SIGTERM, lambda *_: signal_ranks(process.pid, signal.SIGTERM)
                  or process.send_signal(signal.SIGTERM))
    return process.wait()


def train_command(options: dict[str, Any]) -> None:
    from trainer.checkpoint import load_checkpoint
    from trainer.train import next_run_dir, run

    ctx = dist.init_distributed(options["device"], options["dist_timeout"])
    setup_logging(ctx.is_main)
    try:
        resume_state = None
        if options["resume"]:
            checkpoint = latest_checkpoint() if options["resume"] == "latest" else Path(options["resume"])
            resume_state = load_checkpoint(checkpoint)
            cfg = TrainConfig.from_dict(resume_state["config"]).replace(
                device=options["device"], workers=options["workers"])
            save_dir = checkpoint.parent.parent
        else:
            cfg = build_config(options)
            save_dir = dist.broadcast_object(next_run_dir(cfg.project, cfg.name, cfg.exist_ok), ctx)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the epoch, save, exit
        result = run(cfg, ctx, save_dir, resume_state=resume_state, stop=stop)
        if ctx.is_main:
            LOGGER.info("Results saved to %s (best fitness %.4f)", save_dir, result.best_fitness)
    finally:
        dist.cleanup()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", default="synthetic", help="data.yaml path or a bundled name (synthetic = built-in data)")
@click.option("--cfg", default=None,
              help="model YAML path or a bundled name (yolov5n/s/m/l/x); default: the --weights' model, "
                   f"else {DEFAULT_MODEL}")
@click.option("--weights", default="", help="initial weights: a last.pt or best.pt of evolvectl or YOLOv5 (yolov5s.pt)")
@click.option("--hyp", default="hyp.scratch-low", help="hyperparameter YAML path or bundled name")
@click.option("--epochs", default=100, type=click.IntRange(min=1))
@click.option("--batch-size", "--batch", "batch_size", default=16, type=click.IntRange(min=1),
              help="total batch size over all GPUs")
@click.option("--imgsz", "--img", "--img-size", "imgsz", default=640, type=click.IntRange(min=32),
              help="train and val image size (pixels)")
@click.option("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 (DDP) or cpu")
@click.option("--workers", default=8, type=click.IntRange(min=0), help="dataloader workers per process")
@click.option("--project", default="runs/train", help="save to project/name")
@click.option("--name", default="exp", help="save to project/name")
@click.option("--exist-ok", is_flag=True, help="existing project/name ok, do not increment")
@click.option("--resume", is_flag=False, flag_value="latest", default="",
              help="resume the most recent run, or the given last.pt")
@click.option("--cache", is_flag=False, flag_value="ram", default="", type=click.Choice(["", "ram", "disk"]),
              help="keep decoded, resized images in RAM (--cache, --cache ram) or in .npy files (--cache disk)")
@click.option("--rect", is_flag=True,
              help="rectangular training: batches of similar aspect ratio, each on its own canvas; no mosaic")
@click.option("--multi-scale", is_flag=True, help="vary the training image size by ±50% from batch to batch")
@click.option("--optimizer", default="SGD", type=click.Choice(["SGD", "Adam", "AdamW"]))
@click.option("--cos-lr", is_flag=True, help="cosine LR schedule")
@click.option("--label-smoothing", default=0.0, type=click.FloatRange(0.0, 1.0))
@click.option("--seed", default=0, type=int, help="global training seed")
@click.option("--patience", default=100, type=click.IntRange(min=0), help="early stopping patience (0 = off)")
@click.option("--freeze", type=FrozenLayers(), default="0",
              help="freeze the first N layers (10: the backbone), or the listed ones (0,1,2)")
@click.option("--single-cls", is_flag=True, help="train multi-class data as single-class")
@click.option("--noval", is_flag=True, help="only validate the final epoch")
@click.option("--nosave", is_flag=True, help="only save the final checkpoint")
@click.option("--save-period", default=-1, type=int, help="also save weights/epoch{N}.pt every N epochs (< 1: off)")
@click.option("--noautoanchor", is_flag=True, help="disable AutoAnchor")
@click.option("--save-json", is_flag=True, help="write COCO-format predictions.json")
@click.option("--noplots", is_flag=True,
              help="save no pictures (results.png, labels.jpg, batches, curves, confusion matrix)")
@click.option("--sync-bn", is_flag=True, help="SyncBatchNorm in DDP (worth it at ≤8 images per GPU)")
@click.option("--evolve", "evolve", is_flag=False, flag_value=300, default=None, type=click.IntRange(min=1),
              help="run as an evolution worker; optional total generations (default 300)")
@click.option("--generations", default=None, type=int, help="total generations of the evolution (all workers)")
@click.option("--evolve-population", default=None, help="seed the evolution from hyp YAMLs (folder) or an evolve.csv")
@click.option("--search-space", default=None, help="evolution search space YAML overriding the bundled one")
@click.option("--worker-id", default=None, help="evolution worker name (default: host-pid)")
@click.option("--lease-ttl", default=60.0, type=click.FloatRange(min=1.0),
              help="evolution: seconds without a heartbeat before a worker's generation is handed out again")
@click.option("--nnodes", default=1, type=click.IntRange(min=1), help="DDP: number of machines")
@click.option("--node-rank", default=0, type=click.IntRange(min=0), help="DDP: rank of this machine")
@click.option("--master-addr", default="127.0.0.1", help="DDP: address of the rank-0 machine")
@click.option("--master-port", default=0, type=click.IntRange(min=0, max=65535), help="DDP: port (0 = free port)")
@click.option("--dist-timeout", default=30.0, type=click.FloatRange(min=0.1), help="DDP: minutes to wait for peers")
@click.option("--local-rank", "--local_rank", "local_rank", default=-1, hidden=True)
@click.version_option(__version__, prog_name="trainer")
def main(**options: Any) -> None:
    """Train a YOLO-family detector (YOLOv5's recipe), or run as a hyperparameter-evolution worker."""
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stderr)
    if options["evolve"] is not None or options["generations"] is not None:
        from orchestrator.evolution.command import evolve_command
        evolve_command(options)
        return
    devices = dist.parse_devices(options["device"])
    wants_ddp = len(devices) > 1 or options["nnodes"] > 1
    if wants_ddp and not dist.launched_by_torchrun():
        sys.exit(launch_ddp(devices, options))
    train_command(options)
