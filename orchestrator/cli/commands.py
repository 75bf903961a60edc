"""`evolvectl`: start, watch, stop and read a hyperparameter evolution, one worker per GPU.

Workers are named by GPU index (`3` or `gpu3`) or, for CPU workers, `cpu0`, `cpu1`, ...;
a DDP training (`evolvectl ddp`) has one worker, `ddp`. Commands on an existing run take it
from --name (default: the most recently started run under --project, which by default
means runs/evolve and runs/train) and use the backend it was started with.
"""


# Importing a module registers its commands on the group.
from orchestrator.cli import compose, launch, observe, stopping  # noqa: F401
from orchestrator.cli.group import main

__all__ = ["main"]
