"""Run-wide names: the project's name, run names (which name containers too) and worker names."""

from __future__ import annotations

import re

from trainer.errors import UserError

PROJECT = "evolvectl"
DDP_KEY = "ddp"
# Docker's own rule for container names, which embed the run name.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_run_name(run: str) -> str:
    """A run name becomes part of container names, so it must follow Docker's naming rule."""
    if not _NAME_PATTERN.fullmatch(run):
        raise UserError(
            f"run name {run!r} cannot name a container: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    return run


def worker_name(run: str, gpu: int | None, slot: int) -> str:
    """`evolvectl-<run>-gpu<k>` for the worker on GPU k, `evolvectl-<run>-cpu<slot>` otherwise."""
    device = f"gpu{gpu}" if gpu is not None else f"cpu{slot}"
    return f"{PROJECT}-{check_run_name(run)}-{device}"


def ddp_name(run: str) -> str:
    """`evolvectl-<run>-ddp`: the one container of a DDP training on this host."""
    return f"{PROJECT}-{check_run_name(run)}-{DDP_KEY}"
