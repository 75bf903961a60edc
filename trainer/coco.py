"""COCO-format JSON: detection results for pycocotools, and ground truth built from labels."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from torchvision.ops import box_convert

from trainer.files import write_atomic

# COCO's category ids for the 80 classes of the usual YOLO class list: the official ids run
# 1..90 with gaps, so a model's class index must be mapped before pycocotools can score it.
COCO80_TO_91: list[int] = [
    category for category in range(1, 91)
    if category not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
]


def image_id_from_path(path: str | Path) -> int | str:
    """The image id used in result files: the file stem, as an int when it is all digits."""
    stem = Path(path).stem
    return int(stem) if stem.isdigit() else stem


def coco_records(
    detections: Tensor, image_id: int | str, class_map: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """One COCO result record per detection row [x1, y1, x2, y2, confidence, class].

    Boxes are in original-image pixels and become [x, y, width, height] rounded to 3
    decimals, scores are rounded to 5; `class_map[class]` gives the category id (e.g.
    `COCO80_TO_91`), or the class index is used as is.
    """
    detections = detections.detach().float().cpu()
    boxes = box_convert(detections[:, :4], in_fmt="xyxy", out_fmt="xywh").tolist()
    scores = detections[:, 4].tolist()
    classes = detections[:, 5].long().tolist()
    return [
        {
            "image_id": image_id,
            "category_id": class_map[class_index] if class_map is not None else class_index,
            "bbox": [round(value, 3) for value in box],
            "score": round(score, 5),
        }
        for box, score, class_index in zip(boxes, scores, classes)
    ]


def coco_ground_truth(
    images: Iterable[tuple[int | str, tuple[int, int], Tensor]],
    class_names: Sequence[str],
    class_map: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A COCO ground-truth data set from per-image labels.

    `images` yields (image_id, (height, width), labels (m, 5) rows [class, x1, y1, x2, y2] in
    pixels). Every annotation gets `iscrowd` 0 and `area` = box width × height, so COCOeval's
    area range "all" counts it and nothing is ignored.
    """
    image_records: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (height, width), labels in images:
        image_records.append({"id": image_id, "height": height, "width": width})
        boxes = box_convert(labels[:, 1:5].float(), in_fmt="xyxy", out_fmt="xywh").tolist()
        for class_index, box in zip(labels[:, 0].long().tolist(), boxes):
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCO annotation ids start at 1
                    "image_id": image_id,
                    "category_id": class_map[class_index] if class_map is not None else class_index,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": class_map[index] if class_map is not None else index, "name": name}
        for index, name in enumerate(class_names)
    ]
    return {"images": image_records, "annotations": annotations, "categories": categories}


def write_predictions_json(records: list[dict[str, Any]], path: str | Path) -> None:
    """Write result records as a COCO results file, atomically."""
    _write_json_atomically(records, Path(path))


def write_ground_truth_json(dataset: dict[str, Any], path: str | Path) -> None:
    """Write a data set from `coco_ground_truth` as a COCO annotation file, atomically."""
    _write_json_atomically(dataset, Path(path))


def _write_json_atomically(payload: Any, path: Path) -> None:
    write_atomic(path, json.dumps(payload).encode())
