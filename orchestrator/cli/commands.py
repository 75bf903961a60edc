"""`evolvectl`: start, watch, stop and read a hyperparameter evolution, one worker per GPU.

Workers are named by GPU index (`3` or `gpu3`) or, for CPU workers, `cpu0`, `cpu1`, ...;
a DDP training (`evolvectl ddp`) has one worker, `ddp`. Commands on an existing run take it
from --name (default: the most recently started run under --project, which by default
means runs/evolve and runs/train) and use the backend it was started with.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource
from rich.console import Console

from orchestrator import __version__
from orchestrator.backends.base import (
    CHOICES,
    Backend,
    WorkerSettings,
    backend_for_run,
    open_backend,
)
from orchestrator.cli.options import (
    DEFAULT_RUN,
    backend_option,
    constraint_option,
    ddp_options,
    ddp_trainer_options,
    launch_options,
    run_options,
    settings_from,
    trainer_options,
)
from orchestrator.cli.render import render_progress, render_status
from orchestrator.cli.views import follow_run, print_results, show_build_progress
from orchestrator.evolution.journal import Journal, JournalLockTimeout
from orchestrator.runs.ddp import (
    CHECKPOINT,
    DdpPlan,
    Rendezvous,
    check_batch_size,
    check_devices,
    trained_epochs,
)
from orchestrator.runs.names import DDP_KEY, check_run_name
from orchestrator.runs.plan import (
    DDP_PROJECT,
    DEFAULT_PROJECT,
    LaunchPlan,
    TrainerOptions,
    parse_gpu_spec,
    parse_worker_key,
    run_directory,
    worker_slots,
)
from orchestrator.runs.record import (
    DDP_MODE,
    LaunchRecord,
    existing_run_dir,
    is_ddp_run,
    searched_projects,
)
from orchestrator.runs.status import (
    ACTIVE_STATES,
    StatusReport,
    collect_status,
    collect_training_status,
)
from orchestrator.runs.storage import lock_warning
from trainer.errors import UserError

if TYPE_CHECKING:
    from orchestrator.backends.docker.spec import WorkerSpec

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


def choose_gpus(spec: str | None, backend: Backend) -> list[int]:
    """The GPUs asked for, checked against what the backend can hand out."""
    if spec is None:
        return []
    available = backend.visible_gpus()
    if available == []:
        where = {
            "docker": "the Docker engine cannot hand out GPUs (no NVIDIA runtime: install the NVIDIA Container Toolkit)",
            "swarm": "no ready node of the swarm advertises an NVIDIA-GPU generic resource (see the README's "
                     "Swarm section)",
        }.get(backend.name, "PyTorch sees no CUDA GPU on this host")
        raise UserError(f"--gpus {spec}: {where}; run CPU workers with --cpu-workers N")
    return parse_gpu_spec(spec, available)


def _host_file(value: str | None) -> str | None:
    """A file given on the command line, made absolute so results can read it from anywhere."""
    return str(Path(value).absolute()) if value is not None and Path(value).is_file() else value


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=True)  # paths and commands stay copyable


def _report(backend: Backend, run: str, run_dir: Path) -> StatusReport:
    record = LaunchRecord.load(run_dir)
    workers = backend.workers(run, run_dir)
    if record is not None and record.mode == DDP_MODE:
        return collect_training_status(run, run_dir, backend.name, workers, record.started, record.start_epoch)
    return collect_status(run, run_dir, backend.name, workers)


def _where(run: str, project: Path, default: Path) -> str:
    return f"--name {run}" + (f" --project {project}" if project != default else "")


class EvolvectlGroup(click.Group):
    """Turns a journal lock that cannot be taken into a one-line error like every other."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except JournalLockTimeout as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=EvolvectlGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="evolvectl")
def main() -> None:
    """Hyperparameter evolution for YOLO-family detectors: one worker per GPU, one shared evolve.csv."""
    # What the run's files hold that a command works around (a damaged evolve.csv line) is one line each.
    logging.basicConfig(format="Warning: %(message)s", level=logging.WARNING, stream=sys.stderr)


@main.command(context_settings=CONTEXT)
@launch_options
@backend_option
@constraint_option
@click.option("--build", is_flag=True, help="rebuild the image even if it exists")
@click.option("--wait", is_flag=True, help="stay in the foreground until the budget is reached, then show results")
def start(project: Path, name: str | None, backend: str, build: bool, wait: bool, **values: Any) -> None:
    """Start (or resume) an evolution: one worker per GPU and/or CPU worker.

    Running it again for the same run starts only the missing workers. Trainer flags not
    listed here go after `--`, e.g. `evolvectl start --gpus all -- --cos-lr`.
    """
    run = check_run_name(name or DEFAULT_RUN)
    if values["gpus"] is None and values["cpu_workers"] == 0:
        raise UserError("no workers asked for: pass --gpus (e.g. 0-3 or all) or --cpu-workers N")
    _check_evolution_flags(trainer_options(values), values["generations"], run_directory(project, run))
    launch = _Launch.open(project, run, backend, build, values, "{backend} workers")
    plan = LaunchPlan(run, project, tuple(worker_slots(launch.gpus, values["cpu_workers"])), values["generations"],
                      trainer_options(values))
    Journal(plan.run_dir).clear_stop()  # a previous `stop` must not make the new workers exit
    if (warning := lock_warning(plan.run_dir)) is not None:
        launch.console.print(f"[yellow]Warning:[/] {warning}", highlight=False)
    started = launch.workers.start(plan, launch.say)
    launch.record(plan.run_dir, tuple(slot.key for slot in plan.slots), plan.generations, values["search_space"])
    left = len(plan.slots) - len(started)
    launch.console.print(f"run [bold]{run}[/]: started {len(started)} {launch.workers.name} worker(s)"
                         + (f", {left} already running" if left else "") + f"; results in {plan.run_dir}")
    report = launch.follow(plan.run_dir, plan.slots[0].key, DEFAULT_PROJECT, wait)
    if report is not None:
        print_results(launch.console, run, plan.run_dir)
        _fail_on_bad_exits(report, run)


@main.command(context_settings=CONTEXT)
@ddp_options
@backend_option
@click.option("--build", is_flag=True, help="rebuild the image even if it exists")
@click.option("--wait", is_flag=True, help="stay in the foreground until the training ends")
def ddp(project: Path, name: str | None, backend: str, build: bool, wait: bool, **values: Any) -> None:
    """Train one model with DDP over the chosen GPUs: one container (or local process) holding them all.

    One process per GPU under torchrun; --batch-size is the total over all of them. Outputs
    (results.csv, weights/) go to PROJECT/NAME. Running it again for a stopped or crashed run
    resumes from its weights/last.pt. Several hosts: run it on each with --nnodes, --node-rank,
    --master-addr and --master-port. Other trainer flags go after `--`.
    """
    if backend == "swarm":
        from orchestrator.backends.docker.swarm import NOT_ON_SWARM

        raise UserError(NOT_ON_SWARM)
    run = check_run_name(name or DEFAULT_RUN)
    rendezvous = Rendezvous(values["nnodes"], values["node_rank"], values["master_addr"], values["master_port"])
    _check_ddp_request(values["gpus"], values["cpu_procs"], values["batch_size"], rendezvous.nnodes)
    from trainer.cli import (
        check_training_arguments,  # imports torch: only once a run is asked for
    )

    check_training_arguments(ddp_trainer_options(values).training_arguments())
    launch = _Launch.open(project, run, backend, build, values, "the {backend} training")
    plan = DdpPlan(run, project, tuple(launch.gpus), values["cpu_procs"], ddp_trainer_options(values), rendezvous)
    done = trained_epochs(run, plan.run_dir)
    started = launch.workers.start_ddp(plan, launch.say)
    if started:
        launch.record(plan.run_dir, (DDP_KEY,), 0, None, mode=DDP_MODE, start_epoch=done)
    resumed = f", resuming after epoch {done} from {plan.run_dir / CHECKPOINT}" if started and done else ""
    launch.console.print(f"run [bold]{run}[/]: DDP training {'started' if started else 'already running'} "
                         f"({plan.processes * rendezvous.nnodes} processes){resumed}; results in {plan.run_dir}")
    report = launch.follow(plan.run_dir, DDP_KEY, DDP_PROJECT, wait)
    if report is not None:
        launch.console.print(f"results: {plan.run_dir / 'results.csv'}, weights: {plan.run_dir / 'weights'}")
        _fail_on_bad_exits(report, run)


@dataclass(frozen=True)
class _Launch:
    """What `start` and `ddp` share: the backend made ready, the GPUs it hands out, and the
    steps after the workers start (recording the launch, then following or printing hints)."""

    run: str
    project: Path
    values: dict[str, Any]
    workers: Backend
    gpus: list[int]
    console: Console

    @classmethod
    def open(cls, project: Path, run: str, backend: str, build: bool, values: dict[str, Any], what: str) -> _Launch:
        if backend == "auto" and _recorded_backend(run_directory(project, run)) == "swarm":
            backend = "swarm"  # auto never picks the swarm, but a swarm run is resumed there, not beside it
        if values.get("constraints") and backend != "swarm":
            raise UserError("--constraint places Swarm services: use it with --backend swarm")
        console, notices = _console(), _console(stderr=True)
        workers = open_backend(backend, project, settings_from(values, build), lambda text: notices.print(text))
        with console.status(f"preparing {what.format(backend=workers.name)}") as spinner:
            workers.prepare(show_build_progress(console, spinner))
            gpus = choose_gpus(values["gpus"], workers)
        return cls(run, project, values, workers, gpus, console)

    def say(self, text: str) -> None:
        self.console.print(text, style="dim")

    def record(self, run_dir: Path, keys: tuple[str, ...], generations: int, search_space: str | None,
               **ddp: Any) -> None:
        image = self.values["image"] if self.workers.name in ("docker", "swarm") else None
        LaunchRecord(self.run, self.workers.name, keys, generations, _host_file(self.values["hyp"]),
                     _host_file(search_space), image, **ddp).save(run_dir)

    def follow(self, run_dir: Path, first_key: str, default_project: Path, wait: bool) -> StatusReport | None:
        """With --wait, the live view until every worker exits (its last report); else the next commands."""
        if wait:
            return follow_run(self.console, lambda: _report(self.workers, self.run, run_dir), until_exited=True)
        where = _where(self.run, self.project, default_project)
        for what, command in (("watch", "status --watch"), ("attach", f"attach {first_key}"), ("stop", "stop")):
            self.console.print(f"  {what:<7} evolvectl {command} {where}")
        return None


def _recorded_backend(run_dir: Path) -> str | None:
    record = LaunchRecord.load(run_dir)
    return record.backend if record is not None else None


def _check_evolution_flags(options: TrainerOptions, generations: int, run_dir: Path) -> None:
    """What every worker would refuse (a flag the trainer does not know, a hyp value out of range,
    a search space or population that does not fit the run), as one error before any starts."""
    from orchestrator.evolution.command import (
        check_evolution_arguments,  # imports torch: only for a run
    )

    check_evolution_arguments(options.arguments(generations), run_dir)


def _check_ddp_request(gpus: str | None, cpu_procs: int, batch_size: int | None, nnodes: int) -> None:
    """What can be checked before any engine is asked: one kind of device, and a batch that divides."""
    check_devices(gpus is not None, cpu_procs)
    count = cpu_procs or (None if gpus is None or gpus.lower() == "all" else len(parse_gpu_spec(gpus, None)))
    if count is not None:
        check_batch_size(batch_size, count, cpu_procs == 0, nnodes)


def _fail_on_bad_exits(report: StatusReport, run: str) -> None:
    failed = [row for row in report.workers if row.exit_code not in (0, None)]
    if failed:
        worker = failed[0]
        raise UserError(f"worker {worker.key} exited with code {worker.exit_code}: "
                        f"see `evolvectl logs {worker.key} --name {run}`")



@main.command(context_settings=CONTEXT)
@run_options
@backend_option
@click.option("--watch", "-w", is_flag=True, help="refresh until Ctrl-C")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, help="seconds between refreshes")
def status(project: Path, name: str | None, backend: str, watch: bool, interval: float) -> None:
    """One row per worker (state, restarts, generation, epoch, fitness), the budget, best fitness and ETA."""
    run, run_dir = existing_run_dir(project, name)
    console = _console()
    workers = backend_for_run(backend, project, run_dir, WorkerSettings(), lambda text: None)
    if not watch:
        console.print(render_status(_report(workers, run, run_dir)))
        return
    follow_run(console, lambda: _report(workers, run, run_dir), until_exited=False, interval=interval)


@main.command(context_settings=CONTEXT)
@click.argument("worker")
@run_options
@backend_option
@click.option("--tail", type=click.IntRange(min=0), default=50, help="lines of history shown first")
def attach(worker: str, project: Path, name: str | None, backend: str, tail: int) -> None:
    """Stream a worker's live output; Ctrl-C detaches and the worker keeps running.

    WORKER is a GPU index (3 or gpu3), a CPU worker (cpu0) or ddp (a DDP training).
    """
    key = parse_worker_key(worker)
    run, run_dir = existing_run_dir(project, name)
    workers = backend_for_run(backend, project, run_dir, WorkerSettings(), lambda text: None)
    workers.output(run, run_dir, key, _write_raw, follow=True, tail=tail)
    states = {state.key: state for state in workers.workers(run, run_dir)}
    state = states.get(key)
    if state is not None and state.state in ACTIVE_STATES:
        _console(stderr=True).print(f"\ndetached from {key}; it keeps running", style="dim")
    elif state is not None:
        _console(stderr=True).print(f"\n{key} is {state.state} (exit code {state.exit_code})", style="dim")


@main.command(context_settings=CONTEXT)
@click.argument("worker")
@run_options
@backend_option
@click.option("--follow", "-f", is_flag=True, help="keep printing new output (Ctrl-C stops)")
@click.option("--tail", type=click.IntRange(min=0), default=None, help="only the last N lines")
def logs(worker: str, project: Path, name: str | None, backend: str, follow: bool, tail: int | None) -> None:
    """Print a worker's output so far (WORKER: 3, gpu3, cpu0 or ddp)."""
    key = parse_worker_key(worker)
    run, run_dir = existing_run_dir(project, name)
    workers = backend_for_run(backend, project, run_dir, WorkerSettings(), lambda text: None)
    workers.output(run, run_dir, key, _write_raw, follow=follow, tail=tail)


def _write_raw(text: str) -> None:
    """Output as the worker wrote it (carriage returns and colours included), at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


@main.command(context_settings=CONTEXT)
@run_options
@backend_option
@click.option("--now", is_flag=True, help="kill the workers at once instead of after their generation")
def stop(project: Path, name: str | None, backend: str, now: bool) -> None:
    """Stop a run: each worker finishes its current generation, then exits (--now: kill them).

    A DDP training finishes its current epoch, saves weights/last.pt and exits.
    """
    run, run_dir = existing_run_dir(project, name)
    if is_ddp_run(run_dir):
        _stop_training(backend_for_run(backend, project, run_dir, WorkerSettings(), lambda text: None),
                       run, run_dir, now)
        return
    Journal(run_dir).request_stop()  # also keeps a restarting worker from training again
    console = _console()
    if not now:
        console.print(f"run {run}: workers exit after their current generation; "
                      f"`evolvectl status --name {run}` shows them go, `evolvectl start` resumes")
        return
    workers = backend_for_run(backend, project, run_dir, WorkerSettings(), lambda text: None)
    killed = workers.kill(run, run_dir)
    console.print(f"run {run}: killed {', '.join(killed) or 'no live workers'}; their generations are retried "
                  "when the run is started again")


def _stop_training(workers: Backend, run: str, run_dir: Path, now: bool) -> None:
    console = _console()
    resume = f"`evolvectl ddp --name {run}` with the same devices resumes it"
    if now:
        killed = workers.kill(run, run_dir)
        console.print(f"run {run}: killed {', '.join(killed) or 'no live training'}; {resume} from its last epoch")
        return
    asked = workers.terminate(run, run_dir)
    if not asked:
        console.print(f"run {run}: no live training to stop")
        return
    console.print(f"run {run}: the training finishes its current epoch, saves {run_dir / CHECKPOINT} and exits; "
                  f"`evolvectl status --name {run}` shows it go, {resume}")


@main.command("kill-all", context_settings=CONTEXT)
@click.option("--run", "--name", "run", default=None, help="only this run's workers (default: every run)")
@click.option("--project", type=click.Path(path_type=Path), default=DEFAULT_PROJECT, envvar="EVOLVECTL_PROJECT",
              help="folder holding the runs of local workers (the default covers runs/train too)")
@click.option("--backend", type=click.Choice(CHOICES), default="auto", envvar="EVOLVECTL_BACKEND",
              help="auto: containers (when an engine answers), Swarm services (when it is a swarm manager) "
                   "and local workers")
def kill_all(run: str | None, project: Path, backend: str) -> None:
    """Kill and remove every evolvectl worker (of one run with --run); nothing else is touched."""
    if run is not None:
        check_run_name(run)
    removed: list[str] = []
    if backend in ("auto", "docker"):
        removed += _remove_containers(run, required=backend == "docker")
    if backend in ("auto", "swarm"):
        removed += _remove_services(run, required=backend == "swarm")
    if backend in ("auto", "local"):
        for place in searched_projects(project):
            removed += open_backend("local", place, WorkerSettings(), lambda text: None).remove_all(run)
    _console().print(f"removed {len(removed)} worker(s)" + (f": {', '.join(removed)}" if removed else ""))


def _remove_containers(run: str | None, required: bool) -> list[str]:
    from orchestrator.backends.docker.engine import connect
    from orchestrator.backends.docker.engine import kill_all as remove_containers

    try:
        client = connect()
    except UserError:
        if required:
            raise
        return []  # no engine, no containers
    return remove_containers(client, run)


def _remove_services(run: str | None, required: bool) -> list[str]:
    """Our Swarm services, where this engine manages a swarm (required: it must)."""
    from orchestrator.backends.docker.engine import connect
    from orchestrator.backends.docker.swarm import (
        check_manager,
        remove_services,
        swarm_role,
    )

    try:
        client = connect()
    except UserError:
        if required:
            raise
        return []
    if required:
        check_manager(client)
    elif swarm_role(client) != "manager":
        return []
    return remove_services(client, run)


@main.command(context_settings=CONTEXT)
@run_options
@click.option("--top", type=click.IntRange(min=1), default=5, help="rows of the table")
def results(project: Path, name: str | None, top: int) -> None:
    """The fittest generations, the best hyperparameters (hyp_evolve.yaml) and the plots.

    For a DDP training: its epochs, mAP and where its results.csv and weights are.
    """
    run, run_dir = existing_run_dir(project, name)
    if is_ddp_run(run_dir):
        progress = collect_training_status(run, run_dir, "", ()).progress
        _console().print(render_progress(progress), f"results: {run_dir / 'results.csv'}, "
                         f"weights: {run_dir / 'weights'}", sep="\n")
        return
    print_results(_console(), run, run_dir, top)


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
    _check_evolution_flags(trainer_options(values), values["generations"], run_directory(project, run))
    plan = LaunchPlan(run, project, tuple(worker_slots(gpus, values["cpu_workers"])), values["generations"],
                      trainer_options(values))
    if stack:
        check_stack_names(run, plan.slots)  # before anything is written
    staged = stage_for_containers(plan.options, run, plan.run_dir)
    specs = worker_specs(plan, staged, values["image"], host_user(), settings_from(values).limits,
                         values["max_restarts"])
    if stack:
        output = output or Path(f"stack.{run}.yaml")
        start_command = _write_stack(output, run, _where(run, project, DEFAULT_PROJECT), specs, values["constraints"])
    else:
        output = output or Path(f"compose.{run}.yaml")
        start_command = _write_compose(output, run, specs, values["base_image"])
    Journal(plan.run_dir).clear_stop()
    LaunchRecord(run, "swarm" if stack else "docker", tuple(slot.key for slot in plan.slots), plan.generations,
                 _host_file(values["hyp"]), _host_file(values["search_space"]), values["image"]).save(plan.run_dir)
    _console().print(f"wrote {output} ({len(specs)} services); start it with: {start_command}")


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
