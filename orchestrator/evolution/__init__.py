"""The evolution core that runs in every worker: the search space and GA, the locked journal
with its leases, the worker loop, and the files derived from the journal. The objective
adapter (`objective`) is its one module that imports the trainer's training code."""
