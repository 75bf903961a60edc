"""`python -m trainer --evolve`: this process becomes one evolution worker of a shared run.

The dataset, its label and image caches and the loader workers are built once here and reused
by every generation; only the model, optimiser and hyperparameters are new each time.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.journal import Journal
from orchestrator.leases import check_run_inputs
from orchestrator.search_space import SearchSpace
from orchestrator.worker import GenerationContext, GenerationFailed, GenerationResult, run_worker
from trainer import dist
from trainer.config import Hyp, TrainConfig
from trainer.errors import TrainingDiverged, UserError
from trainer.paths import resolve_config
from trainer.train import PreparedData, prepare_data, run

LOGGER = logging.getLogger("trainer")


def population_sources(spec: str | None) -> list[Path]:
    """`--evolve-population`: hyp YAMLs and/or evolve.csv files, or a folder holding them."""
    if not spec:
        return []
    sources: list[Path] = []
    for part in spec.split(","):
        path = Path(part.strip())
        if path.is_dir():
            sources.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".csv")))
        elif path.is_file():
            sources.append(path)
        else:
            raise UserError(f"--evolve-population {part.strip()!r} not found: "
                            "give hyp YAMLs, an evolve.csv or a folder")
    return sources


def make_objective(cfg: TrainConfig, ctx: dist.DistContext, prepared: PreparedData) -> Any:
    """Train one child with the shared data; classify failures instead of recording fitness 0."""

    def objective(hyp: Hyp, generation: GenerationContext) -> GenerationResult:
        child = cfg.replace(hyp=hyp, seed=generation.seed, noval=True, nosave=True)
        LOGGER.info("Generation %d (attempt %d, %s): training %d epochs", generation.claim,
                    generation.attempt, generation.source, child.epochs)
        try:
            result = run(child, ctx, save_dir=None, prepared=prepared)
        except TrainingDiverged as error:
            raise GenerationFailed(str(error), kind="diverged") from None
        except torch.cuda.OutOfMemoryError as error:
            raise GenerationFailed(f"CUDA out of memory: {error}", kind="oom") from None
        finally:
            gc.collect()  # the generation's model and optimiser go before the next one is built
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return GenerationResult(*result.result.values())

    return objective


@dataclass(frozen=True)
class EvolutionInputs:
    """A worker's inputs, read from its flags and checked."""

    cfg: TrainConfig
    space: SearchSpace
    generations: int
    population: list[Path]


def evolution_inputs(options: dict[str, Any]) -> EvolutionInputs:
    from trainer.cli import build_config  # the CLI owns flag → config translation

    if options["resume"] or options["nnodes"] > 1:
        raise UserError("--evolve runs one process per GPU: drop --resume/--nnodes (evolutions resume by themselves)")
    override = options["search_space"]
    return EvolutionInputs(cfg=build_config(options),
                           space=SearchSpace.load(resolve_config(override, "evolve") if override else None),
                           generations=options["generations"] or options["evolve"] or 300,
                           population=population_sources(options["evolve_population"]))


def check_evolution_arguments(arguments: list[str], run_dir: Path) -> None:
    """What every worker started with these flags would refuse when it joins the run in
    `run_dir`, found first by the launcher: one error, before any worker starts. Only reads."""
    from trainer.cli import parse_arguments

    inputs = evolution_inputs(parse_arguments(arguments))
    check_run_inputs(Journal(run_dir), inputs.cfg.hyp, inputs.space, inputs.generations, inputs.population)


def evolve_command(options: dict[str, Any]) -> None:
    if len(dist.parse_devices(options["device"])) > 1 or dist.launched_by_torchrun():
        raise UserError("--evolve trains one generation per GPU: give one --device and start one worker per GPU "
                        "(evolvectl start --gpus ... does this)")
    inputs = evolution_inputs(options)
    cfg = inputs.cfg
    project = "runs/evolve" if cfg.project == "runs/train" else cfg.project
    run_dir = Path(project) / cfg.name
    worker_id = options["worker_id"] or f"{socket.gethostname()}-{os.getpid()}"
    ctx = dist.init_distributed(options["device"])
    prepared = prepare_data(cfg, ctx)
    summary = run_worker(run_dir, cfg.hyp, inputs.space, inputs.generations, make_objective(cfg, ctx, prepared),
                         worker_id, cfg.seed, gpu=os.environ.get("EVOLVECTL_GPU") or str(ctx.device),
                         population=inputs.population, lease_ttl=options["lease_ttl"])
    LOGGER.info("Worker %s: %s (%d results, %d failed); results in %s", summary.worker_id, summary.exit_reason,
                summary.ok, summary.failed, run_dir)
