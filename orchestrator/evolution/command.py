"""`python -m orchestrator.evolution`: this process becomes one worker of a shared evolution.

It takes every training flag of `python -m trainer` (the trainer declares them, once) and the
evolution's own: `--evolve [N]` or `--generations N`, `--search`, `--prune` and its rungs,
`--hours`, `--evolve-population`, `--search-space`, `--worker-id` and `--lease-ttl`.
`python -m trainer --evolve ...` hands its arguments here unchanged, so YOLOv5's habit keeps
working. Worker containers and local workers run this module directly.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from orchestrator import __version__
from orchestrator.evolution.journal import Journal
from orchestrator.evolution.leases import RunRequest, check_run_inputs, load_state
from orchestrator.evolution.pruning import Pruning, parse_rungs
from orchestrator.evolution.search import DEFAULT_SEARCH, SEARCHES
from orchestrator.evolution.search_space import SearchSpace
from trainer.cli import build_config, parse_arguments, split_training_options, training_options
from trainer.config import TrainConfig
from trainer.errors import CannotWrite, UserError
from trainer.paths import resolve_config

LOGGER = logging.getLogger("trainer")
PROG = "python -m orchestrator.evolution"
DEFAULT_GENERATIONS = 300
# An evolution's runs live here unless --project names another folder.
EVOLVE_PROJECT = "runs/evolve"


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


@dataclass(frozen=True)
class EvolutionInputs:
    """A worker's inputs, read from its flags and checked: its training, what it asks of the run,
    and its own identity and lease."""

    cfg: TrainConfig
    request: RunRequest
    worker_id: str | None
    lease_ttl: float
    per_process_habit: bool = False  # the budget came from --evolve N, which YOLOv5 counts per process


def evolution_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The evolution's own flags, next to the trainer's."""
    options = [
        click.option("--evolve", "evolve", is_flag=False, flag_value=DEFAULT_GENERATIONS, default=None,
                     type=click.IntRange(min=1), help="total generations of the evolution (YOLOv5's spelling)"),
        click.option("--generations", default=None, type=click.IntRange(min=1),
                     help=f"total generations of the evolution, over all workers (default {DEFAULT_GENERATIONS})"),
        click.option("--search", type=click.Choice(SEARCHES), default=None,
                     help=f"search algorithm (default: the run's own; {DEFAULT_SEARCH} for a new run)"),
        click.option("--prune/--no-prune", default=True,
                     help="stop a generation early at a rung epoch when it ranks outside the top 1/η of all "
                          "generations recorded there (asynchronous successive halving)"),
        click.option("--prune-rungs", default=None,
                     help="rung epochs, e.g. 3,10 (default: epochs/η² and epochs/η, from epoch 3 on)"),
        click.option("--prune-eta", default=3.0, type=click.FloatRange(min=1.0, min_open=True),
                     help="pruning's reduction factor η: the share 1/η of generations goes on at each rung"),
        click.option("--hours", default=None, type=click.FloatRange(min=0.0, min_open=True),
                     help="time budget of the run: no new generation starts once it has run this long"),
        click.option("--evolve-population", "--evolve_population", "--resume_evolve", "evolve_population",
                     default=None, help="seed a new run from hyp YAMLs, an evolve_population.yaml or an evolve.csv "
                                        "(files or a folder; YOLOv5's --evolve_population and --resume_evolve)"),
        click.option("--search-space", default=None, help="evolution search space YAML overriding the bundled one"),
        click.option("--worker-id", default=None, help="this worker's name in the journal (default: host-pid)"),
        click.option("--lease-ttl", default=60.0, type=click.FloatRange(min=1.0),
                     help="seconds without a heartbeat before a worker's generation is handed out again"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def evolution_inputs(options: Mapping[str, Any]) -> EvolutionInputs:
    training, own = split_training_options(options)
    if training["resume"]:  # YOLOv5's train.py ignores it too when it evolves
        LOGGER.info("--resume is ignored with --evolve: an evolution resumes by itself, at the run's count")
        training = {**training, "resume": ""}
    cfg = build_config(training)
    space = SearchSpace.load(resolve_config(own["search_space"], "evolve") if own["search_space"] else None)
    rungs = parse_rungs(own["prune_rungs"]) if own["prune_rungs"] else None
    pruning = Pruning.for_epochs(cfg.epochs, rungs, own["prune_eta"]) if own["prune"] else None
    request = RunRequest(cfg.hyp, space, own["generations"] or own["evolve"] or DEFAULT_GENERATIONS,
                         population_sources(own["evolve_population"]), own["search"], pruning, own["hours"])
    per_process_habit = own["generations"] is None and own["evolve"] is not None
    return EvolutionInputs(cfg, request, own["worker_id"], own["lease_ttl"], per_process_habit)


def check_evolution_arguments(arguments: Sequence[str], run_dir: Path) -> None:
    """What every worker started with these flags would refuse when it joins the run in
    `run_dir`, found first by the launcher: one error, before any worker starts. Only reads."""
    check_run_inputs(Journal(run_dir), evolution_inputs(parse_arguments(arguments, command=main, prog=PROG)).request)


def refuse_a_finished_run(journal: Journal, generations: int) -> None:
    """YOLOv5's bash loop runs `train.py --evolve 1` over and over, one generation per process.
    Here N is the run's total, shared by every process that joins it, so from the second process
    on there is nothing left: say so, and exit non-zero so that the loop stops."""
    state = load_state(journal)
    if state is None or state.leases:
        return
    done = state.done(journal.count_rows())
    if done >= generations:
        raise UserError(
            f"run {journal.run_dir} already has {done} of its {generations} generation(s): --evolve N is the "
            "total of the run, shared by every process that joins it, not one process's share as in YOLOv5; "
            f"pass a larger N (--evolve {done + 1} trains one more) or a new --name"
        )


def evolve(inputs: EvolutionInputs) -> None:
    """Join the run in <project>/<name> and train generations until its budget is met."""
    from orchestrator.evolution.loop import run_worker
    from orchestrator.evolution.objective import TrainerObjective  # imports torch: only in a worker

    cfg, request = inputs.cfg, inputs.request
    project = EVOLVE_PROJECT if cfg.project == TrainConfig.project else cfg.project
    run_dir = Path(project) / cfg.name
    if inputs.per_process_habit:
        refuse_a_finished_run(Journal(run_dir), request.generations)
    objective = TrainerObjective.prepare(cfg)
    summary = run_worker(run_dir, request.base_hyp, request.space, request.generations, objective,
                         inputs.worker_id or f"{socket.gethostname()}-{os.getpid()}", cfg.seed,
                         gpu=os.environ.get("EVOLVECTL_GPU") or objective.device, population=request.population,
                         search=request.search, pruning=request.pruning, hours=request.hours,
                         lease_ttl=inputs.lease_ttl)
    LOGGER.info("Worker %s: %s (%d results, %d pruned, %d failed); results in %s", summary.worker_id,
                summary.exit_reason, summary.ok, summary.pruned, summary.failed, run_dir)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@training_options
@evolution_options
@click.version_option(__version__, prog_name="evolvectl evolution worker")
def main(**options: Any) -> None:
    """Run as one worker of a hyperparameter evolution shared through <project>/<name>/evolve.csv.

    Every worker of a run trains children of what all of them found so far, until the run's
    total of generations is reached. Training flags are those of `python -m trainer`.
    """
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stderr)
    try:
        evolve(evolution_inputs(options))
    except OSError as error:  # the journal's own writes: a full or read-only disk is one line, and no restart
        full = CannotWrite.from_os_error(error)
        if full is None:
            raise
        raise full from None
