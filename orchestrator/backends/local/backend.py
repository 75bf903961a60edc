"""The local backend: workers as detached processes on this host, for hosts without Docker.

Each worker is `python -m orchestrator.backends.local.supervisor -- python -m orchestrator.evolution ...`,
started in its own session (so it outlives the command that started it, and one signal to
its process group reaches the trainer and its dataloader processes). Its files live in the
run folder: `workers/<key>.json` (state: pid, restarts, exit code) and `workers/<key>.log`
(everything it prints). Attach follows the log; stop, kill-all and status read the state.
A DDP training is one such worker, keyed `ddp`, whose command is the whole job (the
trainer starting torchrun, or torchrun over CPU processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orchestrator
from orchestrator.backends.base import DEFAULT_MAX_RESTARTS
from orchestrator.backends.local.supervisor import write_state
from orchestrator.runs.ddp import (
    CHECKPOINT,
    DdpPlan,
    job_command,
    job_environment,
    resuming,
)
from orchestrator.runs.inputs import stage_local
from orchestrator.runs.names import DDP_KEY
from orchestrator.runs.plan import LaunchPlan, WorkerSlot
from orchestrator.runs.status import ACTIVE_STATES, WorkerState
from trainer.cpus import WORKERS_ON_HOST
from trainer.errors import UserError
from trainer.ranks import descendants, process_table, signal_ranks

WORKER_COMMAND = (sys.executable, "-m", "orchestrator.evolution")
SUPERVISOR_MODULE = "orchestrator.backends.local.supervisor"
# Exit status reported for a killed worker: what a shell and Docker report after SIGKILL.
KILLED_EXIT_CODE = 137
TAIL_BYTES = 8192
FOLLOW_POLL_S = 0.25
# SIGKILL is delivered asynchronously; kill waits this long for the process to be gone.
KILL_WAIT_S = 2.0
# Under a run folder: one state file and one log per local worker.
WORKERS_DIR = "workers"

Write = Callable[[str], None]


def process_alive(pid: int) -> bool:
    """True while the supervisor `pid` runs (not a zombie, not a reused pid)."""
    if pid <= 0:
        return False  # unknown; and waitpid/kill would read -1 and 0 as "any process"
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our own ended child
        if reaped:
            return False
    except ChildProcessError:
        pass  # not our child: the kernel or its real parent reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True  # no /proc (macOS): the pid is all there is to go on
    try:
        return SUPERVISOR_MODULE.encode() in (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # being replaced right now, or gone: treated as not started


class LocalBackend:
    """Workers as supervised local processes running `worker_command` (default: this Python's evolution worker)."""

    name = "local"

    def __init__(
        self,
        project: Path,
        worker_command: Sequence[str] | None = None,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
    ) -> None:
        self.project = project
        self.worker_command = tuple(worker_command or WORKER_COMMAND)
        self.max_restarts = max_restarts

    def prepare(self, say: Write) -> None:
        """Nothing to build: the workers run this interpreter's packages."""

    def visible_gpus(self) -> list[int]:
        import torch  # only when GPUs are asked for: importing torch takes seconds

        return list(range(torch.cuda.device_count()))

    def start(self, plan: LaunchPlan, say: Write) -> list[str]:
        """Start the run's missing workers; live ones are left alone. Returns the keys started."""
        staged = stage_local(plan.options)
        arguments = staged.options.arguments(plan.generations)
        workers_dir = plan.run_dir / WORKERS_DIR
        workers_dir.mkdir(parents=True, exist_ok=True)
        started: dict[str, int] = {}
        try:
            for slot in plan.slots:
                state = _read_json(workers_dir / f"{slot.key}.json")
                if state is not None and state.get("state") in ACTIVE_STATES and process_alive(state["pid"]):
                    continue
                started[slot.key] = self._spawn(plan, slot, arguments, workers_dir)
        except BaseException:
            for key, pid in started.items():  # nothing half-started: the workers this call made go again
                _kill_group(pid)
                (workers_dir / f"{key}.json").unlink(missing_ok=True)
            raise
        return list(started)

    def _spawn(self, plan: LaunchPlan, slot: WorkerSlot, arguments: list[str], workers_dir: Path) -> int:
        device = "cpu" if slot.gpu is None else str(slot.gpu)
        worker = [*self.worker_command, "--evolve", *arguments, "--project", str(plan.project.absolute()),
                  "--name", plan.run, "--worker-id", slot.worker_id(plan.run), "--device", device]
        return self._supervise(slot.key, worker, workers_dir, _worker_environment(slot, plan))

    def _supervise(self, key: str, worker: list[str], workers_dir: Path, environment: dict[str, str]) -> int:
        """Start `worker` under a detached supervisor, logging to workers/<key>.log; returns its pid."""
        state_path = workers_dir / f"{key}.json"
        command = [sys.executable, "-m", SUPERVISOR_MODULE, "--state", str(state_path),
                   "--max-restarts", str(self.max_restarts), "--", *worker]
        log_path = workers_dir / f"{key}.log"
        with log_path.open("ab") as log:
            log.write(f"[evolvectl] {time.strftime('%Y-%m-%d %H:%M:%S')} starting {key}\n".encode())
            log.flush()
            try:
                process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, env=environment,
                )
            except OSError as error:
                raise UserError(f"cannot start local worker {key}: {error}") from None
        # Written after the fact, so it can (rarely) hide the supervisor's first "running": both count as live.
        write_state(state_path, state="starting", pid=process.pid, restarts=0)
        return process.pid

    def start_ddp(self, plan: DdpPlan, say: Write) -> list[str]:
        """Start the training unless it runs; returns ["ddp"] when it was started."""
        workers_dir = plan.run_dir / WORKERS_DIR
        workers_dir.mkdir(parents=True, exist_ok=True)
        state = _read_json(workers_dir / f"{DDP_KEY}.json")
        if state is not None and state.get("state") in ACTIVE_STATES and process_alive(state["pid"]):
            return []
        options = stage_local(plan.options).options
        devices = ",".join(map(str, plan.gpus)) or "cpu"  # this host's own GPU indices
        job = job_command(plan, options, str(plan.project.absolute()), devices, sys.executable)
        checkpoint = str(plan.run_dir / CHECKPOINT)
        environment = {**job_environment(plan), **_local_environment()}  # this host's own settings win
        pid = self._supervise(DDP_KEY, [*resuming(checkpoint), *job], workers_dir, environment)
        say(f"started {DDP_KEY}: local process {pid}" + (f" on GPUs {devices}" if plan.gpus else ""))
        return [DDP_KEY]

    def workers(self, run: str, run_dir: Path) -> list[WorkerState]:
        states = []
        for path in sorted((run_dir / WORKERS_DIR).glob("*.json")):
            state = _read_json(path) or {"state": "starting", "pid": -1}
            name = state.get("state", "starting")
            if name in ACTIVE_STATES and not process_alive(int(state.get("pid", -1))):
                name = "dead"  # killed without a chance to record it
            failed = state.get("exit_code") not in (0, None)
            tail = _log_tail(path.with_suffix(".log")) if name == "running" or failed else ""
            states.append(WorkerState(path.stem, f"evolvectl-{run}-{path.stem}", name, int(state.get("restarts", 0)),
                                      state.get("exit_code"), tail))
        return states

    def kill(self, run: str, run_dir: Path) -> list[str]:
        """Kill the run's live workers at once (stop --now); their state and logs stay."""
        killed = []
        for path, state in _live_workers(run_dir):
            _kill_group(int(state["pid"]))
            write_state(path, state="exited", pid=state["pid"], exit_code=KILLED_EXIT_CODE,
                        restarts=state.get("restarts", 0))
            killed.append(path.stem)
        return killed

    def terminate(self, run: str, run_dir: Path) -> list[str]:
        """Ask the run's live workers to finish their epoch, save and exit (a DDP training's stop)."""
        asked = []
        for path, state in _live_workers(run_dir):
            if not signal_ranks(int(state["pid"]), signal.SIGTERM):
                os.kill(int(state["pid"]), signal.SIGTERM)  # no ranks yet: the supervisor passes it on, then stops
            asked.append(path.stem)
        return asked

    def remove_all(self, run: str | None) -> list[str]:
        """Kill the workers of `run` (every run under the project if None) and forget them; logs stay."""
        pattern = f"{run}/{WORKERS_DIR}/*.json" if run else f"*/{WORKERS_DIR}/*.json"
        removed = []
        for path in sorted(self.project.glob(pattern)):
            state = _read_json(path)
            if state is not None and process_alive(int(state.get("pid", -1))):
                _kill_group(int(state["pid"]))
            path.unlink(missing_ok=True)
            removed.append(f"evolvectl-{path.parent.parent.name}-{path.stem}")
        return removed

    def output(self, run: str, run_dir: Path, key: str, write: Write, follow: bool, tail: int | None) -> None:
        """Print the worker's log (its last `tail` lines), then follow it until it exits or Ctrl-C."""
        log_path = run_dir / WORKERS_DIR / f"{key}.log"
        if not log_path.with_suffix(".json").exists():
            known = ", ".join(path.stem for path in sorted((run_dir / WORKERS_DIR).glob("*.json"))) or "none"
            raise UserError(f"run {run} has no worker {key}; its workers: {known}")
        with log_path.open("rb") as log:
            text = log.read().decode("utf-8", errors="replace")
            if tail is not None:
                text = "".join(text.splitlines(keepends=True)[-tail:])
            write(text)
            try:
                while follow:
                    chunk = log.read()
                    if chunk:
                        write(chunk.decode("utf-8", errors="replace"))
                        continue
                    if not any(w.key == key and w.state in ACTIVE_STATES for w in self.workers(run, run_dir)):
                        write(log.read().decode("utf-8", errors="replace"))
                        return
                    time.sleep(FOLLOW_POLL_S)
            except KeyboardInterrupt:
                return  # Ctrl-C detaches; the worker keeps running


def _live_workers(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The state file and state of each worker of the run whose supervisor is alive."""
    found = []
    for path in sorted((run_dir / WORKERS_DIR).glob("*.json")):
        state = _read_json(path)
        if state is not None and process_alive(int(state.get("pid", -1))):
            found.append((path, state))
    return found


def _kill_group(pid: int) -> None:
    # Listed first: killed processes' children are handed to init at once, out of the tree.
    tree = descendants(pid, process_table())
    try:
        os.killpg(pid, signal.SIGKILL)  # the supervisor leads its session: this reaches most of its processes
    except (ProcessLookupError, PermissionError):
        return
    for child in tree:  # torchrun puts each rank in a session of its own
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        try:
            # Our own child is reaped here even if it died before exec'ing the supervisor, when its
            # command line does not name it yet and process_alive would not recognise it.
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # not our child: its parent reaps it
            if not process_alive(pid):
                return
        time.sleep(0.02)


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as log:
            log.seek(max(0, path.stat().st_size - TAIL_BYTES))
            return log.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _local_environment() -> dict[str, str]:
    """This host's environment, with the project importable and output unbuffered."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    package_root = str(Path(orchestrator.__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
    return environment


def _worker_environment(slot: WorkerSlot, plan: LaunchPlan) -> dict[str, str]:
    """This host's environment, with the project importable and CPU workers sharing the cores."""
    environment = _local_environment()
    environment[WORKERS_ON_HOST] = str(len(plan.slots))  # loader processes share the host's CPUs
    if slot.gpu is not None:
        environment["EVOLVECTL_GPU"] = str(slot.gpu)
    else:
        cpu_workers = sum(other.gpu is None for other in plan.slots)
        environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cpu_workers)))
    return environment
