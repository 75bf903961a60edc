"""Pictures of a run, in the files YOLOv5 users look for first.

- `results.png`: every loss and metric column of results.csv against the epoch.
- `labels.jpg`: the training labels: instances per class, where the boxes lie, their shapes, and
  their sizes in pixels against the model's anchors.
- `train_batch0.jpg` to `train_batch2.jpg`: the first augmented batches with their labels, to
  see what the model is fed before trusting a long run.
- `val_batch0_labels.jpg` / `val_batch0_pred.jpg` to `val_batch2_*`: validation images with their
  labels, and with the final model's detections above PREDICTION_CONF.
- `PR_curve.png`, `F1_curve.png`, `P_curve.png`, `R_curve.png` and `confusion_matrix.png`: the
  final validation, class by class.

Boxes are drawn with torchvision (`draw_bounding_boxes`, `make_grid`, `encode_jpeg`); plots with
matplotlib's object API, which needs no display. Every file is replaced atomically.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torchvision.io import encode_jpeg
from torchvision.transforms.v2.functional import resize
from torchvision.utils import draw_bounding_boxes, make_grid

from trainer.engine import image_labels
from trainer.files import save_figure, write_atomic
from trainer.metrics import CONFIDENCE_GRID, CONFUSION_CONF, CONFUSION_IOU, RECALL_POINTS, DetectionScores
from trainer.progress import TRAIN_LOSS_COLUMNS
from trainer.results import RESULT_COLUMNS, ValidationResult

PLOTTED_BATCHES = 3  # train_batch0-2 and val_batch0-2, as YOLOv5 writes
MAX_GRID_IMAGES = 16
MAX_GRID_SIDE = 1920  # pixels; larger batches are scaled down to fit
PREDICTION_CONF = 0.25  # detections drawn on val_batch*_pred.jpg; validation scores down to 0.001
_RESULT_COLUMN = dict(zip(ValidationResult.names(), RESULT_COLUMNS))
# Two rows of five, as YOLOv5 draws them: the losses over the validation losses, then P, R and the mAPs.
RESULTS_PANELS = (
    *TRAIN_LOSS_COLUMNS, *(_RESULT_COLUMN[name] for name in ("precision", "recall")),
    *(_RESULT_COLUMN[name] for name in ("box_loss", "obj_loss", "cls_loss", "map50", "map")),
)
LEGEND_MAX_CLASSES = 20  # more classes: curves without a legend entry each
MAX_NAMED_CLASSES = 30  # more classes: axes without class names, whose labels would overlap
PALETTE = [tuple(int(255 * channel) for channel in colormaps["tab20"](i)[:3]) for i in range(20)]


def plot_results(csv_path: Path, png_path: Path) -> None:
    """results.png: one panel per loss and metric of results.csv, against the (1-based) epoch."""
    with csv_path.open(newline="") as stream:
        rows = [{key.strip(): float(value) for key, value in row.items()} for row in csv.DictReader(stream)]
    epochs = [row["epoch"] + 1 for row in rows]
    figure = Figure(figsize=(15, 6), tight_layout=True)
    for index, name in enumerate(RESULTS_PANELS):
        axes = figure.add_subplot(2, 5, index + 1)
        axes.plot(epochs, [row[name] for row in rows], marker=".", linewidth=1.5)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("epoch", fontsize=8)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.tick_params(labelsize=8)
    save_figure(figure, png_path)


def plot_labels(path: Path, labels: np.ndarray, sizes: np.ndarray, anchors: np.ndarray, names: Sequence[str]) -> None:
    """labels.jpg from the training labels `(class, cx, cy, w, h)` (normalised), their `sizes`
    (width, height) in pixels at the training size, and the model's anchors in pixels."""
    figure = Figure(figsize=(10, 10), tight_layout=True)
    counts = np.bincount(labels[:, 0].astype(np.int64), minlength=len(names))
    axes = figure.add_subplot(2, 2, 1)
    axes.bar(range(len(counts)), counts, color=[np.array(PALETTE[c % len(PALETTE)]) / 255 for c in range(len(counts))])
    axes.set(title="instances per class", ylabel="instances")
    if len(names) <= MAX_NAMED_CLASSES:
        axes.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    for index, (x, y, title) in enumerate(((1, 2, "box centres (x, y)"), (3, 4, "box sizes (width, height)"))):
        axes = figure.add_subplot(2, 2, index + 2)
        axes.hist2d(labels[:, x], labels[:, y], bins=50, range=[[0, 1], [0, 1]], cmap="Blues")
        axes.set(title=title, xlim=(0, 1), ylim=(0, 1))
    axes = figure.add_subplot(2, 2, 4)
    shown = sizes[np.random.default_rng(0).permutation(len(sizes))[:5000]]
    axes.scatter(shown[:, 0], shown[:, 1], s=2, alpha=0.3, linewidths=0, label="labels")
    axes.scatter(anchors[:, 0], anchors[:, 1], marker="x", s=60, color="red", label="anchors")
    axes.set(xscale="log", yscale="log", xlabel="width (px)", ylabel="height (px)", title="sizes at the training size")
    axes.legend(loc="upper left")
    save_figure(figure, path)


def class_name(names: Sequence[str], class_id: int) -> str:
    return names[class_id] if 0 <= class_id < len(names) else str(class_id)


def batch_grid(images: Tensor, boxes: Sequence[Tensor], names: Sequence[str]) -> Tensor:
    """A (3, H, W) uint8 grid of up to MAX_GRID_IMAGES images with their boxes drawn.

    `images` (B, 3, h, w) uint8; `boxes[i]` holds image i's rows `[class, x1, y1, x2, y2]` in its
    pixels, or `[x1, y1, x2, y2, confidence, class]` for detections (6 columns).
    """
    count = min(len(images), MAX_GRID_IMAGES)
    columns = math.ceil(math.sqrt(count))
    height, width = images.shape[2:]
    scale = min(1.0, MAX_GRID_SIDE / (columns * max(height, width)))
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    drawn = []
    for image, rows in zip(images[:count].cpu(), boxes):
        rows = rows.detach().float().cpu()
        detections = rows.shape[1] == 6
        classes = (rows[:, 5] if detections else rows[:, 0]).long().tolist()
        corners = (rows[:, :4] if detections else rows[:, 1:5]) * scale
        texts = [class_name(names, c) for c in classes]
        if detections:
            texts = [f"{text} {score:.2f}" for text, score in zip(texts, rows[:, 4].tolist())]
        image = resize(image, size, antialias=True) if scale < 1 else image
        if classes:
            image = draw_bounding_boxes(image, corners, texts, colors=[PALETTE[c % len(PALETTE)] for c in classes],
                                        width=2)
        drawn.append(image)
    return make_grid(drawn, nrow=columns, padding=2, pad_value=255)


def save_batch(path: Path, images: Tensor, boxes: Sequence[Tensor], names: Sequence[str]) -> None:
    write_atomic(path, encode_jpeg(batch_grid(images, boxes, names), quality=90).numpy().tobytes())


def confident(detections: Tensor, threshold: float = PREDICTION_CONF) -> Tensor:
    return detections[detections[:, 4] > threshold]


def plot_training_batches(batches: Iterable[Any], save_dir: Path, names: Sequence[str]) -> Iterator[Any]:
    """Pass `(images, targets, paths, shapes)` batches through, saving the first PLOTTED_BATCHES."""
    for index, batch in enumerate(batches):
        if index < PLOTTED_BATCHES:
            images, targets = batch[0], batch[1]
            height, width = images.shape[2:]
            labels = [image_labels(targets, i, height, width) for i in range(len(images))]
            save_batch(save_dir / f"train_batch{index}.jpg", images, labels, names)
        yield batch


class ValidationPlots:
    """The `evaluate` callback that saves val_batch{i}_labels.jpg and val_batch{i}_pred.jpg."""

    def __init__(self, save_dir: Path, names: Sequence[str]) -> None:
        self.save_dir, self.names = save_dir, names

    def __call__(self, index: int, images: Tensor, labels: Sequence[Tensor], detections: Sequence[Tensor]) -> None:
        if index >= PLOTTED_BATCHES:
            return
        save_batch(self.save_dir / f"val_batch{index}_labels.jpg", images, labels, self.names)
        save_batch(self.save_dir / f"val_batch{index}_pred.jpg", images,
                   [confident(rows) for rows in detections], self.names)


def plot_validation(save_dir: Path, scores: DetectionScores, confusion_matrix: np.ndarray,
                    names: Sequence[str]) -> None:
    """PR, F1, P and R curves and the confusion matrix of one validation."""
    classes = scores.classes
    labels = [names[c] for c in classes.class_ids]
    listed = len(labels) <= LEGEND_MAX_CLASSES
    figure, axes = _curve_axes("Recall", "Precision")
    for label, curve, ap in zip(labels, classes.pr_curves, classes.ap50):
        axes.plot(RECALL_POINTS, curve, linewidth=1, label=f"{label} {ap:.3f}" if listed else None)
    if len(labels):
        axes.plot(RECALL_POINTS, classes.pr_curves.mean(0), linewidth=3, color="blue",
                  label=f"all classes {scores.map50:.3f} mAP@0.5")
    _finish_curves(figure, axes, save_dir / "PR_curve.png")
    for curves, title, file in ((classes.f1_curves, "F1", "F1"), (classes.precision_curves, "Precision", "P"),
                                (classes.recall_curves, "Recall", "R")):
        figure, axes = _curve_axes("Confidence", title)
        for label, curve in zip(labels, curves):
            axes.plot(CONFIDENCE_GRID, curve, linewidth=1, label=label if listed else None)
        if len(labels):
            mean = curves.mean(0)
            best = int(mean.argmax())
            axes.plot(CONFIDENCE_GRID, mean, linewidth=3, color="blue",
                      label=f"all classes {mean[best]:.2f} at {CONFIDENCE_GRID[best]:.3f}")
        _finish_curves(figure, axes, save_dir / f"{file}_curve.png")
    plot_confusion_matrix(save_dir / "confusion_matrix.png", confusion_matrix, names)


def _curve_axes(xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    figure = Figure(figsize=(9, 6), tight_layout=True)
    axes = figure.add_subplot()
    axes.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01))
    return figure, axes


def _finish_curves(figure: Figure, axes: Any, path: Path) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(bbox_to_anchor=(1.04, 1), loc="upper left", fontsize=8)
    save_figure(figure, path)


def plot_confusion_matrix(path: Path, matrix: np.ndarray, names: Sequence[str]) -> None:
    """The matrix (rows predicted, columns true, background last), each column normalised to 1."""
    nc = len(matrix) - 1
    shares = matrix / np.maximum(matrix.sum(axis=0, keepdims=True), 1)
    figure = Figure(figsize=(12, 9), tight_layout=True)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, shrink=0.8)
    if nc <= MAX_NAMED_CLASSES:
        ticks = [*(class_name(names, c) for c in range(nc)), "background"]
        axes.set_xticks(range(nc + 1), ticks, rotation=90, fontsize=8)
        axes.set_yticks(range(nc + 1), ticks, fontsize=8)
        for (row, column), share in np.ndenumerate(shares):
            if share >= 0.005:
                axes.text(column, row, f"{share:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if share > 0.5 else "black")
    axes.set(xlabel="True", ylabel="Predicted",
             title=f"Confusion matrix (confidence > {CONFUSION_CONF}, IoU > {CONFUSION_IOU})")
    save_figure(figure, path)
