"""`python -m orchestrator`: the evolvectl command line."""

from orchestrator.cli.commands import main

main(prog_name="evolvectl")
