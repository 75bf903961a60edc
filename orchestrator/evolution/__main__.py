"""`python -m orchestrator.evolution`: this process becomes one worker of a shared evolution."""

from orchestrator.evolution.command import main

main()
