"""YOLOv5's detection loss: anchor-ratio target assignment, CIoU box loss, BCE objectness and classes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

if TYPE_CHECKING:
    from trainer.config import Hyp
    from trainer.model.yolo import DetectionModel

# Objectness weight per level: fine levels have many more cells with no object, so their
# (smaller per-cell) loss is weighted up. YOLOv5's values for 3 levels, and for 4-5 levels.
OBJECTNESS_BALANCE = {3: [4.0, 1.0, 0.4]}
OBJECTNESS_BALANCE_DEFAULT = [4.0, 1.0, 0.25, 0.06, 0.02]
FOCAL_ALPHA = 0.25
NEIGHBOUR_OFFSET = 0.5  # a centre this close to a cell edge also trains the cell across it
MIN_BOX_SIZE = 1e-4  # grid cells; see the box loss

AnchorSource = torch.Tensor | Callable[[], torch.Tensor]


def scale_loss_gains(box: float, obj: float, cls: float, nl: int, nc: int, imgsz: int) -> tuple[float, float, float]:
    """Scale the hyp file's gains (tuned for 3 levels, 80 classes, 640 px) to this model and image size."""
    level_scale = 3 / nl
    return box * level_scale, obj * (imgsz / 640) ** 2 * level_scale, cls * nc / 80 * level_scale


@dataclass
class LevelTargets:
    """Targets assigned to one detection level, one row per (target, anchor, cell) pair."""

    image: torch.Tensor  # (P,) image index in the batch
    anchor: torch.Tensor  # (P,) anchor index within the level
    grid_y: torch.Tensor  # (P,) cell row
    grid_x: torch.Tensor  # (P,) cell column
    cell: torch.Tensor  # (P,) the same four as one index into the level's (B * na * ny * nx) predictions
    box: torch.Tensor  # (P, 4) centre relative to the cell, then w, h; grid units
    anchor_wh: torch.Tensor  # (P, 2) the matched anchor, grid units
    classes: torch.Tensor  # (P,) class index

    def to(self, device: torch.device) -> LevelTargets:
        """On `device`, copied without waiting for it (the host tensors are fresh and unshared)."""
        return LevelTargets(**{name: value.to(device, non_blocking=True) for name, value in vars(self).items()})


def complete_iou_loss(predicted: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - CIoU of paired (cx, cy, w, h) boxes, per pair: torchvision.ops.complete_box_iou_loss's
    value and gradient on the corner form, without its wait for the GPU.

    torchvision keeps only overlapping pairs' intersections through boolean indexing, whose
    data-dependent shape makes each call wait for the GPU to finish all queued work (a dozen
    times a training step). Clamping the intersection's sides at zero gives the same numbers.
    """
    x1, y1, x2, y2 = box_convert(predicted, "cxcywh", "xyxy").unbind(-1)
    gx1, gy1, gx2, gy2 = box_convert(target, "cxcywh", "xyxy").unbind(-1)
    width, height, target_width, target_height = x2 - x1, y2 - y1, gx2 - gx1, gy2 - gy1
    intersection = (torch.min(x2, gx2) - torch.max(x1, gx1)).clamp(min=0) * (
        torch.min(y2, gy2) - torch.max(y1, gy1)
    ).clamp(min=0)
    iou = intersection / (width * height + target_width * target_height - intersection + eps)
    # Distance between centres, over the diagonal of the smallest box enclosing both (DIoU).
    enclosing = (torch.max(x2, gx2) - torch.min(x1, gx1)) ** 2 + (torch.max(y2, gy2) - torch.min(y1, gy1)) ** 2 + eps
    centres = ((x1 + x2 - gx1 - gx2) ** 2 + (y1 + y2 - gy1 - gy2) ** 2) / 4
    # Aspect-ratio consistency, weighted by alpha, which is held constant (CIoU).
    aspect = 4 / math.pi**2 * (torch.atan(target_width / target_height) - torch.atan(width / height)) ** 2
    with torch.no_grad():
        alpha = aspect / (1 - iou + aspect + eps)
    return 1 - iou + centres / enclosing + alpha * aspect


def _binary_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, pos_weight: float, focal_gamma: float
) -> torch.Tensor:
    """Mean BCE with a positive-class weight; with focal_gamma > 0, the focal-loss form that
    scales each term by alpha_t * (1 - p_t)^gamma so easy examples count less."""
    weight = torch.full((1,), pos_weight, device=logits.device)  # filled on the device: no host copy
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="none")
    if focal_gamma > 0:
        probability = logits.sigmoid()
        p_t = target * probability + (1 - target) * (1 - probability)
        alpha_t = target * FOCAL_ALPHA + (1 - target) * (1 - FOCAL_ALPHA)
        loss = loss * alpha_t * (1 - p_t) ** focal_gamma
    return loss.mean()


class DetectionLoss:
    """Computes YOLOv5's training loss from the raw per-level predictions.

    `anchors` is the (nl, na, 2) anchor tensor in grid units, or a function returning it; it is
    read on every call, so anchors replaced in place by AutoAnchor are used from then on.
    """

    def __init__(
        self,
        anchors: AnchorSource,
        nc: int,
        box_gain: float,
        obj_gain: float,
        cls_gain: float,
        cls_pw: float,
        obj_pw: float,
        anchor_t: float,
        fl_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        self._anchor_source = anchors
        self.nc = nc
        self.box_gain, self.obj_gain, self.cls_gain = box_gain, obj_gain, cls_gain
        self.cls_pw, self.obj_pw = cls_pw, obj_pw
        self.anchor_t = anchor_t
        self.fl_gamma = fl_gamma
        # Smoothed BCE targets: positives 1 - eps/2, negatives eps/2.
        self.positive_target = 1.0 - 0.5 * label_smoothing
        self.negative_target = 0.5 * label_smoothing
        self._anchor_copy: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_model(
        cls, model: DetectionModel, hyp: Hyp, label_smoothing: float = 0.0, imgsz: int = 640
    ) -> DetectionLoss:
        """Loss for `model` with the hyp gains scaled to its levels, classes and image size.

        Anchors are looked up on the model's Detect head at each call, so moving the model to
        another device or AutoAnchor rewriting them never leaves the loss with stale anchors.
        """
        detect = model.detect
        box, obj, cls_gain = scale_loss_gains(hyp.box, hyp.obj, hyp.cls, detect.nl, detect.nc, imgsz)
        return cls(
            anchors=lambda: detect.anchors,
            nc=detect.nc,
            box_gain=box,
            obj_gain=obj,
            cls_gain=cls_gain,
            cls_pw=hyp.cls_pw,
            obj_pw=hyp.obj_pw,
            anchor_t=hyp.anchor_t,
            fl_gamma=hyp.fl_gamma,
            label_smoothing=label_smoothing,
        )

    @property
    def anchors(self) -> torch.Tensor:
        source = self._anchor_source
        return source() if callable(source) else source

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """preds: raw (B, na, ny, nx, 5+nc) per level; targets: (N, 6) rows of
        [image, class, cx, cy, w, h], normalised to the input image. Targets on the host (as the
        loader gives them) are assigned there, so nothing waits for the GPU.

        Returns (total loss x batch size, detached [box, obj, cls] loss tensor).
        """
        device = preds[0].device
        box_loss = torch.zeros((), device=device)
        obj_loss = torch.zeros((), device=device)
        cls_loss = torch.zeros((), device=device)
        balance = OBJECTNESS_BALANCE.get(len(preds), OBJECTNESS_BALANCE_DEFAULT)
        for level, (pred, assigned) in enumerate(zip(preds, self.build_targets(preds, targets), strict=True)):
            cells = pred.reshape(-1, pred.shape[-1])
            objectness_target = torch.zeros(cells.shape[0], device=device)
            if assigned.cell.numel():
                xy, wh, _, class_logits = cells[assigned.cell].float().split((2, 2, 1, self.nc), dim=1)
                # Same parameterisation as Detect's decoding, in grid units relative to the cell.
                # Sizes are floored: a size that vanishes next to its centre makes the corners
                # coincide in float, and CIoU's aspect term (atan(w / h), no epsilon) then
                # back-propagates NaN. The floor only binds where the sigmoid is saturated anyway.
                size = ((wh.sigmoid() * 2) ** 2 * assigned.anchor_wh).clamp(min=MIN_BOX_SIZE)
                predicted_box = torch.cat((xy.sigmoid() * 2 - 0.5, size), 1)
                ciou_loss = complete_iou_loss(predicted_box, assigned.box)
                box_loss = box_loss + ciou_loss.mean()
                # A cell's objectness target is how well its box fits, so confidence ranks quality.
                objectness_target[assigned.cell] = (1.0 - ciou_loss).detach().clamp(min=0)
                if self.nc > 1:  # a single class needs no class score beyond objectness
                    is_class = assigned.classes[:, None] == torch.arange(self.nc, device=device)
                    class_target = torch.where(is_class, self.positive_target, self.negative_target)
                    cls_loss = cls_loss + _binary_cross_entropy(class_logits, class_target, self.cls_pw, self.fl_gamma)
            level_obj = _binary_cross_entropy(cells[:, 4].float(), objectness_target, self.obj_pw, self.fl_gamma)
            obj_loss = obj_loss + level_obj * balance[level]
        box_loss = box_loss * self.box_gain
        obj_loss = obj_loss * self.obj_gain
        cls_loss = cls_loss * self.cls_gain
        batch_size = preds[0].shape[0]
        return (box_loss + obj_loss + cls_loss) * batch_size, torch.stack((box_loss, obj_loss, cls_loss)).detach()

    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor) -> list[LevelTargets]:
        """Assign every target to each level's anchors within anchor_t of its shape.

        The assignment runs where the targets are and is then moved to the predictions' device.
        On the host, its data-dependent shapes cost no GPU synchronisation.
        """
        anchors = self._anchors_on(targets.device)
        targets = targets.float()
        return [
            self._assign_level(targets, anchors[level], pred.shape[2], pred.shape[3]).to(pred.device)
            for level, pred in enumerate(preds)
        ]

    def _anchors_on(self, device: torch.device) -> torch.Tensor:
        """The current anchors as float32 on `device`, copied only after they change.

        A copy from the GPU waits for all queued work, so the host copy is kept and renewed when
        the anchors are replaced or edited in place (AutoAnchor, loading a checkpoint), which
        moves their version counter.
        """
        anchors = self.anchors
        key = (anchors.data_ptr(), anchors.device, anchors._version, device)
        if self._anchor_copy is None or self._anchor_copy[0] != key:
            self._anchor_copy = (key, anchors.detach().to(device=device, dtype=torch.float32, copy=True))
        return self._anchor_copy[1]

    def _assign_level(self, targets: torch.Tensor, anchors: torch.Tensor, grid_h: int, grid_w: int) -> LevelTargets:
        """Targets whose w/h are within a factor anchor_t of an anchor go to that anchor, in the
        cell holding their centre and in the (up to) two neighbouring cells nearest the centre.

        The decoded centre can reach half a cell outside its own cell, so those neighbours can
        predict the box too; training them triples the positives.
        """
        scale = targets.new_tensor([grid_w, grid_h, grid_w, grid_h])
        boxes = targets[:, 2:6] * scale  # cx, cy, w, h in grid units
        ratio = boxes[None, :, 2:4] / anchors[:, None]  # (na, N, 2)
        within = torch.maximum(ratio, 1 / ratio).amax(dim=2) < self.anchor_t
        anchor_index, target_index = within.nonzero(as_tuple=True)
        boxes = boxes[target_index]
        centre = boxes[:, :2]
        from_far_side = scale[:2] - centre  # distance to the right / bottom edge of the grid
        near_low = (centre % 1 < NEIGHBOUR_OFFSET) & (centre > 1)  # left / upper neighbour exists
        near_high = (from_far_side % 1 < NEIGHBOUR_OFFSET) & (from_far_side > 1)  # right / lower one
        own = torch.ones_like(near_low[:, :1])
        use = torch.cat((own, near_low, near_high), dim=1)  # (P, 5): own, left, up, right, down
        offsets = targets.new_tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]]) * NEIGHBOUR_OFFSET
        pair_index, offset_index = use.nonzero(as_tuple=True)
        cell = (centre[pair_index] - offsets[offset_index]).long()
        grid_x = cell[:, 0].clamp(0, grid_w - 1)
        grid_y = cell[:, 1].clamp(0, grid_h - 1)
        cell_xy = torch.stack((grid_x, grid_y), dim=1).to(boxes.dtype)
        chosen = target_index[pair_index]
        image, anchor = targets[chosen, 0].long(), anchor_index[pair_index]
        return LevelTargets(
            image=image,
            anchor=anchor,
            grid_y=grid_y,
            grid_x=grid_x,
            cell=((image * len(anchors) + anchor) * grid_h + grid_y) * grid_w + grid_x,
            box=torch.cat((centre[pair_index] - cell_xy, boxes[pair_index, 2:4]), dim=1),
            anchor_wh=anchors[anchor_index[pair_index]],
            classes=targets[chosen, 1].long(),
        )
