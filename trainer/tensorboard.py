"""TensorBoard scalars of a training run, YOLOv5's default logger: `tensorboard --logdir runs/train`.

Every results.csv column but the epoch becomes a scalar of the same name (`train/box_loss`,
`metrics/mAP_0.5`, `x/lr0`, ...) at step = epoch, in event files beside results.csv. A resumed
run adds a new event file to the same folder and goes on at its next epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

LOGGER = logging.getLogger("trainer")


class Scalars:
    """Writes one step per epoch; does nothing when `folder` is None (no run folder, or not rank 0)."""

    def __init__(self, folder: Path | None, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self.writer = None
        if folder is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # an image or environment built without it: results.csv has the same numbers
            LOGGER.warning("TensorBoard: not installed (pip install tensorboard); no event files written")
            return
        self.writer = SummaryWriter(log_dir=str(folder))
        LOGGER.info("TensorBoard: tensorboard --logdir %s, view at http://localhost:6006/", folder.parent)

    def epoch(self, values: Sequence[float]) -> None:
        """One row of results.csv: the epoch first, then the other columns."""
        if self.writer is None:
            return
        step = int(values[0])
        for name, value in zip(self.columns[1:], values[1:]):
            self.writer.add_scalar(name, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
