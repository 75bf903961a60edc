"""The processes of a DDP job, found through /proc: its ranks, signalled directly, and its whole tree.

torchrun is the wrong target for a graceful stop. It answers SIGTERM by signalling each
rank's whole process group, dataloader workers included, which die mid-epoch and take the
rank down with them; and it SIGKILLs whatever still runs 30 s later (a limit only recent
torch releases let one raise). So `evolvectl stop` sends SIGTERM to the ranks themselves,
the children of the torchrun agent: each finishes its epoch, rank 0 saves last.pt, they
exit 0, and torchrun with them.

For the same reason killing a local job must reach every process of its tree: torchrun
starts each rank in a session of its own, out of reach of a signal to the supervisor's group.

`python -m trainer.ranks` does the stop inside a container, where pid 1 is the root.
Without /proc (macOS) nothing is found, and callers fall back to signalling the root.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
AGENT_MODULE = "torch.distributed.run"
AGENT_SCRIPT = "torchrun"
_OPTIONS_WITH_VALUES = ("-X", "-W")  # the interpreter's options whose value is the next argument


@dataclass(frozen=True)
class ProcessInfo:
    parent: int
    argv: tuple[str, ...]


def process_table(proc: Path = PROC) -> dict[int, ProcessInfo]:
    """Every process /proc shows: its parent and its command line."""
    table = {}
    for entry in proc.glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # it exited while we looked
        # The command name in parentheses may itself hold spaces and parentheses: split after the last one.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = ProcessInfo(parent, tuple(part.decode(errors="replace") for part in argv if part))
    return table


def descendants(root: int, table: dict[int, ProcessInfo]) -> list[int]:
    """Children, grandchildren, ... of `root`, parents before their children."""
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.parent, []).append(pid)
    found, pending = [], sorted(children.get(root, []))
    while pending:
        pid = pending.pop(0)
        found.append(pid)
        pending += sorted(children.get(pid, []))
    return found


def is_agent(argv: Sequence[str]) -> bool:
    """Whether the process runs torchrun: `python [options] -m torch.distributed.run` or the `torchrun` script.

    Only what the interpreter itself runs counts: a supervisor whose command line merely
    carries a torchrun command for its child is not an agent.
    """
    if argv and Path(argv[0]).name == AGENT_SCRIPT:
        return True
    index = 1
    while index < len(argv):
        part = argv[index]
        if part == "-m":
            return tuple(argv[index + 1:index + 2]) == (AGENT_MODULE,)
        if not part.startswith("-"):
            return Path(part).name == AGENT_SCRIPT
        if part == "-c":
            return False
        index += 2 if part in _OPTIONS_WITH_VALUES else 1
    return False


def rank_processes(root: int, table: dict[int, ProcessInfo]) -> list[int]:
    """The training processes under `root`: the children of every torchrun agent below it."""
    tree = [root, *descendants(root, table)]
    agents = {pid for pid in tree if pid in table and is_agent(table[pid].argv)}
    return [pid for pid in tree if pid in table and table[pid].parent in agents]


def signal_ranks(root: int, signal_number: int, proc: Path = PROC) -> list[int]:
    """Send `signal_number` to each rank under `root` (not to its group); returns their pids."""
    signalled = []
    for pid in rank_processes(root, process_table(proc)):
        try:
            os.kill(pid, signal_number)
        except (ProcessLookupError, PermissionError):
            continue
        signalled.append(pid)
    return signalled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.ranks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=int, default=1, help="the process whose tree holds the job")
    parser.add_argument("--signal", default="TERM", help="signal name; 0 only lists the ranks")
    options = parser.parse_args(argv)
    name = options.signal.upper().removeprefix("SIG")
    signal_number = 0 if name == "0" else int(signal.Signals[f"SIG{name}"])
    ranks = signal_ranks(options.root, signal_number)
    print(" ".join(map(str, ranks)) or "no ranks found", flush=True)
    return 0 if ranks else 1


if __name__ == "__main__":
    sys.exit(main())
