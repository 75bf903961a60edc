"""`python -m orchestrator`: the evolvectl command line."""

from orchestrator.cli import main

main(prog_name="evolvectl")
