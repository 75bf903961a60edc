"""Containerized multi-GPU hyperparameter evolution for YOLO-family detectors.

Four layers, each in its own folder, with dependencies pointing one way (tests/test_layers.py):
- `cli`: the `evolvectl` commands; the only code that talks to the terminal (click, rich).
- `backends`: where workers run: `docker` (the only user of the Docker SDK) or `local` processes.
- `runs`: runs as plans and records: names, what `start` and `ddp` ask for, launch.json, the
  input files staged for workers, and the status read back from a run folder.
- `evolution`: what runs inside every worker: the search space and GA, the locked journal
  (evolve.csv) with its leases, the worker loop, the derived files, and the trainer as the
  objective (`python -m orchestrator.evolution` is the worker's entry point).

The trainer (`trainer/`) is a library below all of them and imports nothing from here.
"""

__version__ = "0.1.0"
