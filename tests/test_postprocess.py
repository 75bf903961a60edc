"""NMS behaviour on hand-made head outputs, and undoing a letterbox."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from trainer.errors import UserError
from trainer.postprocess import non_max_suppression, scale_boxes


def _rows(*rows: tuple[float, ...]) -> Tensor:
    """One image's head output from rows (cx, cy, w, h, objectness, class scores...)."""
    return torch.tensor(rows, dtype=torch.float32)[None]


def test_output_is_xyxy_confidence_class() -> None:
    (output,) = non_max_suppression(_rows((50, 40, 20, 10, 0.8, 0.1, 0.5)))
    torch.testing.assert_close(output, torch.tensor([[40.0, 35, 60, 45, 0.4, 1]]))


def test_overlapping_boxes_of_one_class_are_suppressed() -> None:
    prediction = _rows(
        (50, 50, 40, 40, 0.9, 1.0, 0.0),
        (52, 50, 40, 40, 0.8, 1.0, 0.0),  # IoU 0.90 with the first: suppressed
        (150, 50, 40, 40, 0.7, 1.0, 0.0),  # far away: kept
    )
    (output,) = non_max_suppression(prediction, iou_thres=0.6)
    assert output[:, 4].tolist() == pytest.approx([0.9, 0.7])
    (loose,) = non_max_suppression(prediction, iou_thres=0.95)
    assert len(loose) == 3


def test_different_classes_survive_unless_agnostic() -> None:
    prediction = _rows((50, 50, 40, 40, 0.9, 1.0, 0.0), (51, 50, 40, 40, 0.8, 0.0, 1.0))
    (per_class,) = non_max_suppression(prediction)
    assert per_class[:, 5].tolist() == [0, 1]
    (agnostic,) = non_max_suppression(prediction, agnostic=True)
    assert agnostic[:, 5].tolist() == [0]


def test_confidence_is_objectness_times_class_probability() -> None:
    prediction = _rows(
        (50, 50, 10, 10, 0.5, 0.5, 0.0),  # 0.25: kept
        (150, 50, 10, 10, 0.9, 0.2, 0.0),  # 0.18: dropped although objectness is high
        (250, 50, 10, 10, 0.1, 1.0, 0.0),  # 0.10: dropped
    )
    (output,) = non_max_suppression(prediction, conf_thres=0.2)
    assert output[:, 4].tolist() == pytest.approx([0.25])


def test_max_det_keeps_the_most_confident() -> None:
    rows = [(20.0 * index, 10, 10, 10, 0.1 + 0.02 * index, 1.0) for index in range(40)]
    (output,) = non_max_suppression(_rows(*rows), max_det=5)
    assert output[:, 4].tolist() == pytest.approx([0.88, 0.86, 0.84, 0.82, 0.80])


def test_multi_label_keeps_every_class_above_threshold() -> None:
    prediction = _rows((50, 50, 40, 40, 1.0, 0.6, 0.3, 0.0005))
    (single,) = non_max_suppression(prediction)
    assert single[:, 5].tolist() == [0]
    (multi,) = non_max_suppression(prediction, multi_label=True)
    assert multi[:, 5].tolist() == [0, 1] and multi[:, 4].tolist() == pytest.approx([0.6, 0.3])


def test_batch_gives_one_tensor_per_image_even_when_empty() -> None:
    prediction = torch.cat([_rows((50, 50, 10, 10, 0.9, 1.0)), _rows((50, 50, 10, 10, 0.0, 1.0))])
    outputs = non_max_suppression(prediction)
    assert [tuple(output.shape) for output in outputs] == [(1, 6), (0, 6)]


def test_bad_thresholds_are_reported() -> None:
    with pytest.raises(UserError, match="conf_thres"):
        non_max_suppression(_rows((50, 50, 10, 10, 0.9, 1.0)), conf_thres=1.5)
    with pytest.raises(UserError, match="max_det"):
        non_max_suppression(_rows((50, 50, 10, 10, 0.9, 1.0)), max_det=0)


def test_scale_boxes_undoes_a_letterbox() -> None:
    # A 300×500 (h×w) image resized by 64/500 to 38.4×64 and padded to 64×64 (12.8 above).
    height, width, size = 300, 500, 64
    ratio = size / width
    pad_w, pad_h = 0.0, (size - height * ratio) / 2
    original = torch.tensor([[0.0, 0.0, 500.0, 300.0], [120.5, 33.0, 260.0, 290.25]])
    letterboxed = original * ratio + torch.tensor([pad_w, pad_h, pad_w, pad_h])
    shapes = ((height, width), ((ratio, ratio), (pad_w, pad_h)))
    restored = scale_boxes(letterboxed, shapes)
    torch.testing.assert_close(restored, original)
    assert letterboxed.data_ptr() != restored.data_ptr()


def test_scale_boxes_uses_each_axis_ratio_and_clips() -> None:
    shapes = ((100, 200), ((0.5, 0.25), (4.0, 2.0)))  # ratios (h, w), padding (w, h)
    boxes = torch.tensor([[14.0, 12.0, 54.0, 32.0], [0.0, 0.0, 60.0, 60.0]])
    torch.testing.assert_close(
        scale_boxes(boxes, shapes), torch.tensor([[40.0, 20.0, 200.0, 60.0], [0.0, 0.0, 200.0, 100.0]])
    )
