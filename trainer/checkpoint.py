"""Complete, atomically written checkpoints: everything `--resume` needs and nothing pickled."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError
from trainer.files import atomic_output

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
    path = existing_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message is a page on weights_only; this is what matters
        raise UserError(
            f"{path} is not an evolvectl checkpoint: torch's safe loader refuses it (YOLOv5's .pt files, for one, "
            "hold whole pickled models, not only tensors); pass a last.pt or best.pt written by evolvectl"
        ) from None
    except Exception as error:  # torch raises many kinds for a damaged file
        message = str(error).strip()  # the first sentence: torch goes on for a paragraph
        reason = message.split(". ")[0].splitlines()[0] if message else type(error).__name__
        raise UserError(f"checkpoint {path} cannot be read ({reason}): it may be truncated or damaged") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not an evolvectl checkpoint (no 'model' state)")
    return state
