"""TensorBoard scalars of a training run, YOLOv5's default logger: `tensorboard --logdir runs/train`.

Every results.csv column but the epoch becomes a scalar of the same name (`train/box_loss`,
`metrics/mAP_0.5`, `x/lr0`, ...) at step = epoch, in event files beside results.csv. A resumed
run adds a new event file to the same folder and goes on at its next epoch.

`write_hparams` writes one HParams record (an evolution's generation: its genes and its
results) into a folder of its own, so that TensorBoard's HParams tab shows a whole search.
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


def write_hparams(folder: Path, hparams: dict[str, float], metrics: dict[str, float]) -> None:
    """One HParams session in `folder`: the genes, and the metrics as scalars at step 0. Folders
    are never shared, so any number of processes write side by side."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    experiment, start, end = hparams_summaries(hparams, metrics)
    with SummaryWriter(log_dir=str(folder)) as writer:
        for summary in (experiment, start, end):
            writer.file_writer.add_summary(summary)
        for name, value in metrics.items():
            writer.add_scalar(name, value, 0)
