"""mAP against pycocotools on a realistic synthetic set, plus small cases computed by hand."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from trainer.coco import (
    COCO80_TO_91,
    coco_ground_truth,
    coco_records,
    image_id_from_path,
    write_ground_truth_json,
    write_predictions_json,
)
from trainer.metrics import ConfusionMatrix, DetectionMetrics, ap_per_class, match_predictions

WIDTH, HEIGHT = 640, 480
LABELLED_CLASSES = 3
# One more class than the labels use: false positives of it must count nowhere, as in COCO.
PREDICTED_CLASSES = LABELLED_CLASSES + 1


def _box_iou(first: np.ndarray, second: np.ndarray) -> float:
    width = max(0.0, min(first[2], second[2]) - max(first[0], second[0]))
    height = max(0.0, min(first[3], second[3]) - max(first[1], second[1]))
    intersection = width * height
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return intersection / (area(first) + area(second) - intersection)


def _jitter(rng: np.random.Generator, box: np.ndarray, spread: float) -> np.ndarray:
    size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    moved = box + rng.normal(0.0, spread, 4) * size
    x1, x2 = np.clip(np.sort(moved[[0, 2]]), 0, WIDTH)
    y1, y2 = np.clip(np.sort(moved[[1, 3]]), 0, HEIGHT)
    return np.array([x1, y1, max(x2, x1 + 2.0), max(y2, y1 + 2.0)])


def _synthetic_image(rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Labels and detections of one image: jittered hits, misses, duplicates, false positives."""
    count = int(rng.integers(0, 9))
    sizes = rng.uniform(8, 220, (count, 2))
    corners = rng.uniform(0, 1, (count, 2)) * ([WIDTH, HEIGHT] - sizes)
    boxes = np.concatenate([corners, corners + sizes], axis=1)
    classes = rng.integers(0, LABELLED_CLASSES, count)
    labels = np.concatenate([classes[:, None], boxes], axis=1)

    rows: list[list[float]] = []
    for class_id, box in zip(classes, boxes):
        if rng.random() < 0.15:
            continue  # a miss
        for copy in range(1 + int(rng.random() < 0.15)):  # sometimes a duplicate
            predicted = _jitter(rng, box, rng.uniform(0.0, 0.2))
            score = np.clip(_box_iou(predicted, box) + rng.normal(0, 0.15), 0.01, 1.0)
            score *= 0.6 if copy else 1.0
            wrong_class = rng.random() < 0.05
            predicted_class = rng.integers(0, PREDICTED_CLASSES) if wrong_class else class_id
            rows.append([*predicted, score, predicted_class])
    rows.extend([*_jitter(rng, rng.uniform(0, 400, 4), 0.0), 0.6 * rng.random() ** 2 + 0.001,
                 rng.integers(0, PREDICTED_CLASSES)]
                for _ in range(int(rng.integers(0, 30))))  # background clutter, mostly at low scores
    detections = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    detections = detections[detections[:, 4].argsort(descending=True)][:100]
    return detections, torch.tensor(labels, dtype=torch.float32).reshape(-1, 5)


def _pycocotools_map(
    images: list[tuple[int, Tensor, Tensor]], folder: Path
) -> tuple[float, float, np.ndarray]:
    """mAP@0.5:0.95, mAP@0.5 and per-class AP@0.5:0.95 (-1 = no labels) from COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = coco_ground_truth(
        ((image_id, (HEIGHT, WIDTH), labels) for image_id, _, labels in images),
        class_names=[f"class{index}" for index in range(PREDICTED_CLASSES)],
    )
    records = [
        record for image_id, detections, _ in images for record in coco_records(detections, image_id)
    ]
    write_ground_truth_json(dataset, folder / "labels.json")
    write_predictions_json(records, folder / "predictions.json")
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(folder / "labels.json"))
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(str(folder / "predictions.json")), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # precision[threshold, recall point, class, area "all", maxDets 100]
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    per_class = np.where((precision > -1).all(axis=(0, 1)), precision.mean(axis=(0, 1)), -1.0)
    return float(evaluation.stats[0]), float(evaluation.stats[1]), per_class


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_agrees_with_pycocotools(seed: int, tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(seed)
    images = [(image_id, *_synthetic_image(rng)) for image_id in range(1, 51)]
    metrics = DetectionMetrics()
    for _, detections, labels in images:
        metrics.update(detections, labels)
    ours = metrics.compute()

    coco_map, coco_map50, coco_per_class = _pycocotools_map(images, tmp_path)

    # The set is hard enough for the comparison to mean something.
    assert 0.2 < coco_map < 0.9 and coco_map50 > coco_map
    # Only the rounding of the results file separates the two (about 1e-4 at most), so a
    # tolerance well under 0.01 still passes and catches small slips such as a missing
    # precision envelope.
    assert ours.map == pytest.approx(coco_map, abs=1e-3)
    assert ours.map50 == pytest.approx(coco_map50, abs=1e-3)
    assert list(ours.classes.class_ids) == list(np.flatnonzero(coco_per_class > -1))
    np.testing.assert_allclose(ours.classes.ap50_95, coco_per_class[coco_per_class > -1], atol=1e-3)


def _labels_and_boxes() -> tuple[Tensor, Tensor]:
    labels = torch.tensor([[0, 10, 10, 60, 60], [1, 100, 100, 180, 150], [0, 200, 20, 260, 90.0]])
    detections = torch.cat([labels[:, 1:], torch.tensor([[0.9], [0.8], [0.7]]), labels[:, :1]], 1)
    return detections, labels


def test_perfect_predictions_give_map_one() -> None:
    detections, labels = _labels_and_boxes()
    metrics = DetectionMetrics()
    metrics.update(detections, labels)
    metrics.update(detections[:0], labels[:0])  # an image with nothing in it changes nothing
    result = metrics.compute()
    assert result.map == pytest.approx(1.0) and result.map50 == pytest.approx(1.0)
    assert result.precision == pytest.approx(1.0) and result.recall == pytest.approx(1.0)
    assert list(result.classes.targets) == [2, 1]


def test_no_predictions_give_zero() -> None:
    detections, labels = _labels_and_boxes()
    metrics = DetectionMetrics()
    metrics.update(detections[:0], labels)
    result = metrics.compute()
    assert (result.map, result.map50, result.precision, result.recall) == (0, 0, 0, 0)
    assert list(result.classes.class_ids) == [0, 1]


def test_no_labels_anywhere_gives_zero() -> None:
    detections, labels = _labels_and_boxes()
    metrics = DetectionMetrics()
    metrics.update(detections, labels[:0])
    result = metrics.compute()
    assert result.map == 0.0 and result.classes.class_ids.size == 0


def test_hand_computed_average_precision() -> None:
    # 3 labels; by score: hit, miss, hit, miss, hit -> recall 1/3 1/3 2/3 2/3 1,
    # precision 1 1/2 2/3 1/2 3/5, envelope 1 2/3 2/3 3/5 3/5.
    # 101 recall points: 34 in [0, 1/3] read 1, 33 in (1/3, 2/3] read 2/3, 34 in (2/3, 1] read 3/5.
    hits = np.array([True, False, True, False, True])
    tp = np.stack([hits] * 5 + [np.zeros(5, bool)] * 5, axis=1)  # hits only at IoU 0.5..0.7
    conf = np.array([0.5, 0.6, 0.7, 0.8, 0.9])[::-1]
    stats = ap_per_class(tp, conf, np.zeros(5), np.zeros(3))
    expected = (34 * 1 + 33 * 2 / 3 + 34 * 3 / 5) / 101
    assert stats.ap50[0] == pytest.approx(expected)
    assert stats.ap50_95[0] == pytest.approx(expected / 2)
    # Best F1 keeps all five detections: precision 3/5, recall 1 (F1 0.75 against 2/3 above 0.6).
    assert stats.precision[0] == pytest.approx(3 / 5) and stats.recall[0] == pytest.approx(1.0)
    # The PR curve is the envelope at the recall points: AP@0.5 is its mean.
    assert stats.pr_curves[0].tolist() == pytest.approx([1.0] * 34 + [2 / 3] * 33 + [3 / 5] * 34)
    assert stats.pr_curves[0].mean() == pytest.approx(stats.ap50[0])


def test_confusion_matrix_counts_pairs_misses_and_false_alarms() -> None:
    labels = torch.tensor([[0.0, 0, 0, 10, 10], [1.0, 20, 0, 30, 10], [2.0, 40, 0, 50, 10], [1.0, 60, 0, 70, 10]])
    detections = torch.tensor([
        [0.0, 0, 10, 10, 0.9, 0],  # on label 0, right class
        [0.0, 0, 10, 9, 0.7, 0],  # on label 0 again: already taken, a false alarm
        [20.0, 0, 30, 10, 0.8, 0],  # on the class-1 label, called class 0
        [40.0, 0, 50, 10, 0.2, 2],  # on the class-2 label, below the confidence: that label is missed
        [80.0, 0, 90, 10, 0.5, 1],  # on nothing
        [61.0, 0, 69, 10, 0.6, 1],  # IoU 0.8 with the last label, 0 with any other
    ])
    confusion = ConfusionMatrix(nc=3)
    confusion.update(detections, labels)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = 1  # predicted row, true column
    expected[3, 2] = 1  # missed: background row
    expected[0, 3] = expected[1, 3] = 1  # false alarms: background column
    np.testing.assert_array_equal(confusion.matrix, expected)
    confusion.update(detections[:0], labels[:1])  # an image without detections
    confusion.update(detections[:1], labels[:0])  # an image without labels
    assert confusion.matrix[3, 0] == 1 and confusion.matrix[0, 3] == 2
    overlapping = ConfusionMatrix(nc=2)  # one detection over two labels takes the one of higher IoU
    two_labels = torch.tensor([[0.0, 0, 0, 10, 8], [1.0, 0, 0, 10, 10]])
    overlapping.update(torch.tensor([[0.0, 0, 10, 10, 0.9, 0]]), two_labels)
    np.testing.assert_array_equal(overlapping.matrix, [[0, 1, 0], [0, 0, 0], [1, 0, 0]])


def test_ap_does_not_depend_on_input_order() -> None:
    rng = np.random.default_rng(3)
    tp, conf = rng.random((40, 10)) < 0.5, rng.random(40)
    classes, targets = rng.integers(0, 3, 40), rng.integers(0, 3, 30)
    shuffled = rng.permutation(40)
    first = ap_per_class(tp, conf, classes, targets)
    second = ap_per_class(tp[shuffled], conf[shuffled], classes[shuffled], targets)
    np.testing.assert_allclose(first.ap, second.ap)


def test_match_marks_thresholds_up_to_the_iou() -> None:
    labels = torch.tensor([[0, 0, 0, 100, 100.0]])
    detections = torch.tensor([[0, 0, 100, 62, 0.9, 0]])  # IoU 0.62
    correct = match_predictions(detections, labels)
    assert correct.tolist() == [[True] * 3 + [False] * 7]


def test_match_is_one_to_one_by_score_at_each_threshold() -> None:
    labels = torch.tensor([[0, 0, 0, 100, 100.0]])
    detections = torch.tensor([
        [0, 0, 100, 93, 0.8, 0],  # IoU 0.93, lower score
        [0, 0, 100, 70, 0.9, 0],  # IoU 0.70, higher score: takes the label up to 0.70
    ])
    correct = match_predictions(detections, labels)
    assert correct[1].tolist() == [True] * 5 + [False] * 5
    assert correct[0].tolist() == [False] * 5 + [True] * 4 + [False]


def test_match_takes_the_best_free_label_of_the_same_class() -> None:
    labels = torch.tensor([[0, 0, 0, 100, 100], [0, 0, 0, 100, 80], [1, 0, 0, 100, 90.0]])
    detections = torch.tensor([[0, 0, 100, 88, 0.9, 0], [0, 0, 100, 88, 0.8, 0]])
    correct = match_predictions(detections, labels)
    # The first takes label 1 (IoU 0.91) over label 0 (0.88), never label 2 (0.98, class 1);
    # the second gets label 0 wherever the first took label 1.
    assert correct[0].tolist() == [True] * 9 + [False]
    assert correct[1].tolist() == [True] * 8 + [False] * 2
    other_class = torch.tensor([[0, 0, 100, 90, 0.9, 2.0]])
    assert not match_predictions(other_class, labels).any()


def test_unlabelled_classes_are_left_out_of_the_mean() -> None:
    detections, labels = _labels_and_boxes()
    stray = torch.tensor([[300, 300, 350, 350, 0.95, 5.0]])
    metrics = DetectionMetrics()
    metrics.update(torch.cat([stray, detections]), labels)
    result = metrics.compute()
    assert result.map == pytest.approx(1.0) and 5 not in result.classes.class_ids


def test_merged_ranks_equal_one_accumulator_even_with_tied_scores() -> None:
    rng = np.random.default_rng(4)
    images = [_synthetic_image(rng) for _ in range(12)]
    for detections, _ in images:  # quantised scores: many exact ties across images
        detections[:, 4] = torch.round(detections[:, 4] * 4) / 4
    whole, first_rank, second_rank = DetectionMetrics(), DetectionMetrics(), DetectionMetrics()
    for index, (detections, labels) in enumerate(images):
        whole.update(detections, labels)
        (first_rank if index % 2 == 0 else second_rank).update(detections, labels, order=index)
    merged = DetectionMetrics.merged([first_rank.parts(), second_rank.parts()]).compute()
    expected = whole.compute()
    for key in ("precision", "recall", "map50", "map"):
        assert getattr(merged, key) == getattr(expected, key)
    np.testing.assert_array_equal(merged.classes.ap50_95, expected.classes.ap50_95)


def test_coco_records_and_atomic_write(tmp_path: Path) -> None:
    detections = torch.tensor([[10.12345, 20.0, 30.5, 60.25, 0.1234567, 2.0]])
    records = coco_records(detections, image_id_from_path("images/000000000139.jpg"), COCO80_TO_91)
    assert records == [
        {"image_id": 139, "category_id": 3, "bbox": [10.123, 20.0, 20.377, 40.25], "score": 0.12346}
    ]
    assert image_id_from_path("frame_07.png") == "frame_07"
    assert len(COCO80_TO_91) == 80 and COCO80_TO_91[-1] == 90

    path = tmp_path / "predictions.json"
    write_predictions_json(records, path)
    write_predictions_json(records * 2, path)  # replaces the earlier file
    assert json.loads(path.read_text()) == records * 2
    assert [entry.name for entry in tmp_path.iterdir()] == ["predictions.json"]
