"""`python -m orchestrator.backends.local.supervisor`: one local worker, restarted after a failure
like Docker's on-failure.

The local backend starts this detached, in its own session, with the worker's command after
`--`. It records the worker's state in a JSON file (pid, restarts, exit code) that status,
stop and kill-all read. A clean exit (0: budget reached or stop requested) ends it; a
failure restarts the worker up to `--max-restarts` times, and the journal's leases hand the
lost generation out again. A supervisor that is killed takes its worker with it (SIGTERM, so
the generation in progress is finished and recorded): `start` then runs a new pair, never a
second worker beside an orphan.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer.errors import CannotWrite
from trainer.files import write_atomic

# A short pause before a restart, so a worker that fails at once does not spin.
RESTART_DELAY_S = 1.0


def _terminate_with_parent() -> None:
    """In the worker, before it runs: Linux sends it SIGTERM when the supervisor dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def write_state(path: Path, **state: Any) -> None:
    write_atomic(path, (json.dumps(state, sort_keys=True) + "\n").encode())


def supervise(command: list[str], state_path: Path, max_restarts: int) -> int:
    """Run `command` until it exits 0, is stopped, cannot write (exit 74), or has failed
    `max_restarts` + 1 times."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signal_number: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal_number)  # the worker finishes its generation and exits

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts = 0
    while True:
        child = subprocess.Popen(command, preexec_fn=_terminate_with_parent)  # noqa: PLW1509 - no threads here
        if stopping:  # the stop came while the previous child was gone and this one not yet started
            child.send_signal(signal.SIGTERM)
        write_state(state_path, state="running", pid=os.getpid(), child=child.pid, restarts=restarts)
        exit_code = child.wait()
        if exit_code in (0, CannotWrite.exit_code) or stopping or restarts >= max_restarts:  # a full disk stays full
            break
        restarts += 1
        write_state(state_path, state="restarting", pid=os.getpid(), exit_code=exit_code, restarts=restarts)
        print(f"[evolvectl] worker exited with code {exit_code}; restart {restarts} of {max_restarts}",
              file=sys.stderr, flush=True)
        time.sleep(RESTART_DELAY_S)
        if stopping:  # stopped during the pause: no new worker
            break
    write_state(state_path, state="exited", pid=os.getpid(), exit_code=exit_code, restarts=restarts)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.backends.local.supervisor", description=__doc__)
    parser.add_argument("--state", type=Path, required=True, help="the worker's state file (JSON)")
    parser.add_argument("--max-restarts", type=int, default=3)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker's command")
    options = parser.parse_args(argv)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("give the worker's command after --")
    return supervise(command, options.state, options.max_restarts)


if __name__ == "__main__":
    sys.exit(main())
