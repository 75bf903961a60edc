"""The comparison datasets of bench/compare_data.py: deterministic, valid YOLO labels, the
statistics they promise, and read and trained on by our trainer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import yaml
from conftest import ROOT, run_trainer
from PIL import Image

sys.path.insert(0, str(ROOT))

from bench.compare_data import (
    RECIPES,
    dataset_statistics,
    label,
    make_dataset,
    parse_size,
    read_labels,
)
from bench.compare_drawing import SUPERSAMPLE, Occlusion, stamp
from trainer.config import Hyp
from trainer.data import load_data_config
from trainer.data.loader import build_datasets


def image_and_label_files(root: Path) -> dict[str, bytes]:
    """What a dataset is, leaving out data.yaml (it names its own folder) and loader caches."""
    files = sorted(root.glob("images/*/*.jpg")) + sorted(root.glob("labels/*/*.txt"))
    return {str(path.relative_to(root)): path.read_bytes() for path in files}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each dataset at 30 + 10 non-square images of 128 × 96 px: the data.yaml paths."""
    folder = tmp_path_factory.mktemp("compare-data")
    return {name: make_dataset(name, folder / name, seed=1, train=30, val=10, size="128x96") for name in RECIPES}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_same_seed_gives_the_same_bytes_and_another_seed_another_dataset(name: str, tmp_path: Path) -> None:
    first, again, other = (make_dataset(name, tmp_path / folder, seed=seed, train=4, val=2, size=96)
                           for folder, seed in (("a", 5), ("b", 5), ("c", 6)))
    files = image_and_label_files(first.parent)
    assert len(files) == 2 * (4 + 2)
    assert files == image_and_label_files(again.parent)
    assert files != image_and_label_files(other.parent)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_layout_yaml_and_labels_are_valid(name: str, generated: dict[str, Path]) -> None:
    data_yaml = generated[name]
    config = yaml.safe_load(data_yaml.read_text())
    assert config == {"path": str(data_yaml.parent), "train": "images/train", "val": "images/val",
                      "nc": len(RECIPES[name].names), "names": list(RECIPES[name].names)}
    for split, count in (("train", 30), ("val", 10)):
        images = sorted((data_yaml.parent / "images" / split).glob("*.jpg"))
        labels = sorted((data_yaml.parent / "labels" / split).glob("*.txt"))
        assert [image.stem for image in images] == [file.stem for file in labels] and len(images) == count
        assert {Image.open(image).size for image in images} == {(128, 96)}
    boxes = np.concatenate([read_labels(path) for path in data_yaml.parent.glob("labels/*/*.txt")])
    assert len(boxes) > 40
    assert np.array_equal(boxes[:, 0], boxes[:, 0].round()) and boxes[:, 0].min() >= 0
    assert boxes[:, 0].max() < config["nc"]
    assert (boxes[:, 1:] >= 0).all() and (boxes[:, 1:] <= 1).all() and (boxes[:, 3:] > 0).all()
    corners = np.concatenate([boxes[:, 1:3] - boxes[:, 3:] / 2, boxes[:, 1:3] + boxes[:, 3:] / 2])
    assert corners.min() >= -1e-6 and corners.max() <= 1 + 1e-6


def test_mixed_has_imbalanced_classes_small_and_large_objects_and_heavy_overlaps(tmp_path: Path) -> None:
    statistics = dataset_statistics(make_dataset("mixed", tmp_path / "mixed", seed=0, train=60, val=20, size=96).parent)
    shares = statistics["class_share"]
    assert len(shares) == 5 and shares[:3] == sorted(shares[:3], reverse=True)
    assert shares[0] > 0.4 and shares[0] > 5 * min(shares)  # 16:8:4:2:1 drawn, so 16:1 expected
    assert statistics["size"]["p5"] < 0.05 and statistics["size"]["p95"] > 0.25
    assert statistics["covered_half_share"] > 0.15  # the built-in set: about 0.06
    assert statistics["objects_per_image"]["p100"] <= 12


def test_textures_cuts_objects_at_the_border(generated: dict[str, Path]) -> None:
    statistics = dataset_statistics(generated["textures"].parent)
    assert statistics["touching_border_share"] > 0.1  # the built-in set: under 0.01


def test_shapes_keeps_objects_inside_at_a_twelfth_to_a_third_of_the_image(tmp_path: Path) -> None:
    root = make_dataset("shapes", tmp_path / "shapes", seed=0, train=40, val=10, size="160x128").parent
    boxes = np.concatenate([read_labels(path) for path in root.glob("labels/*/*.txt")])
    long_side = np.maximum(boxes[:, 3] * 160, boxes[:, 4] * 128) / 128  # share of the short side
    assert long_side.min() > 1 / 12 * 0.45 and long_side.max() < 1 / 3 + 0.02  # a posed shape spans less than its side
    assert dataset_statistics(root)["touching_border_share"] < 0.05  # placed inside; a few reach the edge
    assert dataset_statistics(root)["objects_per_image"]["p100"] <= 8


def test_a_box_cut_by_the_border_is_clipped_or_dropped() -> None:
    # 75% of the box is inside: clipped to the image, normalised.
    assert label(2, (-10, 10, 30, 50), 100, 80) == (2, 0.15, 0.375, 0.3, 0.5)
    assert label(1, (70, 60, 110, 90), 100, 80) == pytest.approx((1, 0.85, 0.875, 0.3, 0.25))  # 50% inside
    assert label(1, (70, 60, 110, 100), 100, 80) is None  # 37.5% inside: dropped
    assert label(0, (-30, 10, 10, 50), 100, 80) is None  # 25% inside: dropped
    assert label(0, (-30, -10, -5, 50), 100, 80) is None  # wholly outside


def test_a_stamp_has_the_exact_box_and_area_of_its_polygon() -> None:
    square = np.array([(10.25, 20.5), (30.75, 20.5), (30.75, 40.0), (10.25, 40.0)])
    item = stamp(square)
    assert item.box == pytest.approx((10.25, 20.5, 30.75, 40.0), abs=1 / SUPERSAMPLE)
    # Pillow fills one fine pixel more across and down than the polygon covers.
    assert float(item.alpha.sum()) == pytest.approx((20.5 + 1 / SUPERSAMPLE) * (19.5 + 1 / SUPERSAMPLE))
    ring = stamp(square, hole=square * 0.5 + (10, 15))  # a hole leaves the outline's box alone
    assert ring.box == item.box and ring.alpha.sum() < item.alpha.sum()


def test_occlusion_refuses_an_object_that_hides_too_much_of_an_earlier_one() -> None:
    def rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])

    occlusion = Occlusion(height=50, width=50, min_visible=0.3)
    occlusion.add(stamp(rectangle(0, 0, 20, 20)))
    assert occlusion.accepts(stamp(rectangle(10, 0, 40, 40)))  # hides half
    assert not occlusion.accepts(stamp(rectangle(0, 0, 17, 40)))  # hides 85%
    assert not occlusion.accepts(stamp(rectangle(60, 60, 80, 80)))  # outside the image: never seen


def test_a_complete_dataset_is_left_alone_and_other_settings_regenerate_it(tmp_path: Path) -> None:
    data_yaml = make_dataset("mixed", tmp_path / "mixed", seed=0, train=3, val=2, size=64)
    image = data_yaml.parent / "images" / "train" / "000000.jpg"
    written = image.stat().st_mtime_ns
    assert make_dataset("mixed", tmp_path / "mixed", seed=0, train=3, val=2, size=64) == data_yaml
    assert image.stat().st_mtime_ns == written
    make_dataset("mixed", tmp_path / "mixed", seed=0, train=4, val=2, size=64)
    assert len(list((data_yaml.parent / "images" / "train").glob("*.jpg"))) == 4
    (tmp_path / "mine").mkdir()
    with pytest.raises(click.ClickException, match="not written by compare_data.py"):
        make_dataset("mixed", tmp_path / "mine", train=3, val=2, size=64)
    with pytest.raises(click.BadParameter, match="choose one of mixed, textures, shapes"):
        make_dataset("clouds", tmp_path / "clouds")


def test_sizes_are_a_side_or_width_by_height() -> None:
    assert parse_size("320") == parse_size(320) == (320, 320)
    assert parse_size("320x256") == (320, 256)
    for bad in ("320x", "big", "16", "1x2x3"):
        with pytest.raises(click.BadParameter, match="size"):
            parse_size(bad)


def test_our_loader_reads_both(generated: dict[str, Path]) -> None:
    for data_yaml in generated.values():
        config = load_data_config(data_yaml)
        train, val = build_datasets(config, imgsz=64, hyp=Hyp(), cache="", single_cls=False, seed=0)
        assert (len(train), len(val)) == (30, 10)
        assert sum(len(labels) for labels in train.labels) == sum(
            len(read_labels(path)) for path in data_yaml.parent.glob("labels/train/*.txt"))
        image, labels, _, _ = val[0]
        assert tuple(image.shape) == (3, 64, 64) and labels.shape[1] == 5


def test_one_epoch_of_training_on_a_comparison_set(tmp_path: Path) -> None:
    data_yaml = make_dataset("textures", tmp_path / "textures", seed=0, train=8, val=4, size=64)
    result = run_trainer("--data", str(data_yaml), "--imgsz", "64", "--batch-size", "8", "--workers", "0",
                         "--device", "cpu", "--epochs", "1", "--cfg", "yolov5n", "--project", str(tmp_path),
                         "--name", "exp", "--noplots", "--noautoanchor", cwd=tmp_path,
                         env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((tmp_path / "exp" / "results.csv").read_text().splitlines()) == 2
