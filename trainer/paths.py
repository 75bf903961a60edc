"""Where the project's bundled configs live, and how short names resolve to them."""

from __future__ import annotations

from pathlib import Path

from trainer.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KIND_NAMES = {"hyps": "hyp config", "models": "model config", "data": "data config", "evolve": "search space config",
              "weights": "weights"}
WHAT_TO_PASS = {"weights": "a last.pt or best.pt of evolvectl or YOLOv5, a YOLOv5 release name (yolov5s.pt)"}
SUFFIXES = {"weights": ".pt"}  # every other kind is YAML


def resolve_config(name: str | Path, kind: str) -> Path:
    """Find a config file given a path or a bundled short name.

    `kind` is the folder under configs/ (`hyps`, `models`, `data`, `evolve`, `weights`), so
    `resolve_config("yolov5s", "models")` finds configs/models/yolov5s.yaml and
    `resolve_config("yolov5n-synthetic", "weights")` configs/weights/yolov5n-synthetic.pt.
    """
    path = Path(name)
    if path.is_file():
        return path
    suffix = SUFFIXES.get(kind, ".yaml")
    for candidate in (CONFIGS / kind / path.name, CONFIGS / kind / f"{path.name}{suffix}"):
        if candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(p.stem for p in (CONFIGS / kind).glob(f"*{suffix}")))
    raise UserError(f"{KIND_NAMES.get(kind, kind)} '{name}' not found: pass {WHAT_TO_PASS.get(kind, 'a file path')} "
                    f"or a bundled one: {bundled}")

