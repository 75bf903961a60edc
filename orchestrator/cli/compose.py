"""`compose`: a Docker Compose file, or a Swarm stack file, for a run instead of starting it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from orchestrator.cli.group import CONTEXT, main, open_console, run_flags
from orchestrator.cli.launch import check_evolution_flags, host_file
from orchestrator.cli.options import (
    DEFAULT_RUN,
    constraint_option,
    launch_options,
    settings_from,
    trainer_options,
)
from orchestrator.evolution.journal import Journal
from orchestrator.runs.names import check_run_name
from orchestrator.runs.plan import (
    DEFAULT_PROJECT,
    LaunchPlan,
    parse_gpu_spec,
    run_directory,
    worker_slots,
)
from orchestrator.runs.record import LaunchRecord
from trainer.errors import UserError

if TYPE_CHECKING:
    from orchestrator.backends.docker.spec import WorkerSpec


@main.command(context_settings=CONTEXT)
@launch_options
@click.option("--stack", is_flag=True,
              help="a stack file for `docker stack deploy` on a Docker Swarm instead: the services of --backend swarm")
@constraint_option
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="file to write (default: compose.<run>.yaml, or stack.<run>.yaml with --stack)")
def compose(project: Path, name: str | None, stack: bool, output: Path | None, **values: Any) -> None:
    """Write a Docker Compose file with one service per worker, each reserving only its own GPU.

    With --stack, a stack file for `docker stack deploy -c FILE STACK` on a swarm manager instead:
    the services `start --backend swarm` creates, each GPU worker reserving one NVIDIA-GPU.
    """
    from orchestrator.backends.docker.backend import host_user, worker_specs
    from orchestrator.backends.docker.stack import check_stack_names
    from orchestrator.runs.inputs import stage_for_containers

    run = check_run_name(name or DEFAULT_RUN)
    _check_stack_flags(stack, values)
    gpus = parse_gpu_spec(values["gpus"], None) if values["gpus"] else []
    check_evolution_flags(trainer_options(values), values["generations"], run_directory(project, run))
    plan = LaunchPlan(run, project, tuple(worker_slots(gpus, values["cpu_workers"])), values["generations"],
                      trainer_options(values))
    if stack:
        check_stack_names(run, plan.slots)  # before anything is written
    staged = stage_for_containers(plan.options, run, plan.run_dir)
    specs = worker_specs(plan, staged, values["image"], host_user(), settings_from(values).limits,
                         values["max_restarts"])
    if stack:
        output = output or Path(f"stack.{run}.yaml")
        start_command = _write_stack(output, run, run_flags(run, project, DEFAULT_PROJECT), specs,
                                     values["constraints"])
    else:
        output = output or Path(f"compose.{run}.yaml")
        start_command = _write_compose(output, run, specs, values["base_image"])
    Journal(plan.run_dir).clear_stop()
    LaunchRecord(run, "swarm" if stack else "docker", tuple(slot.key for slot in plan.slots), plan.generations,
                 host_file(values["hyp"]), host_file(values["search_space"]), values["image"]).save(plan.run_dir)
    open_console().print(f"wrote {output} ({len(specs)} services); start it with: {start_command}")


def _check_stack_flags(stack: bool, values: dict[str, Any]) -> None:
    """What a compose file or a stack file cannot hold."""
    if values["constraints"] and not stack:
        raise UserError("--constraint places Swarm services: use it with --stack (or start --backend swarm)")
    given = click.get_current_context().get_parameter_source("base_image") is ParameterSource.COMMANDLINE
    if stack and given:  # from $BASE_IMAGE (which compose.yaml reads too) it is ignored
        raise UserError("--base-image: `docker stack deploy` builds no image; build it on every node "
                        "(or push it to a registry) and pass --image")


def _write_compose(output: Path, run: str, specs: list[WorkerSpec], base_image: str | None) -> str:
    from orchestrator.backends.docker.backend import PROJECT_ROOT
    from orchestrator.backends.docker.compose import (
        compose_document,
        write_compose_file,
    )
    from orchestrator.backends.docker.engine import DOCKERFILE

    context = PROJECT_ROOT if (PROJECT_ROOT / DOCKERFILE).is_file() else None  # else the image must exist
    write_compose_file(output, run, compose_document(run, specs, context, base_image))
    return f"docker compose -f {output} up -d"


def _write_stack(output: Path, run: str, where: str, specs: list[WorkerSpec], constraints: tuple[str, ...]) -> str:
    from orchestrator.backends.docker.service import service_spec
    from orchestrator.backends.docker.stack import (
        stack_document,
        stack_name,
        write_stack_file,
    )

    write_stack_file(output, run, where, stack_document([service_spec(spec, constraints) for spec in specs]))
    return f"docker stack deploy -c {output} {stack_name(run)}"
