from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_convert, complete_box_iou_loss

from trainer.config import Hyp
from trainer.loss import (
    DetectionLoss,
    LevelTargets,
    complete_iou_loss,
    scale_loss_gains,
)
from trainer.model import DetectionModel, load_model_spec

GRID = 8  # one 8x8 level: normalised coordinate c sits at grid coordinate 8c


def make_loss(anchors: torch.Tensor, nc: int = 2, anchor_t: float = 4.0, **options: float) -> DetectionLoss:
    return DetectionLoss(
        anchors=anchors,
        nc=nc,
        box_gain=1.0,
        obj_gain=1.0,
        cls_gain=1.0,
        cls_pw=1.0,
        obj_pw=1.0,
        anchor_t=anchor_t,
        **options,
    )


def one_level_preds(na: int, nc: int = 2, batch: int = 1) -> list[torch.Tensor]:
    return [torch.zeros(batch, na, GRID, GRID, 5 + nc)]


def target(image: int, cls: int, x: float, y: float, w: float, h: float) -> list[float]:
    """A target row from grid-unit centre and size."""
    return [image, cls, x / GRID, y / GRID, w / GRID, h / GRID]


def assigned_cells(assigned: LevelTargets) -> set[tuple[int, int, int, int]]:
    columns = (assigned.image, assigned.anchor, assigned.grid_y, assigned.grid_x)
    return set(zip(*(column.tolist() for column in columns), strict=True))


def test_complete_iou_loss_matches_torchvision() -> None:
    """Our CIoU loss only trades torchvision's boolean masking for clamping: same values and
    gradients, for overlapping, touching, nested and disjoint pairs."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.rand(400, 2, generator=generator) * 4
    sizes = torch.rand(400, 2, generator=generator) * 2 + 0.05
    predicted = torch.cat((centres, sizes), 1).requires_grad_()
    target = torch.cat((centres + torch.randn(400, 2, generator=generator), sizes * 1.5), 1)
    target[0] = predicted[0].detach() + torch.tensor([3.0, 0.0, 0.0, 0.0])  # far apart: no overlap
    target[1] = predicted[1].detach() * torch.tensor([1.0, 1.0, 0.5, 0.5])  # nested
    ours = complete_iou_loss(predicted, target)
    (grad_ours,) = torch.autograd.grad(ours.sum(), predicted)
    reference = complete_box_iou_loss(box_convert(predicted, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"))
    (grad_reference,) = torch.autograd.grad(reference.sum(), predicted)
    assert (ours.detach() > 1).any() and (ours.detach() < 1).any()  # both overlapping and disjoint pairs
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad_ours, grad_reference)


def test_scale_loss_gains() -> None:
    box, obj, cls = scale_loss_gains(0.05, 1.0, 0.5, nl=3, nc=80, imgsz=640)
    assert (box, obj, cls) == pytest.approx((0.05, 1.0, 0.5))
    box, obj, cls = scale_loss_gains(0.05, 1.0, 0.5, nl=4, nc=20, imgsz=320)
    assert (box, obj, cls) == pytest.approx((0.05 * 0.75, 0.25 * 0.75, 0.5 * 0.25 * 0.75))


def test_target_near_upper_left_corner_gets_own_left_and_upper_cells() -> None:
    # Anchor 1 is 8x larger than the target: beyond anchor_t, so only anchor 0 matches.
    loss = make_loss(torch.tensor([[[1.0, 1.0], [4.0, 4.0]]]))
    targets = torch.tensor([target(0, 1, 3.2, 5.3, 0.5, 0.5)])
    (assigned,) = loss.build_targets(one_level_preds(na=2), targets)
    assert assigned_cells(assigned) == {(0, 0, 5, 3), (0, 0, 5, 2), (0, 0, 4, 3)}
    cells = zip(assigned.grid_x.tolist(), assigned.grid_y.tolist(), assigned.box, strict=True)
    offsets = {(gx, gy): box[:2].tolist() for gx, gy, box in cells}
    assert offsets[(3, 5)] == pytest.approx([0.2, 0.3])
    assert offsets[(2, 5)] == pytest.approx([1.2, 0.3])  # centre seen from the left neighbour
    assert offsets[(3, 4)] == pytest.approx([0.2, 1.3])
    assert torch.all(assigned.box[:, 2:] == 0.5)
    assert torch.all(assigned.classes == 1)
    assert torch.all(assigned.anchor_wh == 1.0)


def test_target_near_lower_right_corner_gets_right_and_lower_cells_for_each_matching_anchor() -> None:
    loss = make_loss(torch.tensor([[[1.0, 1.0], [3.0, 2.0]]]))
    targets = torch.tensor([target(2, 0, 6.7, 1.8, 2.0, 1.5)])
    (assigned,) = loss.build_targets(one_level_preds(na=2, batch=3), targets)
    cells = {(1, 6), (1, 7), (2, 6)}  # (row, column): own, right, below
    assert assigned_cells(assigned) == {(2, anchor, gy, gx) for anchor in (0, 1) for gy, gx in cells}


def test_no_neighbour_outside_the_grid() -> None:
    loss = make_loss(torch.tensor([[[1.0, 1.0]]]))
    # x in the first cell's left half, y in the last cell's lower half: both neighbours would be off-grid.
    targets = torch.tensor([target(0, 0, 0.3, 7.8, 1.0, 1.0)])
    (assigned,) = loss.build_targets(one_level_preds(na=1), targets)
    assert assigned_cells(assigned) == {(0, 0, 7, 0)}


def test_target_beyond_anchor_t_is_not_assigned() -> None:
    loss = make_loss(torch.tensor([[[1.0, 1.0]]]), anchor_t=4.0)
    targets = torch.tensor([target(0, 0, 4.0, 4.0, 4.5, 1.0), target(0, 0, 4.0, 4.0, 1.0, 0.2)])
    preds = one_level_preds(na=1)
    (assigned,) = loss.build_targets(preds, targets)
    assert assigned.image.numel() == 0
    total, items = loss(preds, targets)
    assert items[0] == 0 and items[2] == 0  # no box or class loss without positives
    assert torch.isfinite(total) and items[1] > 0


def test_loss_is_finite_and_consistent() -> None:
    torch.manual_seed(0)
    loss = make_loss(torch.tensor([[[1.0, 1.5], [2.0, 1.0]], [[0.5, 0.5], [1.0, 1.0]]]), nc=3)
    preds = [torch.randn(4, 2, 8, 8, 8, requires_grad=True), torch.randn(4, 2, 4, 4, 8, requires_grad=True)]
    targets = torch.tensor([[0, 2, 0.5, 0.5, 0.2, 0.3], [3, 0, 0.1, 0.9, 0.1, 0.05], [3, 1, 0.8, 0.2, 0.3, 0.3]])
    total, items = loss(preds, targets)
    assert torch.isfinite(total) and torch.all(torch.isfinite(items)) and torch.all(items > 0)
    assert total.item() == pytest.approx(items.sum().item() * 4, rel=1e-6)
    assert not items.requires_grad
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in preds)


@pytest.mark.parametrize("size_logit", [-9.3, -20.0, -100.0])
def test_vanishing_predicted_box_keeps_gradients_finite(size_logit: float) -> None:
    """A height logit deep in the sigmoid's tail gives a box whose corners coincide in float;
    CIoU's aspect term then divides by zero. The gradient must stay finite, not NaN the run."""
    loss = make_loss(torch.tensor([[[1.0, 1.0]]]))
    preds = one_level_preds(na=1)
    preds[0][0, 0, 3, 3, :4] = torch.tensor([1.9, 6.2, 3.8, size_logit])
    preds[0].requires_grad_(True)
    total, _ = loss(preds, torch.tensor([target(0, 0, 3.5, 3.5, 1.0, 1.0)]))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(preds[0].grad).all()


def test_single_class_has_no_class_loss() -> None:
    loss = make_loss(torch.tensor([[[1.0, 1.0]]]), nc=1)
    preds = [torch.randn(1, 1, GRID, GRID, 6)]
    _, items = loss(preds, torch.tensor([target(0, 0, 4.5, 4.5, 1.0, 1.0)]))
    assert items[2] == 0 and items[0] > 0


def confident_correct_preds(loss: DetectionLoss, targets: torch.Tensor) -> list[torch.Tensor]:
    """Predictions whose class logits strongly favour each assigned target's true class."""
    preds = one_level_preds(na=1)
    (assigned,) = loss.build_targets(preds, targets)
    class_logits = torch.full((len(assigned.classes), 2), -20.0)
    class_logits[torch.arange(len(assigned.classes)), assigned.classes] = 20.0
    preds[0][assigned.image, assigned.anchor, assigned.grid_y, assigned.grid_x, 5:] = class_logits
    return preds


def test_label_smoothing_penalises_confident_classes() -> None:
    anchors = torch.tensor([[[1.0, 1.0]]])
    targets = torch.tensor([target(0, 1, 4.5, 4.5, 1.0, 1.0)])
    plain, smoothed = make_loss(anchors), make_loss(anchors, label_smoothing=0.1)
    preds = confident_correct_preds(plain, targets)
    _, plain_items = plain(preds, targets)
    _, smoothed_items = smoothed(preds, targets)
    assert plain_items[2] < 1e-6
    # Each logit of +-20 against a 0.05 / 0.95 target costs about 0.05 * 20 = 1.
    assert smoothed_items[2] == pytest.approx(1.0, rel=0.01)
    assert smoothed_items[1] == pytest.approx(plain_items[1])


def test_focal_loss_down_weights_objectness_and_classes() -> None:
    torch.manual_seed(1)
    anchors = torch.tensor([[[1.0, 1.0]]])
    preds = [torch.randn(2, 1, GRID, GRID, 7)]
    targets = torch.tensor([target(0, 0, 2.5, 2.5, 1.0, 1.0), target(1, 1, 5.5, 3.5, 2.0, 1.0)])
    _, plain = make_loss(anchors)(preds, targets)
    _, focal = make_loss(anchors, fl_gamma=1.5)(preds, targets)
    assert torch.all(torch.isfinite(focal))
    assert focal[0] == plain[0]  # the box loss is not a BCE
    # alpha_t <= 0.75 and (1 - p_t)^gamma < 1 shrink every BCE term.
    assert 0 < focal[1] < 0.75 * plain[1] and 0 < focal[2] < 0.75 * plain[2]


def test_positive_weight_raises_loss_on_positives() -> None:
    anchors = torch.tensor([[[1.0, 1.0]]])
    preds = [torch.zeros(1, 1, GRID, GRID, 7)]
    targets = torch.tensor([target(0, 1, 4.5, 4.5, 1.0, 1.0)])
    _, plain = make_loss(anchors)(preds, targets)
    weighted_loss = DetectionLoss(anchors, 2, 1.0, 1.0, 1.0, cls_pw=2.0, obj_pw=2.0, anchor_t=4.0)
    _, weighted = weighted_loss(preds, targets)
    assert weighted[1] > plain[1] and weighted[2] > plain[2]


def test_from_model_scales_gains_and_follows_anchor_changes() -> None:
    model = DetectionModel("yolov5n", nc=4)
    loss = DetectionLoss.from_model(model, Hyp(), label_smoothing=0.2, imgsz=320)
    assert loss.box_gain == pytest.approx(0.05)
    assert loss.obj_gain == pytest.approx(0.25)
    assert loss.cls_gain == pytest.approx(0.5 * 4 / 80)
    assert loss.negative_target == pytest.approx(0.1)
    preds = [torch.zeros(1, 3, 320 // s, 320 // s, 9) for s in (8, 16, 32)]
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.05, 0.05]])  # 16 px: matches P3 and P4 anchors
    before = [level.image.numel() for level in loss.build_targets(preds, targets)]
    assert before[0] > 0
    with torch.no_grad():
        model.detect.anchors.mul_(10.0)  # as AutoAnchor does: in place
    after = [level.image.numel() for level in loss.build_targets(preds, targets)]
    assert after[0] == 0 and after != before
    model.double()  # replaces the buffer object; the loss must still find the current one
    assert loss.anchors is model.detect.anchors


@pytest.mark.slow
def test_tiny_model_overfits_one_image() -> None:
    torch.manual_seed(0)
    spec = load_model_spec("yolov5n")
    spec["width_multiple"] = 0.125
    model = DetectionModel(spec, nc=2)
    loss_function = DetectionLoss.from_model(model, Hyp(), imgsz=64)
    images = torch.rand(1, 3, 64, 64).repeat(2, 1, 1, 1)
    boxes = [[0, 0.3, 0.4, 0.25, 0.3], [1, 0.7, 0.6, 0.4, 0.5]]
    targets = torch.tensor([[image, *box] for image in range(2) for box in boxes])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        total, items = loss_function(model(images), targets)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        assert math.isfinite(total.item())
        losses.append(items)
    first, last = losses[0], losses[-1]
    assert last.sum() < 0.75 * first.sum()
    # Boxes improve most; objectness may rise at first since its targets are the growing IoUs.
    assert last[0] < 0.5 * first[0]
