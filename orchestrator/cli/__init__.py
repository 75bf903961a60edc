"""The `evolvectl` command line: the only layer that talks to the terminal (click and rich)."""

from orchestrator.cli.commands import main

__all__ = ["main"]
