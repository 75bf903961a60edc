"""The run folder's pictures: boxes drawn where the labels are, in their class's colour; results.png."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.metrics import ConfusionMatrix, DetectionMetrics
from trainer.plots import (
    MAX_GRID_IMAGES,
    MAX_GRID_SIDE,
    PALETTE,
    ValidationPlots,
    batch_grid,
    confident,
    plot_labels,
    plot_results,
    plot_training_batches,
    plot_validation,
)
from trainer.progress import RESULTS_COLUMNS, append_results

PAD = 2  # make_grid's padding around every image


def pixel(grid: torch.Tensor, x: int, y: int) -> tuple[int, ...]:
    return tuple(grid[:, y, x].tolist())


def test_labels_are_drawn_in_their_class_colour_where_they_are():
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    labels = [torch.tensor([[1.0, 10, 10, 50, 50]]), torch.zeros(0, 5)]
    grid = batch_grid(images, labels, names=["a", "b"])
    assert grid.shape == (3, 64 + 2 * PAD, 2 * (64 + PAD) + PAD)  # two images side by side
    assert pixel(grid, PAD + 10, PAD + 30) == PALETTE[1]  # the box's left edge
    assert pixel(grid, PAD + 40, PAD + 40) == (0, 0, 0)  # inside the box, below its name
    second = grid[:, PAD:PAD + 64, 2 * PAD + 64:2 * PAD + 128]
    assert not second.any()  # the image without labels is untouched


def test_detections_are_drawn_by_their_class_column():
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    detections = [torch.tensor([[10.0, 10, 50, 50, 0.9, 2]])]  # x1 y1 x2 y2 confidence class
    grid = batch_grid(images, detections, names=["a", "b", "c"])
    assert grid.shape == (3, 64, 64)  # one image: no grid, no padding
    assert pixel(grid, 10, 30) == PALETTE[2]


def test_large_batches_are_capped_and_scaled_down():
    images = torch.zeros(20, 3, 1280, 1280, dtype=torch.uint8)
    labels = [torch.tensor([[0.0, 100, 100, 1200, 1200]])] * 20
    grid = batch_grid(images, labels, names=["a"])
    columns = 4  # 16 of the 20 images, 4 by 4
    side = (MAX_GRID_SIDE // columns + PAD) * columns + PAD
    assert grid.shape == (3, side, side)
    assert pixel(grid, PAD + 100 * 480 // 1280, PAD + 600 * 480 // 1280) == PALETTE[0]  # boxes scale too
    assert columns * columns == MAX_GRID_IMAGES


def test_predictions_below_the_drawing_threshold_are_left_out():
    detections = torch.tensor([[0.0, 0, 5, 5, 0.9, 0], [0.0, 0, 5, 5, 0.1, 0]])
    assert torch.equal(confident(detections), detections[:1])


def test_results_png_has_every_panel(tmp_path):
    csv_path = tmp_path / "results.csv"
    for epoch in range(3):
        append_results(csv_path, [epoch, *([0.1 * (epoch + 1)] * (len(RESULTS_COLUMNS) - 1))])
    plot_results(csv_path, tmp_path / "results.png")
    with Image.open(tmp_path / "results.png") as image:
        assert image.format == "PNG" and image.size == (1500, 600)


def test_training_batches_pass_through_and_the_first_three_are_saved(tmp_path):
    batches = [(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([[0.0, 0, 0.5, 0.5, 0.2, 0.2]]),
                ("a.jpg", "b.jpg"), (None, None)) for _ in range(5)]
    assert list(plot_training_batches(iter(batches), tmp_path, ["a"])) == batches
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"train_batch{i}.jpg" for i in range(3)]
    with Image.open(tmp_path / "train_batch0.jpg") as image:
        assert image.size == (2 * (32 + PAD) + PAD, 32 + 2 * PAD)


def test_validation_plots_keep_the_first_three_batches(tmp_path):
    plots = ValidationPlots(tmp_path, ["a"])
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    for index in range(4):
        plots(index, images, [torch.zeros(0, 5)], [torch.zeros(0, 6)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"val_batch{i}_{kind}.jpg" for i in range(3) for kind in ("labels", "pred"))


VALIDATION_PLOTS = ["F1_curve.png", "PR_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png"]


@pytest.mark.parametrize("classes", [2, 40])  # with a legend entry per class, and without
def test_validation_curves_and_confusion_matrix(tmp_path, classes):
    metrics, confusion = DetectionMetrics(), ConfusionMatrix(classes)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        labels = torch.cat([torch.randint(0, classes, (4, 1), generator=generator).float(),
                            torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]])], 1)
        detections = torch.cat([labels[:, 1:5] + torch.rand(4, 4, generator=generator) * 3,
                                torch.rand(4, 1, generator=generator), labels[:, :1]], 1)
        metrics.update(detections, labels)
        confusion.update(detections, labels)
    plot_validation(tmp_path, metrics.compute(), confusion.matrix, [f"class{c}" for c in range(classes)])
    assert sorted(path.name for path in tmp_path.iterdir()) == VALIDATION_PLOTS
    with Image.open(tmp_path / "PR_curve.png") as image:
        assert image.format == "PNG" and image.size == (900, 600)


def test_validation_plots_without_any_label(tmp_path):
    plot_validation(tmp_path, DetectionMetrics().compute(), ConfusionMatrix(3).matrix, ["a", "b", "c"])
    assert sorted(path.name for path in tmp_path.iterdir()) == VALIDATION_PLOTS


@pytest.mark.parametrize("count", [0, 300])
def test_labels_picture(tmp_path, count):
    rng = np.random.default_rng(0)
    labels = np.concatenate([rng.integers(0, 3, (count, 1)), rng.random((count, 4))], axis=1)
    anchors = np.array([[10.0, 13], [16, 30]])
    plot_labels(tmp_path / "labels.jpg", labels, labels[:, 3:5] * 320, anchors, ["a", "b", "c"])
    with Image.open(tmp_path / "labels.jpg") as image:
        assert image.format == "JPEG" and image.size == (1000, 1000)
