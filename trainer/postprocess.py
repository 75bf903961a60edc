"""From raw detector outputs to final boxes: confidence filtering, NMS, and undoing the letterbox."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_convert

from trainer.errors import UserError

# Candidates kept per image before NMS. An untrained model at conf_thres 0.001 can pass
# every anchor of every class; NMS cost grows with the square of the candidate count.
MAX_NMS_CANDIDATES = 30_000

# ((h0, w0), ((ratio_h, ratio_w), (pad_w, pad_h))): how an image of h0×w0 pixels was resized and
# padded into the network input, as the data pipeline records it for each image.
LetterboxShapes = tuple[tuple[int, int], tuple[tuple[float, float], tuple[float, float]]]


def non_max_suppression(
    prediction: Tensor,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    multi_label: bool = False,
    agnostic: bool = False,
) -> list[Tensor]:
    """Turn decoded head outputs into per-image detections.

    `prediction` is (batch, anchors, 5 + classes) with rows [cx, cy, w, h, objectness, class
    probabilities...], scores already passed through a sigmoid. A candidate's confidence is
    objectness × class probability. With `multi_label` a box yields one candidate for every
    class above `conf_thres` (better recall, used for validation); otherwise only its best class.
    NMS runs per class unless `agnostic`. Returns one (n, 6) tensor per image, rows
    [x1, y1, x2, y2, confidence, class], sorted by confidence, at most `max_det` rows.
    """
    _check_fraction("conf_thres", conf_thres)
    _check_fraction("iou_thres", iou_thres)
    if max_det < 1:
        raise UserError(f"max_det must be at least 1, got {max_det}")
    return [
        _suppress_one_image(image_prediction, conf_thres, iou_thres, max_det, multi_label, agnostic)
        for image_prediction in prediction
    ]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name} must be between 0 and 1, got {value}")


def _suppress_one_image(
    prediction: Tensor,
    conf_thres: float,
    iou_thres: float,
    max_det: int,
    multi_label: bool,
    agnostic: bool,
) -> Tensor:
    # Class probabilities are at most 1, so a low objectness rules a row out before the
    # (anchors × classes) product is formed.
    prediction = prediction[prediction[:, 4] > conf_thres]
    class_scores = prediction[:, 5:] * prediction[:, 4:5]
    boxes = box_convert(prediction[:, :4], in_fmt="cxcywh", out_fmt="xyxy")
    if multi_label:
        box_index, classes = (class_scores > conf_thres).nonzero(as_tuple=True)
        boxes, scores = boxes[box_index], class_scores[box_index, classes]
    else:
        scores, classes = class_scores.max(dim=1)
        keep = scores > conf_thres
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]

    if scores.numel() > MAX_NMS_CANDIDATES:
        top = scores.topk(MAX_NMS_CANDIDATES).indices
        boxes, scores, classes = boxes[top], scores[top], classes[top]

    groups = torch.zeros_like(classes) if agnostic else classes
    keep = batched_nms(boxes, scores, groups, iou_thres)[:max_det]
    return torch.cat(
        [boxes[keep], scores[keep, None], classes[keep, None].to(boxes.dtype)], dim=1
    )


def scale_boxes(boxes: Tensor, shapes: LetterboxShapes) -> Tensor:
    """Map xyxy boxes from letterboxed network-input pixels back to original-image pixels.

    `shapes` is ((h0, w0), ((ratio_h, ratio_w), (pad_w, pad_h))): the original size, the resize
    ratios and the padding added on the left and top. The result is a new tensor, clipped to
    the original image.
    """
    (height, width), ((ratio_h, ratio_w), (pad_w, pad_h)) = shapes
    offset = boxes.new_tensor([pad_w, pad_h, pad_w, pad_h])
    ratio = boxes.new_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    scaled = (boxes[..., :4] - offset) / ratio
    upper = boxes.new_tensor([width, height, width, height])
    return torch.minimum(scaled.clamp(min=0), upper)
