"""The seven numbers a validation ends with, and the fitness YOLOv5 ranks them by.

Defined once here, in evolve.csv's column order: validation returns a `ValidationResult`,
results.csv and evolve.csv name its columns `COLUMNS`, and the evolution ranks rows with
`fitness`. Torch-free, so the evolution core, status and plots use it without loading torch.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class ValidationResult:
    """Precision, recall, mAP@0.5, mAP@0.5:0.95 and the three validation losses."""

    precision: float = 0.0
    recall: float = 0.0
    map50: float = 0.0
    map: float = 0.0
    box_loss: float = 0.0
    obj_loss: float = 0.0
    cls_loss: float = 0.0

    # YOLOv5's names for the same values, in results.csv and evolve.csv.
    COLUMNS: ClassVar[tuple[str, ...]] = (
        "metrics/precision",
        "metrics/recall",
        "metrics/mAP_0.5",
        "metrics/mAP_0.5:0.95",
        "val/box_loss",
        "val/obj_loss",
        "val/cls_loss",
    )
    # YOLOv5's fitness: 0.1·mAP@0.5 + 0.9·mAP@0.5:0.95; precision, recall and losses count for nothing.
    FITNESS_WEIGHTS: ClassVar[tuple[float, ...]] = (0.0, 0.0, 0.1, 0.9, 0.0, 0.0, 0.0)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in column order."""
        return tuple(field.name for field in fields(cls))

    @classmethod
    def column(cls, name: str) -> str:
        """The column that holds a field: `column("map")` is "metrics/mAP_0.5:0.95"."""
        return cls.COLUMNS[cls.names().index(name)]

    @classmethod
    def from_values(cls, values: object) -> ValidationResult:
        """From seven numbers in column order (an evolve.csv row's first seven, say)."""
        numbers = [float(value) for value in np.asarray(values, dtype=float).reshape(-1)]
        if len(numbers) != len(cls.COLUMNS):
            raise ValueError(f"a validation result has {len(cls.COLUMNS)} values, not {len(numbers)}")
        return cls(*numbers)

    def values(self) -> tuple[float, ...]:
        return tuple(float(value) for value in astuple(self))

    @property
    def fitness(self) -> float:
        return float(fitness(np.array(self.values()))[0])


RESULT_COLUMNS = ValidationResult.COLUMNS


def fitness(results: np.ndarray) -> np.ndarray:
    """The fitness of each row of result columns (a single row or a table); NaN stays NaN."""
    results = np.asarray(results, dtype=float).reshape(-1, len(RESULT_COLUMNS))
    # A plain weighted sum over the weighted columns, not a matrix product: NaN there must
    # poison the row, and 0·NaN in a column that does not count must not.
    total = np.zeros(len(results))
    for column, weight in enumerate(ValidationResult.FITNESS_WEIGHTS):
        if weight:
            total = total + results[:, column] * weight
    return total
