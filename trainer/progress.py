"""What a person sees (a progress bar or plain log lines) and what a program reads (results.csv)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from trainer.metrics import DetectionScores
from trainer.results import RESULT_COLUMNS

LOGGER = logging.getLogger("trainer")
REDRAW_SECONDS = 0.25  # how often the bar's losses are read from the GPU
Item = TypeVar("Item")

TRAIN_LOSS_COLUMNS = ("train/box_loss", "train/obj_loss", "train/cls_loss")
# YOLOv5's results.csv: the epoch, its training losses, its validation and its three groups' learning rates.
RESULTS_COLUMNS = ("epoch", *TRAIN_LOSS_COLUMNS, *RESULT_COLUMNS, "x/lr0", "x/lr1", "x/lr2")


def setup_logging(is_main: bool, level: int = logging.INFO) -> None:
    """Log lines from rank 0 only; other ranks log warnings and errors."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr, force=True,
                        level=level if is_main else logging.WARNING)


def gpu_memory_text(device: torch.device) -> str:
    if device.type != "cuda":
        return "0G"
    return f"{torch.cuda.memory_reserved(device) / 1e9:.3g}G"


class EpochProgress:
    """Iterates a loader showing epoch, GPU memory, box/obj/cls loss, instances and image size.

    A rich bar when stderr is a terminal; otherwise a few plain log lines per epoch, each with
    the epoch's elapsed seconds and batches per second, so that container logs and CI output
    stay readable. The losses may be a tensor on the GPU: they are read (which waits for the
    GPU) only when a line is written or the bar is redrawn, a few times a second at most.
    """

    HEADER = ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size")

    def __init__(self, enabled: bool, epoch: int, epochs: int, total: int, device: torch.device,
                 log_every: int = 10):
        self.enabled, self.epoch, self.epochs, self.total = enabled, epoch, epochs, total
        self.device = device
        self.interactive = enabled and sys.stderr.isatty()
        self.log_every = max(1, total // log_every)
        self._described: tuple[torch.Tensor | Sequence[float], int, int] | None = None

    def describe(self, mean_losses: torch.Tensor | Sequence[float], instances: int, size: int) -> None:
        """Box, obj and cls loss so far, this batch's instances and image size; read when shown."""
        self._described = (mean_losses, instances, size)

    @property
    def text(self) -> str:
        if self._described is None:
            return ""
        mean_losses, instances, size = self._described
        box, obj, cls = mean_losses.tolist() if isinstance(mean_losses, torch.Tensor) else mean_losses
        return (f"{self.epoch + 1:>5}/{self.epochs:<5} {gpu_memory_text(self.device):>8} "
                f"{box:>9.4g} {obj:>9.4g} {cls:>9.4g} {instances:>9} {size:>6}")

    def track(self, iterable: Iterable[Item]) -> Iterator[Item]:
        if not self.enabled:
            yield from iterable
            return
        header = "{:>11} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6}".format(*self.HEADER)
        if not self.interactive:
            LOGGER.info(header)
            started = time.perf_counter()
            for index, item in enumerate(iterable):
                yield item
                if (index + 1) % self.log_every == 0 or index + 1 == self.total:
                    elapsed = time.perf_counter() - started
                    LOGGER.info("%s %d/%d [%.0fs, %.2f it/s]", self.text, index + 1, self.total, elapsed,
                                (index + 1) / max(elapsed, 1e-9))
            return
        Console(stderr=True).print(header, highlight=False)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
            task = progress.add_task(self.text, total=self.total)
            shown = time.perf_counter()
            for index, item in enumerate(iterable):
                yield item
                now = time.perf_counter()
                if now - shown >= REDRAW_SECONDS or index + 1 == self.total:
                    progress.update(task, description=self.text)
                    shown = now
                progress.advance(task)


def format_row(values: Sequence[float | str], numeric: bool) -> str:
    """YOLOv5's fixed-width CSV cells: names `%20s`, numbers `%20.5g`."""
    return ",".join(("%20.5g" % value) if numeric else ("%20s" % value) for value in values) + "\n"


def append_results(path: Path, values: Sequence[float]) -> None:
    """One row per epoch, header first, in YOLOv5's results.csv columns."""
    if len(values) != len(RESULTS_COLUMNS):
        raise ValueError(f"results row has {len(values)} values, expected {len(RESULTS_COLUMNS)}")
    header = "" if path.exists() else format_row(RESULTS_COLUMNS, numeric=False)
    with path.open("a") as stream:
        stream.write(header + format_row(values, numeric=True))


def class_table(scores: DetectionScores, names: Sequence[str]) -> list[str]:
    """YOLOv5's validation table: all classes, then one row per labelled class where there are
    several classes."""
    row = "%22s%11s%11s%11s%11s%11s%11s"
    lines = [row % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")]
    number = "%22s%11i%11i%11.3g%11.3g%11.3g%11.3g"
    images, classes = scores.images, scores.classes
    lines.append(number % ("all", images, int(classes.targets.sum()), scores.precision, scores.recall, scores.map50,
                           scores.map))
    for i, class_id in enumerate(classes.class_ids if len(names) > 1 else ()):
        lines.append(number % (names[class_id], images, classes.targets[i], classes.precision[i], classes.recall[i],
                               classes.ap50[i], classes.ap50_95[i]))
    return lines


class DownloadBar:
    """A download's bar on a terminal, nothing in a log file; `with DownloadBar(...) as advance`
    gives the function to call with each chunk's size."""

    def __init__(self, name: str, total: int | None, done: int) -> None:
        self.bar = Progress(TextColumn(name), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            transient=True, disable=not sys.stderr.isatty())
        self.task = self.bar.add_task("download", total=total, completed=done)

    def __enter__(self) -> Callable[[int], None]:
        self.bar.start()
        return lambda count: self.bar.advance(self.task, count)

    def __exit__(self, *_: object) -> None:
        self.bar.stop()
