"""`evolvectl ddp` as a plan: one DDP training over the chosen GPUs, whatever runs it.

The job on a host is a single worker, keyed `ddp`: a container holding all of the chosen GPUs
(inside it they are devices 0 to n-1), or a supervised local process. Its command is the
trainer with `--device 0,1,...`, which starts torchrun itself on a free port; with
`--cpu-procs N` it is torchrun with N processes on CPU (the trainer alone would start one).
The trainer writes into the run folder, `<project>/<run>` (default `runs/train/<run>`):
results.csv, opt.yaml, weights/last.pt and best.pt.

A job that starts again (Docker's on-failure restart, the local supervisor's, or
`evolvectl ddp` run again) continues from its own weights/last.pt: the command goes through
a one-line shell wrapper that adds `--resume <last.pt>` when that file exists.

Several hosts: run `evolvectl ddp` on each with the same --nnodes, --master-addr (the
--node-rank 0 host) and --master-port, and its own --node-rank. Their containers use the
host's network, so that the rendezvous port and the NCCL connections reach across hosts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.runs.names import check_run_name
from orchestrator.runs.plan import TrainerOptions, run_directory
from orchestrator.runs.status import epochs_done, planned_epochs, read_results
from trainer.config import TrainConfig
from trainer.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# torchrun's own default; the trainer uses it too when several hosts are given no port.
MULTI_NODE_PORT = 29500
# `$0` is the checkpoint, `$@` the job's command: resume when a previous attempt saved one.
RESUME_SCRIPT = 'if [ -f "$0" ]; then exec "$@" --resume "$0"; fi; exec "$@"'
CHECKPOINT = "weights/last.pt"


@dataclass(frozen=True)
class Rendezvous:
    """Where a job's processes meet: on this host alone, or as host `node_rank` of `nnodes`."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port on one host; torchrun's 29500 across hosts

    def __post_init__(self) -> None:
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank}: the hosts of --nnodes {self.nnodes} are ranked 0 "
                            f"to {self.nnodes - 1}")
        if self.nnodes > 1 and self.master_addr in LOOPBACK:
            raise UserError(f"--nnodes {self.nnodes} needs --master-addr: the address of the --node-rank 0 host, "
                            "reachable from every other host")

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    def trainer_flags(self) -> list[str]:
        """For the trainer, which starts torchrun itself (GPUs)."""
        if not self.multi_node:
            return ["--master-port", str(self.master_port)] if self.master_port else []
        return ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                "--master-addr", self.master_addr, "--master-port", str(self.master_port or MULTI_NODE_PORT)]

    def torchrun_flags(self) -> list[str]:
        """For torchrun started by us (CPU processes); alone on a host, torchrun picks a free port."""
        if not self.multi_node and not self.master_port:
            return ["--standalone"]
        return [f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}", f"--master_addr={self.master_addr}",
                f"--master_port={self.master_port or MULTI_NODE_PORT}"]


@dataclass(frozen=True)
class DdpPlan:
    """One DDP training, checked: on the host's `gpus`, or in `cpu_procs` processes on CPU."""

    run: str
    project: Path
    gpus: tuple[int, ...] = ()
    cpu_procs: int = 0
    options: TrainerOptions = field(default_factory=TrainerOptions)
    rendezvous: Rendezvous = field(default_factory=Rendezvous)

    def __post_init__(self) -> None:
        check_run_name(self.run)
        check_devices(bool(self.gpus), self.cpu_procs)
        check_batch_size(self.options.batch_size, self.processes, self.cpu_procs == 0, self.rendezvous.nnodes)

    @property
    def processes(self) -> int:
        """Processes on this host: one per GPU, or `cpu_procs`."""
        return len(self.gpus) or self.cpu_procs

    @property
    def run_dir(self) -> Path:
        return run_directory(self.project, self.run)


def check_devices(gpus: bool, cpu_procs: int) -> None:
    if gpus == (cpu_procs > 0):
        raise UserError("a DDP training runs on GPUs or on CPU: pass --gpus (e.g. 0-3 or all) or --cpu-procs N, "
                        "not both")


def check_batch_size(batch_size: int | None, processes: int, on_gpus: bool, nnodes: int = 1) -> None:
    """The batch is the total over every process of every host: each must get the same share."""
    batch = batch_size if batch_size is not None else TrainConfig().batch_size
    world_size = processes * nnodes
    if batch % world_size == 0:
        return
    what = f"{processes} GPU{'s' if processes != 1 else ''}" if on_gpus else f"{processes} CPU processes"
    if nnodes > 1:
        what += f" on each of {nnodes} hosts"
    suggestion = world_size * max(1, round(batch / world_size))
    raise UserError(f"--batch-size {batch} is the total over {what} and must divide evenly: "
                    f"use a multiple of {world_size}, e.g. {suggestion}")


def job_command(plan: DdpPlan, options: TrainerOptions, project_dir: str, devices: str, python: str) -> list[str]:
    """The job on this host: the trainer (which starts torchrun for GPUs), or torchrun over CPU processes."""
    trainer = ["-m", "trainer", *options.training_arguments(), "--project", project_dir, "--name", plan.run,
               "--exist-ok", "--device", devices]  # exist-ok: the run folder is ours and already there
    if plan.gpus:
        return [python, *trainer, *plan.rendezvous.trainer_flags()]
    return [python, "-m", "torch.distributed.run", f"--nproc_per_node={plan.cpu_procs}",
            *plan.rendezvous.torchrun_flags(), *trainer]


def resuming(checkpoint: str) -> tuple[str, ...]:
    """A prefix for a job's command that resumes from `checkpoint` when it exists."""
    return ("sh", "-c", RESUME_SCRIPT, checkpoint)


def job_environment(plan: DdpPlan) -> dict[str, str]:
    """Provenance, and CPU threads shared among CPU processes."""
    return {"EVOLVECTL_GPUS": ",".join(map(str, plan.gpus))} if plan.gpus else {
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // plan.cpu_procs))}


def trained_epochs(run: str, run_dir: Path) -> int:
    """Epochs a previous attempt trained (0 for a new run); a finished run is refused, not retrained."""
    if not (run_dir / CHECKPOINT).is_file():
        return 0
    done, epochs = epochs_done(read_results(run_dir)), planned_epochs(run_dir)
    if epochs is not None and done >= epochs:
        raise UserError(f"run {run} already trained its {epochs} epochs (results in {run_dir}): "
                        "pass another --name to train again")
    return done
