"""Complete, atomically written checkpoints: everything `--resume` needs and nothing pickled; and
starting weights for `--weights`, from these or from YOLOv5's."""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.files import atomic_output, read_yaml
from trainer.paths import CONFIGS
from trainer.yolov5_weights import read_yolov5_weights

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that a reader never sees a half-written file.

    The temp file lives in the same folder so `os.replace` is an atomic rename.
    """
    with atomic_output(path) as stream:
        torch.save({"format_version": FORMAT_VERSION, **state}, stream)


def existing_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: pass a last.pt from a run's weights/ folder")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """One of this trainer's checkpoints, whole: what `--resume` needs."""
    path = existing_checkpoint(path)
    try:
        return _read_own(path)
    except pickle.UnpicklingError:  # torch's message is a page on weights_only; this is what matters
        raise UserError(
            f"{path} is not an evolvectl checkpoint: torch's safe loader refuses it (YOLOv5's .pt files, for one, "
            "hold whole pickled models, not only tensors); pass a last.pt or best.pt written by evolvectl"
        ) from None


@dataclass(frozen=True)
class Weights:
    """Starting weights for `--weights`, and the model config they were trained with."""

    path: Path
    state: dict[str, torch.Tensor]
    model_config: str | dict[str, Any]  # ours: a bundled name or YAML path; YOLOv5's: the config itself

    def model_name(self) -> str:
        """The --cfg these weights were trained with; a YOLOv5 config must be one of the bundled ones."""
        if isinstance(self.model_config, str):
            return self.model_config
        architecture = ("depth_multiple", "width_multiple", "backbone", "head")
        for config in sorted((CONFIGS / "models").glob("*.yaml")):
            bundled = read_yaml(config, "model config")
            if all(bundled.get(key) == self.model_config.get(key) for key in architecture):
                return config.stem
        raise UserError(f"{self.path} was trained from a model config that is not bundled here: "
                        "pass that YAML with --cfg")


def load_weights(path: str | Path) -> Weights:
    """Weights from one of this trainer's checkpoints (its EMA when it has one) or from a YOLOv5
    checkpoint such as yolov5s.pt, read without running anything pickled in it.

    The last file read is kept while it is unchanged: a run reads it for its model name and then
    for its model, and an evolution builds a model from it every generation. Callers copy the
    tensors into their model and never change them.
    """
    path = existing_checkpoint(path)
    status = path.stat()
    return _load_weights(path, path.resolve(), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _load_weights(path: Path, resolved: Path, size: int, modified_ns: int) -> Weights:
    """`load_weights` for one version of one file (the key); `path` as the user gave it, for messages."""
    try:
        state = _read_own(path)
    except pickle.UnpicklingError:
        imported = read_yolov5_weights(path)
        if imported is None:
            raise UserError(
                f"{path} is neither an evolvectl nor a YOLOv5 checkpoint: torch's safe loader refuses it, and it "
                "holds no YOLOv5 model; pass a last.pt or best.pt from evolvectl or YOLOv5"
            ) from None
        return Weights(path, imported["model"], imported["model_yaml"])
    weights = (state.get("ema") or {}).get("module") or state["model"]
    return Weights(path, weights, state.get("config", {}).get("cfg", TrainConfig.cfg))


def _read_own(path: Path) -> dict[str, Any]:
    """torch's safe load of one of our checkpoints; a file it refuses raises UnpicklingError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise
    except Exception as error:  # torch raises many kinds for a damaged file
        message = str(error).strip()  # the first sentence: torch goes on for a paragraph
        reason = message.split(". ")[0].splitlines()[0] if message else type(error).__name__
        raise UserError(f"checkpoint {path} cannot be read ({reason}): it may be truncated or damaged") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not an evolvectl checkpoint (no 'model' state)")
    return state
