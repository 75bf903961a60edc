"""Containerized multi-GPU hyperparameter evolution for YOLO-family detectors.

Many workers, one per GPU, evolve one population through a shared, locked run
directory: `search_space` declares what may change, `ga` proposes children, `journal`
owns the evolve files, `leases` hands out the global budget, `worker` runs the loop and
`outputs` recomputes the best hyp, plots and summary from the journal.
"""

__version__ = "0.1.0"
