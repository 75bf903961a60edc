"""The command line's option sets: which run, which workers or devices, the trainer's flags, the image.

Shared by the commands in `cli`, so that `start`, `compose` and `ddp` spell a flag the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from orchestrator.backends.base import (
    CHOICES,
    DEFAULT_IMAGE,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_SHM_SIZE,
    ContainerLimits,
    WorkerSettings,
)
from orchestrator.evolution.search import DEFAULT_SEARCH, SEARCHES
from orchestrator.runs.plan import (
    DDP_PROJECT,
    DEFAULT_PROJECT,
    TrainerOptions,
    parse_gpu_spec,
)

DEFAULT_RUN = "exp"


class GpuSpec(click.ParamType):
    """`0-7`, `0,2,5`, `3` or `all`: checked for syntax here, against the engine's GPUs at start."""

    name = "GPUS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if text.lower() != "all":
            parse_gpu_spec(text, None)  # its UserError names the bad piece, on one line
        return text


class MemorySize(click.ParamType):
    """A size as `docker run --shm-size` takes it (`8g`, `512m`, bytes), checked with the Docker SDK's
    own parser, so a typo is a one-line error at once rather than the engine's refusal per container."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from orchestrator.backends.docker.spec import memory_bytes

        text = str(value).strip()
        if memory_bytes(text) <= 0:
            self.fail(f"{value!r} is not a size: give a number with b, k, m or g, e.g. 8g", param, ctx)
        return text


class PlacementConstraint(click.ParamType):
    """A Swarm placement constraint, `KEY==VALUE` or `KEY!=VALUE` (e.g. node.labels.gpu==true)."""

    name = "CONSTRAINT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from orchestrator.backends.docker.service import check_constraint
        from trainer.errors import UserError

        try:
            return check_constraint(str(value))
        except UserError:
            self.fail(f"{value!r} is not KEY==VALUE or KEY!=VALUE, e.g. node.labels.gpu==true", param, ctx)


backend_option = click.option(
    "--backend", type=click.Choice(CHOICES), default="auto", envvar="EVOLVECTL_BACKEND",
    help="docker, local processes, swarm (services over a swarm's servers; run on a manager), or auto "
         "(docker when an engine answers; for a run: the one it started with)",
)
constraint_option = click.option(
    "--constraint", "constraints", type=PlacementConstraint(), multiple=True,
    help="with --backend swarm or compose --stack: where workers may run, e.g. node.labels.gpu==true (repeatable)",
)


def run_options(command: Callable[..., Any], name_help: str = "run name (default: the latest run started)",
                project: Path = DEFAULT_PROJECT) -> Any:
    """--project and --name: which run."""
    command = click.option("--name", "--run", "name", default=None, envvar="EVOLVECTL_RUN", help=name_help)(command)
    return click.option("--project", type=click.Path(path_type=Path), default=project,
                        envvar="EVOLVECTL_PROJECT", help="folder of runs (a run's folder: project/name)")(command)


def _with_options(command: Callable[..., Any], options: list[Callable[..., Any]]) -> Callable[..., Any]:
    for option in reversed(options):
        command = option(command)
    return command


def _training_options(evolution: bool) -> list[Callable[..., Any]]:
    """The trainer's data, model and schedule flags, for every generation of an evolution or for one training."""
    return [
        click.option("--data", default="synthetic", help="data YAML path or bundled name (synthetic)"),
        click.option("--cfg", default=None, help="model YAML path or bundled name (yolov5n/s/m/l/x)"),
        click.option("--weights", default=None,
                     help="starting weights: a last.pt or best.pt of evolvectl or YOLOv5 (e.g. yolov5s.pt)"),
        click.option("--hyp", default=None, help="base hyperparameter YAML path or bundled name" if evolution
                     else "hyperparameter YAML path or bundled name (e.g. an evolution's hyp_evolve.yaml)"),
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="epochs per generation" if evolution else "epochs (the trainer's default: 100)"),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help=None if evolution else "total batch size over all processes (the trainer's default: 16)"),
        click.option("--imgsz", type=click.IntRange(min=32), default=None, help="image size (pixels)"),
        click.option("--workers", type=click.IntRange(min=0), default=None,
                     help="dataloader processes per " + ("worker" if evolution else "training process")
                     + " (default: 8, at most the host's CPUs over the processes sharing them)"),
        click.option("--seed", type=int, default=None,
                     help="training seed of every generation" if evolution else "training seed"),
    ]


def _container_options() -> list[Callable[..., Any]]:
    return [
        click.option("--image", default=DEFAULT_IMAGE, envvar="EVOLVECTL_IMAGE", help="worker image"),
        click.option("--base-image", default=None, envvar="BASE_IMAGE",
                     help="PyTorch base image for the build (default: the Dockerfile's)"),
        click.option("--shm-size", type=MemorySize(), default=DEFAULT_SHM_SIZE, help="shared memory per container"),
        click.option("--memory", type=MemorySize(), default=None, help="RAM limit per container (e.g. 20g)"),
        click.option("--cpus", type=click.FloatRange(min=0.01), default=None,
                     help="CPU limit per container (e.g. 4, or 2.5); it also caps the default --workers"),
        click.option("--max-restarts", type=click.IntRange(min=0), default=DEFAULT_MAX_RESTARTS,
                     help="restarts of a failing worker"),
        click.argument("trainer_args", nargs=-1, type=click.UNPROCESSED),
    ]


def launch_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The workers to run, their image and the trainer's flags (shared by start and compose)."""
    options = [
        click.option("--gpus", type=GpuSpec(), default=None, help="GPUs, one worker each: 0-7, 0,2,5 or all"),
        click.option("--cpu-workers", type=click.IntRange(min=0), default=0, help="CPU workers (no GPU needed)"),
        click.option("--generations", type=click.IntRange(min=1), default=300, help="total budget, all workers"),
        *_training_options(evolution=True),
        click.option("--search", type=click.Choice(SEARCHES), default=None,
                     help=f"search algorithm (default: the run's own; {DEFAULT_SEARCH} for a new run)"),
        click.option("--prune/--no-prune", default=None,
                     help="stop generations early at rung epochs (asynchronous successive halving; default: on)"),
        click.option("--prune-rungs", default=None,
                     help="rung epochs, e.g. 3,10 (default: epochs/9 and epochs/3, from epoch 3 on)"),
        click.option("--prune-eta", type=click.FloatRange(min=1.0, min_open=True), default=None,
                     help="pruning's reduction factor η (default 3): the share 1/η goes on at each rung"),
        click.option("--hours", type=click.FloatRange(min=0.0, min_open=True), default=None,
                     help="time budget: no new generation starts once the run has lasted this long"),
        click.option("--search-space", default=None, help="search space YAML overriding the bundled one"),
        click.option("--evolve-population", "--evolve_population", "--resume_evolve", "evolve_population", default=None,
                     help="seed hyp YAMLs, an evolve_population.yaml or an evolve.csv (files or folder)"),
        *_container_options(),
    ]
    return run_options(_with_options(command, options), name_help=f"run name (default: {DEFAULT_RUN})")


def ddp_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The devices of one DDP training, its hosts, its image and the trainer's flags."""
    options = [
        click.option("--gpus", type=GpuSpec(), default=None, help="GPUs of the training, one process each: 0-7 or all"),
        click.option("--cpu-procs", type=click.IntRange(min=0), default=0,
                     help="train in N processes on CPU instead (no GPU needed)"),
        *_training_options(evolution=False),
        click.option("--sync-bn", is_flag=True, help="SyncBatchNorm (worth it at 8 images per GPU or fewer)"),
        click.option("--cos-lr", is_flag=True, help="cosine LR schedule"),
        click.option("--nnodes", type=click.IntRange(min=1), default=1, help="hosts: run `evolvectl ddp` on each"),
        click.option("--node-rank", type=click.IntRange(min=0), default=0, help="this host's rank among them"),
        click.option("--master-addr", default="127.0.0.1", help="address of the --node-rank 0 host"),
        click.option("--master-port", type=click.IntRange(0, 65535), default=0,
                     help="rendezvous port (0: a free one on one host, 29500 across hosts)"),
        *_container_options(),
    ]
    return run_options(_with_options(command, options), name_help=f"run name (default: {DEFAULT_RUN})",
                       project=DDP_PROJECT)


def trainer_options(values: dict[str, Any]) -> TrainerOptions:
    return TrainerOptions.from_values(values, values["trainer_args"])


def ddp_trainer_options(values: dict[str, Any]) -> TrainerOptions:
    flags = tuple(flag for flag, wanted in (("--sync-bn", values["sync_bn"]), ("--cos-lr", values["cos_lr"])) if wanted)
    return TrainerOptions.from_values(values, (*flags, *values["trainer_args"]))


def settings_from(values: dict[str, Any], build: bool = False) -> WorkerSettings:
    limits = ContainerLimits(values["shm_size"], values["memory"], values["cpus"])
    return WorkerSettings(values["image"], values["base_image"], build, limits, values["max_restarts"],
                          tuple(values.get("constraints", ())))
