"""Starting work: `start` (an evolution) and `ddp` (one training over several GPUs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from orchestrator.backends.base import Backend, open_backend
from orchestrator.cli.group import CONTEXT, main, open_console, report, run_flags
from orchestrator.cli.options import (
    DEFAULT_RUN,
    backend_option,
    constraint_option,
    ddp_options,
    ddp_trainer_options,
    launch_options,
    settings_from,
    trainer_options,
)
from orchestrator.cli.views import follow_run, print_results, show_build_progress
from orchestrator.evolution.journal import Journal
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
    run_directory,
    worker_slots,
)
from orchestrator.runs.record import DDP_MODE, LaunchRecord
from orchestrator.runs.status import StatusReport
from orchestrator.runs.storage import lock_warning
from trainer.errors import UserError


def choose_gpus(spec: str | None, backend: Backend) -> list[int]:
    """The GPUs asked for, checked against what the backend can hand out."""
    if spec is None:
        return []
    available = backend.visible_gpus()
    if available == []:
        where = {
            "docker": "the Docker engine cannot hand out GPUs (no NVIDIA runtime: "
                      "install the NVIDIA Container Toolkit)",
            "swarm": "no ready node of the swarm advertises an NVIDIA-GPU generic resource (see the README's "
                     "Swarm section)",
        }.get(backend.name, "PyTorch sees no CUDA GPU on this host")
        raise UserError(f"--gpus {spec}: {where}; run CPU workers with --cpu-workers N")
    return parse_gpu_spec(spec, available)


def host_file(value: str | None) -> str | None:
    """A file given on the command line, made absolute so results can read it from anywhere."""
    return str(Path(value).absolute()) if value is not None and Path(value).is_file() else value


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
    check_evolution_flags(trainer_options(values), values["generations"], run_directory(project, run))
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
        console, notices = open_console(), open_console(stderr=True)
        workers = open_backend(backend, project, settings_from(values, build), notices.print)
        with console.status(f"preparing {what.format(backend=workers.name)}") as spinner:
            workers.prepare(show_build_progress(console, spinner))
            gpus = choose_gpus(values["gpus"], workers)
        return cls(run, project, values, workers, gpus, console)

    def say(self, text: str) -> None:
        self.console.print(text, style="dim")

    def record(self, run_dir: Path, keys: tuple[str, ...], generations: int, search_space: str | None,
               **ddp: Any) -> None:
        image = self.values["image"] if self.workers.name in ("docker", "swarm") else None
        LaunchRecord(self.run, self.workers.name, keys, generations, host_file(self.values["hyp"]),
                     host_file(search_space), image, **ddp).save(run_dir)

    def follow(self, run_dir: Path, first_key: str, default_project: Path, wait: bool) -> StatusReport | None:
        """With --wait, the live view until every worker exits (its last report); else the next commands."""
        if wait:
            return follow_run(self.console, lambda: report(self.workers, self.run, run_dir), until_exited=True)
        where = run_flags(self.run, self.project, default_project)
        for what, command in (("watch", "status --watch"), ("attach", f"attach {first_key}"), ("stop", "stop")):
            self.console.print(f"  {what:<7} evolvectl {command} {where}")
        return None


def _recorded_backend(run_dir: Path) -> str | None:
    record = LaunchRecord.load(run_dir)
    return record.backend if record is not None else None


def check_evolution_flags(options: TrainerOptions, generations: int, run_dir: Path) -> None:
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
