"""Where the project's bundled configs live, and how short names resolve to them."""

from __future__ import annotations

from pathlib import Path

from trainer.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KIND_NAMES = {"hyps": "hyp", "models": "model", "data": "data", "evolve": "search space"}


def resolve_config(name: str | Path, kind: str) -> Path:
    """Find a config file given a path or a bundled short name.

    `kind` is the folder under configs/ (`hyps`, `models`, `data`, `evolve`), so
    `resolve_config("yolov5s", "models")` finds configs/models/yolov5s.yaml.
    """
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIGS / kind / path.name, CONFIGS / kind / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(p.stem for p in (CONFIGS / kind).glob("*.yaml")))
    raise UserError(f"{KIND_NAMES.get(kind, kind)} config '{name}' not found: pass a file path or one of: {bundled}")
