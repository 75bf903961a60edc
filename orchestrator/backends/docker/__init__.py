"""The Docker backend: container specs as plain data, the engine calls, GPUs, compose files."""
