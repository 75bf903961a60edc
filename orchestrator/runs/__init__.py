"""Runs as plans and records: names, what `start` and `ddp` ask for, `launch.json`, the staged
input files and the status read back from a run folder. No backend and no terminal code."""
