"""Complete, atomically written checkpoints: everything `--resume` needs and nothing pickled; and
starting weights for `--weights`, from these or from YOLOv5's."""

from __future__ import annotations

import functools
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from trainer.config import TrainConfig
from trainer.downloads import resolve_weights
from trainer.errors import UserError
from trainer.files import read_yaml, write_atomic
from trainer.paths import CONFIGS
from trainer.yolov5_weights import read_yolov5_weights

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that a reader never sees a half-written file.

    The temp file lives in the same folder so `os.replace` is an atomic rename. The checkpoint
    is serialized in memory first: torch.save writing to a full disk fails with its own
    RuntimeError, where a plain write says ENOSPC and names the file.
    """
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    write_atomic(path, buffer.getbuffer())


@dataclass(frozen=True)
class Checkpoint:
    """What a run saves after an epoch: everything `--resume` needs to go on as if uninterrupted.

    On disk it is one flat dict of tensors and plain values (`to_dict`), the layout every
    last.pt has had, so files written before this record existed resume, and `load_weights`
    and YOLOv5-style readers find `model` and `ema` where they always were.
    """

    epoch: int  # the last epoch trained, 0-based
    best_fitness: float  # -1 when no epoch has been validated yet
    best_epoch: int
    config: dict[str, Any]  # TrainConfig.as_dict(): the run's settings, to resume with
    model_yaml: dict[str, Any]  # the model's architecture
    names: list[str]  # the data's class names
    # TrainingParts.state_dict(): the model, EMA, optimiser, scheduler and scaler states and the step counter.
    training: dict[str, Any]

    TRAINING_KEYS: ClassVar[tuple[str, ...]] = ("model", "ema", "optimizer", "scheduler", "scaler", "counter")
    RUN_KEYS: ClassVar[tuple[str, ...]] = ("epoch", "best_fitness", "best_epoch", "config", "model_yaml", "names")

    def to_dict(self) -> dict[str, Any]:
        return {**self.training, "epoch": self.epoch, "best_fitness": self.best_fitness,
                "best_epoch": self.best_epoch, "config": self.config, "model_yaml": self.model_yaml,
                "names": self.names}

    @classmethod
    def from_dict(cls, state: dict[str, Any], source: str = "the checkpoint") -> Checkpoint:
        """The record in a checkpoint's dict (`load_checkpoint`'s, or `to_dict`'s)."""
        missing = [key for key in (*cls.TRAINING_KEYS, *cls.RUN_KEYS) if key not in state]
        if missing:
            raise UserError(f"{source} cannot be resumed: it has no {', '.join(missing)} (weights only?); "
                            "pass a run's weights/last.pt, or start a new run from it with --weights")
        return cls(epoch=int(state["epoch"]), best_fitness=float(state["best_fitness"]),
                   best_epoch=int(state["best_epoch"]), config=state["config"], model_yaml=state["model_yaml"],
                   names=list(state["names"]), training={key: state[key] for key in cls.TRAINING_KEYS})

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        return cls.from_dict(load_checkpoint(path), source=str(path))

    def save(self, path: Path) -> None:
        save_checkpoint(self.to_dict(), path)


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
    path = resolve_weights(path)
    status = path.stat()
    return _load_weights(path, path.resolve(), status.st_size, status.st_mtime_ns)


def export_weights(source: str | Path, destination: str | Path) -> None:
    """A checkpoint reduced to what `--weights` reads, as YOLOv5 strips its best.pt: the EMA
    weights (the model's without one) in half precision, the model config and the class names.
    No optimiser, so it starts new runs but resumes none; yolov5n's is about 4 MB instead of 29.
    The epoch it was saved after stays, for the record. `destination` may be `source`."""
    state = _read_own(existing_checkpoint(source))
    weights = (state.get("ema") or {}).get("module") or state["model"]
    half = {name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in weights.items()}
    config = state.get("config", {})
    save_checkpoint({"model": half, "config": {"cfg": config.get("cfg", TrainConfig.cfg)},
                     "model_yaml": state.get("model_yaml"), "names": state.get("names"),
                     "epoch": state.get("epoch", -1)}, Path(destination))


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
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a damaged file
        message = str(error).strip()  # the first sentence: torch goes on for a paragraph
        reason = message.split(". ")[0].splitlines()[0] if message else type(error).__name__
        raise UserError(f"checkpoint {path} cannot be read ({reason}): it may be truncated or damaged") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not an evolvectl checkpoint (no 'model' state)")
    return state
