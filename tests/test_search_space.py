"""The evolution search space: bundled table, user overrides, and every input mistake."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from orchestrator.evolution.search_space import Gene, SearchSpace
from trainer.config import Hyp
from trainer.errors import UserError


def test_bundled_table_is_yolov5_classic_space() -> None:
    space = SearchSpace.load()
    assert set(space.genes) == set(Hyp.keys())
    assert space.genes["lr0"] == Gene(1.0, 1e-5, 0.1)
    assert space.genes["momentum"] == Gene(0.3, 0.6, 0.98)
    assert space.genes["anchors"] == Gene(2.0, 2.0, 10.0)
    # gain 0 freezes a key: iou_t, fl_gamma, perspective and fliplr in the classic table
    frozen = {key for key, gene in space.genes.items() if not gene.evolves}
    assert frozen == {"iou_t", "fl_gamma", "perspective", "fliplr"}


def test_user_file_overrides_entries_and_keeps_the_rest(tmp_path: Path) -> None:
    override = tmp_path / "space.yaml"
    override.write_text("lr0: [0.5, 1e-4, 0.05]\nmixup: [0, 0.0, 1.0]\n")
    space = SearchSpace.load(override)
    assert space.genes["lr0"] == Gene(0.5, 1e-4, 0.05)  # `1e-4` is a string to PyYAML; still accepted
    assert not space.genes["mixup"].evolves
    assert space.genes["momentum"] == Gene(0.3, 0.6, 0.98)


def test_bounds_align_with_keys_and_leave_unknown_keys_frozen() -> None:
    space = SearchSpace.from_mapping({"lr0": [1, 0.001, 0.1], "box": [0.5, 0.02, 0.2]})
    gains, lows, highs = space.bounds(["box", "momentum", "lr0"])
    np.testing.assert_array_equal(gains, [0.5, 0.0, 1.0])
    np.testing.assert_array_equal(lows, [0.02, -math.inf, 0.001])
    np.testing.assert_array_equal(highs, [0.2, math.inf, 0.1])
    assert space.evolved_keys(["box", "momentum", "lr0"]) == ["box", "lr0"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"learning_rate": [1, 0, 1]}, "unknown hyperparameter 'learning_rate'"),
        ({"lr0": [1, 0.1, 0.01]}, "low=0.1 is above high=0.01"),
        ({"lr0": [1, "small", 0.1]}, "lr0 low='small' is not a finite number"),
        ({"lr0": [-1, 0.0, 0.1]}, "gain=-1 is negative"),
        ({"lr0": [1, 0.0]}, "must be a list [gain, low, high]"),
        ({"lr0": [True, 0.0, 0.1]}, "is not a finite number"),
        ({"lr0": [1, 0.0, ".inf"]}, "is not a finite number"),
        ({"momentum": [0.3, 0.6, 1.2]}, "momentum high=1.2 is out of range: momentum must be at least 0 and below 1"),
        ({"lr0": [1, -0.1, 0.1]}, "lr0 low=-0.1 is out of range: lr0 must be at least 0"),
    ],
)
def test_bad_entries_are_user_errors_naming_the_key(entry: dict, message: str) -> None:
    with pytest.raises(UserError) as caught:
        SearchSpace.from_mapping(entry, source="space.yaml")
    assert message in caught.value.message
    assert caught.value.message.startswith("space.yaml")


def test_bad_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read search space"):
        SearchSpace.from_yaml(tmp_path / "missing.yaml")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping"):
        SearchSpace.from_yaml(not_mapping)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr0: [1, 0\n")
    with pytest.raises(UserError, match="not valid YAML"):
        SearchSpace.from_yaml(broken)


def test_a_space_that_moves_nothing_is_refused() -> None:
    space = SearchSpace.from_mapping({"lr0": [0, 0.001, 0.1], "box": [1, 0.05, 0.05]})
    with pytest.raises(UserError, match="evolves none"):
        space.require_evolvable(["lr0", "box", "cls"])
    SearchSpace.from_mapping({"cls": [1, 0.2, 4.0]}).require_evolvable(["lr0", "cls"])
