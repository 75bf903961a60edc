"""The seven validation numbers and the fitness they are ranked by."""

from __future__ import annotations

import pytest

from trainer.results import RESULT_COLUMNS, ValidationResult


def test_fitness_weights() -> None:
    def fitness(precision: float, recall: float, map50: float, map: float) -> float:
        return ValidationResult(precision=precision, recall=recall, map50=map50, map=map).fitness

    assert fitness(1.0, 1.0, 0.0, 0.0) == 0.0
    assert fitness(0.0, 0.0, 1.0, 0.0) == pytest.approx(0.1)
    assert fitness(0.0, 0.0, 0.0, 1.0) == pytest.approx(0.9)
    assert fitness(0.3, 0.2, 0.5, 0.4) == pytest.approx(0.05 + 0.36)


def test_values_follow_the_column_order() -> None:
    result = ValidationResult.from_values([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert dict(zip(RESULT_COLUMNS, result.values()))["metrics/mAP_0.5:0.95"] == 0.4
    assert (result.map50, result.cls_loss) == (0.3, 0.7)
