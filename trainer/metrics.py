"""Detection metrics: COCO-style matching and AP, YOLOv5-style precision/recall.

The definitions follow pycocotools' `COCOeval` (bbox, area "all", every label counted,
no crowd regions) so that our mAP@0.5 and mAP@0.5:0.95 are the numbers COCOeval prints
for the same detections:

- matching is per image and class, one-to-one, decided separately at each IoU threshold:
  detections are visited from the highest score down and each takes the unmatched label of
  its class with the highest IoU at or above the threshold (on equal IoU, the later label,
  as COCOeval does);
- AP is the mean, over 101 recall points 0, 0.01, ..., 1, of the precision envelope (the
  best precision at any recall at or above the point), 0 where that recall is never reached;
- detections are ranked by score with a stable sort, so ties keep image order, then the
  order within the image, as in COCOeval;
- the mean runs over the classes that have labels; detections of other classes count nowhere.

Remaining differences from COCOeval: it keeps only the 100 best detections per image *and
class* (`maxDets`), we keep all (NMS already caps an image at `max_det`); it sees boxes and
scores rounded to the 3 and 5 decimals of a results file, which can move an IoU across a
threshold or reorder near-equal scores. On the same unrounded detections, with at most 100
per image and class, the two agree to floating-point precision; the rounding moves mAP by
about 1e-4 at most on realistic sets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

# COCO's IoU thresholds 0.5:0.05:0.95, in double precision so that comparisons at a threshold
# agree with COCOeval's numpy thresholds.
IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10, dtype=torch.float64)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
# Confidence grid on which per-class precision and recall curves are read for the F1 choice.
CONFIDENCE_GRID = np.linspace(0.0, 1.0, 1000)
# Width of the moving average over the mean-F1 curve, as a share of the grid: the reported
# operating point should sit on a plateau, not on a spike of one noisy class.
F1_SMOOTHING_SHARE = 0.1


def match_predictions(
    detections: Tensor, labels: Tensor, iou_thresholds: Tensor = IOU_THRESHOLDS
) -> Tensor:
    """Mark which detections of one image are true positives at each IoU threshold.

    `detections` (n, 6) rows [x1, y1, x2, y2, confidence, class]; `labels` (m, 5) rows
    [class, x1, y1, x2, y2] in the same pixels. Returns a bool (n, len(iou_thresholds)) tensor
    in the detections' order: True where the detection was matched, one-to-one and greedily
    by score as in COCOeval, to a label of its class with IoU at or above the threshold.
    """
    thresholds = iou_thresholds.double().cpu().numpy()
    correct = np.zeros((detections.shape[0], thresholds.size), dtype=bool)
    if detections.shape[0] == 0 or labels.shape[0] == 0:
        return torch.from_numpy(correct)

    iou = box_iou(detections[:, :4].double(), labels[:, 1:].double())
    # -1 lies below every threshold, so a label of another class is never a candidate.
    iou = torch.where(detections[:, 5:6] == labels[:, 0], iou, -1.0).cpu().numpy()
    # Only pairs that clear the lowest threshold can ever match; most detections have none or
    # one, so the greedy loop below walks short Python lists instead of whole rows.
    candidates: list[list[tuple[int, float]]] = [[] for _ in range(len(iou))]
    for detection, label in zip(*np.nonzero(iou >= thresholds.min())):
        candidates[detection].append((int(label), float(iou[detection, label])))

    taken: list[set[int]] = [set() for _ in thresholds]
    for index in np.argsort(-detections[:, 4].cpu().numpy(), kind="stable"):
        if not candidates[index]:
            continue
        for column, threshold in enumerate(thresholds.tolist()):
            best, best_iou = -1, threshold
            for label, overlap in candidates[index]:
                # `>=` against the best so far: on equal IoU the later label wins, as in COCOeval.
                if overlap >= best_iou and label not in taken[column]:
                    best, best_iou = label, overlap
            if best >= 0:
                taken[column].add(best)
                correct[index, column] = True
    return torch.from_numpy(correct)


@dataclass(frozen=True)
class ClassStats:
    """Per-class results for the classes that have at least one label, in class-id order.

    precision, recall and f1 are read at `confidence`, the threshold that maximizes the
    (smoothed) mean F1 over classes at IoU 0.5; `ap` holds one AP per IoU threshold. The curves,
    at IoU 0.5, are what the run folder's PR_curve.png, P/R/F1_curve.png plot.
    """

    class_ids: np.ndarray  # (k,) int
    targets: np.ndarray  # (k,) labels per class
    precision: np.ndarray  # (k,)
    recall: np.ndarray  # (k,)
    f1: np.ndarray  # (k,)
    ap: np.ndarray  # (k, thresholds)
    confidence: float
    precision_curves: np.ndarray  # (k, CONFIDENCE_GRID.size): precision of detections scoring at least each confidence
    recall_curves: np.ndarray  # (k, CONFIDENCE_GRID.size)
    f1_curves: np.ndarray  # (k, CONFIDENCE_GRID.size)
    pr_curves: np.ndarray  # (k, RECALL_POINTS.size): interpolated precision at each recall point, AP@0.5's terms

    @property
    def ap50(self) -> np.ndarray:
        """AP at the first IoU threshold (0.5 for COCO's thresholds)."""
        return self.ap[:, 0]

    @property
    def ap50_95(self) -> np.ndarray:
        """AP averaged over the IoU thresholds."""
        return self.ap.mean(axis=1)


def ap_per_class(
    tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray
) -> ClassStats:
    """Compute per-class AP and F1-optimal precision/recall from matched detections.

    `tp` (n, thresholds) bool from `match_predictions`, `conf` (n,), `pred_cls` (n,) for all
    detections of a data set; `target_cls` (m,) the class of every label.
    """
    tp, conf = np.asarray(tp, dtype=bool), np.asarray(conf, dtype=np.float64)
    pred_cls, target_cls = np.asarray(pred_cls), np.asarray(target_cls)
    class_ids, targets = np.unique(target_cls.astype(np.int64), return_counts=True)
    ap = np.zeros((class_ids.size, tp.shape[1]))
    pr_curves = np.zeros((class_ids.size, RECALL_POINTS.size))
    precision_curves = np.zeros((class_ids.size, CONFIDENCE_GRID.size))
    recall_curves = np.zeros((class_ids.size, CONFIDENCE_GRID.size))
    for row, (class_id, target_count) in enumerate(zip(class_ids, targets)):
        selected = pred_cls == class_id
        order = np.argsort(-conf[selected], kind="stable")
        class_tp, class_conf = tp[selected][order], conf[selected][order]
        interpolated = _interpolated_precision(class_tp, target_count)
        ap[row], pr_curves[row] = interpolated.sum(axis=0) / RECALL_POINTS.size, interpolated[:, 0]
        precision_curves[row], recall_curves[row] = _curves_over_confidence(
            class_tp[:, 0], class_conf, target_count
        )

    f1_curves = 2 * precision_curves * recall_curves / (precision_curves + recall_curves + 1e-16)
    best = int(_moving_average(f1_curves.mean(axis=0)).argmax()) if class_ids.size else 0
    return ClassStats(
        class_ids=class_ids,
        targets=targets,
        precision=precision_curves[:, best],
        recall=recall_curves[:, best],
        f1=f1_curves[:, best],
        ap=ap,
        confidence=float(CONFIDENCE_GRID[best]),
        precision_curves=precision_curves,
        recall_curves=recall_curves,
        f1_curves=f1_curves,
        pr_curves=pr_curves,
    )


def _interpolated_precision(tp: np.ndarray, target_count: int) -> np.ndarray:
    """COCO's interpolated precision at each of the 101 recall points (0 where that recall is never
    reached), one column per column of `tp` (detections sorted by score); AP is their mean."""
    true_positives = np.cumsum(tp, axis=0, dtype=np.float64)
    false_positives = np.cumsum(~tp, axis=0, dtype=np.float64)
    recall = true_positives / target_count
    precision = true_positives / (true_positives + false_positives + np.spacing(1))
    # The envelope: precision at a rank becomes the best precision at any later rank.
    envelope = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
    interpolated = np.zeros((RECALL_POINTS.size, tp.shape[1]))
    for column in range(tp.shape[1]):
        first_rank = np.searchsorted(recall[:, column], RECALL_POINTS, side="left")
        reached = first_rank < tp.shape[0]
        interpolated[reached, column] = envelope[first_rank[reached], column]
    return interpolated


def _curves_over_confidence(
    tp: np.ndarray, conf: np.ndarray, target_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of the detections at or above each confidence of the grid."""
    kept = np.searchsorted(-conf, -CONFIDENCE_GRID, side="right")
    true_positives = np.concatenate([[0.0], np.cumsum(tp, dtype=np.float64)])[kept]
    precision = np.divide(true_positives, kept, out=np.zeros(kept.size), where=kept > 0)
    return precision, true_positives / target_count


def _moving_average(values: np.ndarray) -> np.ndarray:
    width = max(1, round(F1_SMOOTHING_SHARE * values.size)) | 1  # odd keeps the curve centred
    padded = np.pad(values, width // 2, mode="edge")
    return np.convolve(padded, np.ones(width) / width, mode="valid")


@dataclass(frozen=True)
class MatchState:
    """What an accumulator holds: plain arrays, cheap to pickle and to concatenate."""

    tp: np.ndarray  # (n, thresholds) bool
    conf: np.ndarray  # (n,)
    pred_cls: np.ndarray  # (n,)
    target_cls: np.ndarray  # (m,)


class DetectionMetrics:
    """Accumulates matched detections image by image; `compute()` gives the data set's metrics.

    Distributed validation: every rank runs `update` on its own images, passing each image's
    index in the data set as `order`; the ranks exchange `parts()` (e.g. with
    `torch.distributed.all_gather_object`) and `DetectionMetrics.merged(parts).compute()` gives
    exactly the metrics of one process seeing every image in order, equal scores included.
    """

    def __init__(self, iou_thresholds: Tensor = IOU_THRESHOLDS) -> None:
        self.iou_thresholds = iou_thresholds
        self._parts: list[tuple[int, MatchState]] = []

    def update(self, detections: Tensor, labels: Tensor, order: int | None = None) -> None:
        """Add one image: detections (n, 6) xyxy/conf/class, labels (m, 5) class/xyxy, same pixels.

        `order` places the image among all images (its data set index); default: update order.
        """
        detections, labels = detections.detach(), labels.detach()
        state = MatchState(
            tp=match_predictions(detections, labels, self.iou_thresholds).numpy(),
            conf=detections[:, 4].float().cpu().numpy(),
            pred_cls=detections[:, 5].long().cpu().numpy(),
            target_cls=labels[:, 0].long().cpu().numpy(),
        )
        self._parts.append((len(self._parts) if order is None else order, state))

    def parts(self) -> list[tuple[int, MatchState]]:
        """The per-image states with their order keys: what ranks exchange."""
        return list(self._parts)

    def state(self) -> MatchState:
        """Everything accumulated so far, concatenated in image order."""
        parts = [state for _, state in sorted(self._parts, key=lambda part: part[0])]
        # The empty first entry fixes shape and dtype when nothing was added.
        return MatchState(
            tp=np.concatenate([np.zeros((0, len(self.iou_thresholds)), bool)] + [part.tp for part in parts]),
            conf=np.concatenate([np.zeros(0, np.float32)] + [part.conf for part in parts]),
            pred_cls=np.concatenate([np.zeros(0, np.int64)] + [part.pred_cls for part in parts]),
            target_cls=np.concatenate([np.zeros(0, np.int64)] + [part.target_cls for part in parts]),
        )

    @classmethod
    def merged(
        cls, parts_per_rank: Iterable[list[tuple[int, MatchState]]], iou_thresholds: Tensor = IOU_THRESHOLDS
    ) -> DetectionMetrics:
        """A fresh accumulator holding every rank's `parts()`, ordered by their keys."""
        metrics = cls(iou_thresholds)
        for parts in parts_per_rank:
            metrics._parts.extend(parts)
        return metrics

    def compute(self) -> DetectionScores:
        """The data set's scores: means over labelled classes and the per-class numbers behind them."""
        state = self.state()
        stats = ap_per_class(state.tp, state.conf, state.pred_cls, state.target_cls)
        means = [float(values.mean()) if stats.class_ids.size else 0.0
                 for values in (stats.precision, stats.recall, stats.ap50, stats.ap50_95)]
        return DetectionScores(*means, classes=stats, images=len(self._parts))


@dataclass(frozen=True)
class DetectionScores:
    """Precision, recall, mAP@0.5 and mAP@0.5:0.95 averaged over the labelled classes, the
    per-class numbers and curves behind them, and how many images were scored."""

    precision: float
    recall: float
    map50: float
    map: float
    classes: ClassStats
    images: int


CONFUSION_CONF, CONFUSION_IOU = 0.25, 0.45  # YOLOv5's thresholds for its confusion matrix


class ConfusionMatrix:
    """Counts of (predicted class, true class) pairs over a data set, YOLOv5's confusion matrix.

    Row and column `nc` are the background. Detections at or below `conf` are ignored. A
    detection and a label of any classes pair up when their IoU is above `iou`, each at most
    once, the pairs of highest IoU first. A label left without a detection counts as missed
    (background row); a detection left without a label as a false alarm (background column).
    """

    def __init__(self, nc: int, conf: float = CONFUSION_CONF, iou: float = CONFUSION_IOU) -> None:
        self.nc, self.conf, self.iou = nc, conf, iou
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def update(self, detections: Tensor, labels: Tensor) -> None:
        """One image: detections (n, 6) xyxy/conf/class, labels (m, 5) class/xyxy, same pixels."""
        detections = detections[detections[:, 4] > self.conf]
        predicted = detections[:, 5].long().cpu().numpy()
        true = labels[:, 0].long().cpu().numpy()
        matched_labels: set[int] = set()
        matched_detections: set[int] = set()
        if len(predicted) and len(true):
            iou = box_iou(labels[:, 1:].double(), detections[:, :4].double()).cpu().numpy()
            label_rows, detection_columns = np.nonzero(iou > self.iou)
            for order in np.argsort(-iou[label_rows, detection_columns], kind="stable"):
                label, detection = int(label_rows[order]), int(detection_columns[order])
                if label not in matched_labels and detection not in matched_detections:
                    matched_labels.add(label)
                    matched_detections.add(detection)
                    self.matrix[predicted[detection], true[label]] += 1
        for label in set(range(len(true))) - matched_labels:
            self.matrix[self.nc, true[label]] += 1
        for detection in set(range(len(predicted))) - matched_detections:
            self.matrix[predicted[detection], self.nc] += 1

