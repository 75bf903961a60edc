from __future__ import annotations

import pytest
import torch

from trainer.autoanchor import best_possible_recall, check_anchors, kmean_anchors
from trainer.config import Hyp
from trainer.errors import UserError
from trainer.loss import DetectionLoss
from trainer.model import DetectionModel, load_model_spec


def clustered_labels(count: int = 300, seed: int = 0) -> torch.Tensor:
    """Label sizes (pixels) around three well-separated shapes, with 10% spread."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[8.0, 16.0], [40.0, 30.0], [120.0, 90.0]])
    picks = torch.arange(count) % 3
    noise = 1 + 0.1 * torch.randn(count, 2, generator=generator)
    return centres[picks] * noise


def model_with_anchors(anchors_px: list[list[float]]) -> DetectionModel:
    spec = load_model_spec("yolov5n")
    spec["anchors"] = anchors_px
    return DetectionModel(spec, nc=1)


def test_best_possible_recall_known_answer() -> None:
    labels = torch.tensor([[10.0, 10.0], [35.0, 35.0], [50.0, 50.0], [10.0, 45.0]])
    # anchor_t 4: a label matches when both sides are within 4x, i.e. metric > 0.25.
    bpr, per_label = best_possible_recall(labels, torch.tensor([[10.0, 10.0]]), anchor_t=4.0)
    assert bpr == pytest.approx(0.5) and per_label == pytest.approx(0.5)
    bpr, per_label = best_possible_recall(labels, torch.tensor([[10.0, 10.0], [40.0, 40.0]]), anchor_t=4.0)
    # [10,10]: 1 anchor; [35,35]: 2; [50,50]: 1; [10,45]: 10/40 is exactly 0.25, not above: 0.
    assert bpr == pytest.approx(0.75) and per_label == pytest.approx(1.0)


def test_kmean_anchors_finds_clusters_sorted_by_area() -> None:
    labels = clustered_labels()
    anchors = kmean_anchors(labels, 3, anchor_t=4.0, generations=200, generator=torch.Generator().manual_seed(0))
    assert anchors.shape == (3, 2)
    areas = anchors.prod(dim=1)
    assert torch.all(areas[1:] > areas[:-1])
    torch.testing.assert_close(anchors, torch.tensor([[8.0, 16.0], [40.0, 30.0], [120.0, 90.0]]), rtol=0.15, atol=0)
    assert best_possible_recall(labels, anchors, 4.0)[0] == 1.0


def test_kmean_anchors_is_seeded() -> None:
    labels = clustered_labels(seed=3) * torch.tensor([1.0, 2.0])

    def fit(seed: int) -> torch.Tensor:
        return kmean_anchors(labels, 6, anchor_t=4.0, generations=100, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(fit(5), fit(5))


def test_kmean_anchors_with_fewer_labels_than_anchors() -> None:
    labels = torch.tensor([[5.0, 5.0], [50.0, 20.0]])
    anchors = kmean_anchors(labels, 4, anchor_t=4.0, generations=50)
    assert anchors.shape == (4, 2) and torch.all(anchors >= 2.0)
    assert best_possible_recall(labels, anchors, 4.0)[0] == 1.0


def test_check_anchors_replaces_bad_anchors() -> None:
    model = model_with_anchors([[300, 300, 310, 320, 330, 340]] * 3)
    loss = DetectionLoss.from_model(model, Hyp(), imgsz=160)
    original = model.detect.anchors.clone()
    labels = clustered_labels(600) * torch.tensor([1.0, 0.8])
    report = check_anchors(model, labels, anchor_t=4.0, imgsz=160, generations=200)
    assert report.replaced
    assert report.bpr_before < 0.5 and report.bpr_after > 0.98
    assert not torch.equal(model.detect.anchors, original)
    pixels = model.detect.anchors * model.stride.view(-1, 1, 1)
    areas = pixels.view(-1, 2).prod(dim=1)
    assert torch.all(areas[1:] >= areas[:-1])  # small anchors on the fine levels
    assert best_possible_recall(labels, pixels.view(-1, 2), 4.0)[0] > 0.95
    assert torch.equal(loss.anchors, model.detect.anchors)  # the loss sees the new anchors


def test_check_anchors_keeps_good_anchors() -> None:
    model = DetectionModel("yolov5n", nc=1)
    original = model.detect.anchors.clone()
    report = check_anchors(model, clustered_labels(), anchor_t=4.0, imgsz=640)
    assert not report.replaced
    assert report.bpr_before == report.bpr_after and report.bpr_before >= 0.98
    assert torch.equal(model.detect.anchors, original)


def test_check_anchors_is_reproducible() -> None:
    labels = clustered_labels(200, seed=7)
    results = []
    for _ in range(2):
        model = model_with_anchors([[300, 300, 310, 320, 330, 340]] * 3)
        check_anchors(model, labels, 4.0, 160, generator=torch.Generator().manual_seed(11), generations=100)
        results.append(model.detect.anchors.clone())
    assert torch.equal(results[0], results[1])


def test_kmean_anchors_refuses_labels_that_are_all_tiny() -> None:
    with pytest.raises(UserError, match="2 px"):
        kmean_anchors(torch.tensor([[1.0, 1.5], [0.5, 0.5]]), 3, anchor_t=4.0, generations=10)
