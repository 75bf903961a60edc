"""`python -m trainer`: YOLOv5 train.py's flags, one training or a DDP launch; `--evolve` hands
off to the evolution worker, `python -m orchestrator.evolution`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from trainer import __version__, dist
from trainer.config import DEFAULT_MODEL, Hyp, LaunchSettings, TrainConfig
from trainer.cpus import default_loader_workers
from trainer.errors import CannotWrite, UserError
from trainer.flags import (
    CONTEXT_SETTINGS,
    Command,
    config_options,
    field_values,
    split_options,
)
from trainer.paths import resolve_config
from trainer.progress import setup_logging

LOGGER = logging.getLogger("trainer")
# A name, not an import: the trainer does not depend on the orchestrator that runs evolutions
EVOLUTION_MODULE = "orchestrator.evolution"
EVOLUTION_FLAGS = ("--evolve", "--generations")
EVOLUTION_EPILOG = f"""\b
Evolution: --evolve [N] (or --generations N) hands these flags to
python -m {EVOLUTION_MODULE}, the evolution worker, which takes the
training flags above plus --evolve, --generations, --search, --prune,
--hours, --evolve-population, --search-space, --worker-id and --lease-ttl:
see its --help."""


def latest_checkpoint(search_root: Path = Path("runs")) -> Path:
    candidates = sorted(search_root.glob("**/weights/last.pt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise UserError(f"--resume found no last.pt under {search_root}/: pass the checkpoint path")
    return candidates[-1]


def training_options(command: Command) -> Command:
    """Add every training flag (`TrainConfig`'s fields; not the DDP launch flags) to a click command."""
    return config_options(TrainConfig)(command)


def split_training_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parsed options parted into the training ones, for build_config, and the command's own."""
    return split_options(TrainConfig, options)


def build_config(options: Mapping[str, Any]) -> TrainConfig:
    """Turn parsed training flags into the run's frozen config (the hyp file is read and validated
    here; a wrong model name or weights file fails here too, before the data is prepared). Flags
    left out keep their defaults; a key that is no training flag is a TypeError.

    Without --cfg the model is the one the --weights were trained with, as in YOLOv5, else yolov5n.
    """
    from trainer.checkpoint import load_weights
    from trainer.model import model_stride, stride_multiple

    values = field_values(TrainConfig, options)
    hyp_path = str(values.get("hyp_path", TrainConfig.hyp_path))
    hyp = Hyp.from_yaml(resolve_config(hyp_path, "hyps"))
    weights = load_weights(values["weights"]) if values.get("weights") else None
    model = values.get("cfg") or (weights.model_name() if weights else DEFAULT_MODEL)
    stride = model_stride(model)  # a wrong model name fails here
    if values.get("cos_lr") and values.get("sgdr"):
        raise UserError(f"--cos-lr and --sgdr {values['sgdr']} are two schedules: pick one (--sgdr restarts a cosine)")
    workers = loader_workers(values.get("workers"), values.get("batch_size", TrainConfig.batch_size))
    imgsz = stride_multiple(values.get("imgsz", TrainConfig.imgsz), stride)
    return TrainConfig(**{**values, "cfg": model, "hyp": hyp, "hyp_path": hyp_path, "workers": workers,
                          "imgsz": imgsz})


def loader_workers(given: int | None, batch_size: int) -> int:
    """--workers as given, else sized to this machine's CPUs and the batch of each process (trainer.cpus)."""
    if given is not None:
        return given
    return default_loader_workers(batch_size // max(1, int(os.environ.get("WORLD_SIZE", "1"))))


def launch_ddp(devices: list[str], launch: LaunchSettings) -> int:
    """Re-run this command under torch.distributed.run, one process per GPU on this node.

    We never fall back to DataParallel: `--device 0,1` means DDP. The rendezvous port is
    chosen free on a single node, so two jobs on one machine do not clash.
    """
    single_node = launch.nnodes == 1
    port = launch.master_port or (dist.free_port() if single_node else 29500)
    nproc = 1 if devices == ["cpu"] else len(devices)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--nnodes={launch.nnodes}", f"--node_rank={launch.node_rank}",
               f"--master_addr={launch.master_addr}", f"--master_port={port}",
               "-m", "trainer", *sys.argv[1:]]
    LOGGER.info("Starting DDP: %d process(es) on this node, %d node(s), rendezvous %s:%d",
                nproc, launch.nnodes, launch.master_addr, port)
    from trainer.ranks import signal_ranks

    process = subprocess.Popen(command)
    # SIGTERM goes to the ranks themselves: each finishes its epoch, rank 0 saves, all exit.
    # torchrun would signal their whole process groups, dataloader workers included, mid-epoch.
    signal.signal(signal.SIGTERM, lambda *_: signal_ranks(process.pid, signal.SIGTERM)
                  or process.send_signal(signal.SIGTERM))
    return process.wait()


def train_command(options: Mapping[str, Any], dist_timeout: float) -> None:
    """One training (this process's rank of it under torchrun), from the training flags."""
    from trainer.checkpoint import load_checkpoint
    from trainer.train import next_run_dir, run

    ctx = dist.init_distributed(options["device"], dist_timeout)
    setup_logging(ctx.is_main)
    try:
        resume_state = None
        if options["resume"]:
            checkpoint = latest_checkpoint() if options["resume"] == "latest" else Path(options["resume"])
            resume_state = load_checkpoint(checkpoint)
            cfg = TrainConfig.from_dict(resume_state["config"])
            cfg = cfg.replace(device=options["device"], workers=loader_workers(options["workers"], cfg.batch_size))
            save_dir = checkpoint.parent.parent
        else:
            cfg = build_config(options)
            save_dir = dist.broadcast_object(next_run_dir(cfg.project, cfg.name, cfg.exist_ok), ctx)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the epoch, save, exit
        result = run(cfg, ctx, save_dir, resume_state=resume_state, stop=stop)
        if ctx.is_main:
            LOGGER.info("Results saved to %s (best fitness %.4f)", save_dir, result.best_fitness)
    except OSError as error:
        full = CannotWrite.from_os_error(error)
        if full is None:
            raise
        raise full from None
    finally:
        dist.cleanup()


@click.command(context_settings=CONTEXT_SETTINGS, epilog=EVOLUTION_EPILOG)
@training_options
@config_options(LaunchSettings)
@click.version_option(__version__, prog_name="trainer")
def main(**options: Any) -> None:
    """Train a YOLO-family detector (YOLOv5's recipe), or run as a hyperparameter-evolution worker."""
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stderr)
    training, launch_options = split_training_options(options)
    launch = LaunchSettings(**field_values(LaunchSettings, launch_options))
    devices = dist.parse_devices(training["device"])
    if (len(devices) > 1 or launch.nnodes > 1) and not dist.launched_by_torchrun():
        sys.exit(launch_ddp(devices, launch))
    train_command(training, launch.dist_timeout)


def parse_arguments(arguments: Sequence[str], command: click.Command = main,
                    prog: str = "python -m trainer") -> dict[str, Any]:
    """The options `command` would run with, for a launcher that checks them first; a flag it does
    not know, or a bad value, is a UserError naming it."""
    try:
        return command.make_context(prog, list(arguments)).params
    except click.UsageError as error:  # no such option, a bad value, a missing argument
        raise UserError(f"trainer flags {' '.join(arguments)}: {error.format_message()} "
                        f"(see {prog} --help)") from None


def check_training_arguments(arguments: Sequence[str]) -> TrainConfig:
    """What a training started with these flags would refuse before it prepares any data."""
    return build_config(split_training_options(parse_arguments(arguments))[0])


def evolution_handoff(arguments: Sequence[str], python: str = sys.executable) -> list[str] | None:
    """The command line that runs `arguments` when they ask for an evolution (--evolve [N],
    --evolve=N, --generations N), else None: the evolution worker has its own entry point."""
    for argument in arguments:
        if argument == "--":
            break
        if argument.split("=", 1)[0] in EVOLUTION_FLAGS:
            return [python, "-m", EVOLUTION_MODULE, *arguments]
    return None


def run_command_line() -> None:
    """`python -m trainer` and `evolvectl-train`: an evolution becomes the evolution worker (this
    process replaced, so signals such as docker stop's SIGTERM reach it directly); anything else trains."""
    handoff = evolution_handoff(sys.argv[1:])
    if handoff:
        os.execv(handoff[0], handoff)
    main()
