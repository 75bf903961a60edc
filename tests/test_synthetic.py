"""The synthetic dataset: deterministic, a real detection problem, generated exactly once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_image

from trainer.data.labels import load_samples
from trainer.data.synthetic import (
    SHAPES,
    _shape_mask,
    ensure_synthetic,
    generate_synthetic,
)
from trainer.errors import UserError


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def test_same_seed_gives_the_same_bytes(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", seed=3, n_train=5, n_val=2, size=96)
    generate_synthetic(tmp_path / "b", seed=3, n_train=5, n_val=2, size=96)
    generate_synthetic(tmp_path / "c", seed=4, n_train=5, n_val=2, size=96)
    first, second, other = (_all_files(tmp_path / name) for name in "abc")
    assert len(first) == 2 * (5 + 2)
    assert first == second
    assert first != other


@pytest.mark.parametrize("size", [16, 32])
def test_small_images_generate_too(tmp_path: Path, size: int) -> None:
    """A 3:4 image of 32 px is 24 px wide: the clutter's blur range once went negative there."""
    generate_synthetic(tmp_path, seed=0, n_train=20, n_val=4, size=size)
    samples = load_samples([tmp_path / "images" / "train"], nc=len(SHAPES), split="train")
    assert len(samples) == 20 and max(max(sample.width, sample.height) for sample in samples) == size


def test_layout_is_what_a_user_dataset_looks_like(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, seed=0, n_train=4, n_val=3, size=80)
    for split, count in (("train", 4), ("val", 3)):
        images = sorted((tmp_path / "images" / split).glob("*.jpg"))
        labels = sorted((tmp_path / "labels" / split).glob("*.txt"))
        assert len(images) == len(labels) == count
        assert [image.stem for image in images] == [label.stem for label in labels]
        image = decode_image(str(images[0]))
        assert image.shape[0] == 3 and max(image.shape[1:]) == 80
    samples = load_samples([tmp_path / "images" / "train"], nc=len(SHAPES), split="train")
    assert len(samples) == 4  # every generated file passes the same checks as a user's


def test_the_problem_is_varied_and_hard(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, seed=0, n_train=90, n_val=0, size=128)
    samples = load_samples([tmp_path / "images" / "train"], nc=len(SHAPES), split="train")
    counts = [len(sample.labels) for sample in samples]
    every = np.concatenate([sample.labels for sample in samples])
    pixel_sides = np.concatenate([sample.labels[:, 3:] * (sample.width, sample.height) for sample in samples])
    short_sides = np.concatenate(
        [np.full(len(sample.labels), min(sample.width, sample.height)) for sample in samples]
    )

    assert len(samples) == 90
    assert set(every[:, 0].astype(int)) == set(range(len(SHAPES)))
    assert min(counts) == 0 and 7 <= max(counts) <= 8  # some images have nothing at all
    assert 0.02 < counts.count(0) / len(counts) < 0.2
    relative_size = np.sqrt(pixel_sides.prod(axis=1)) / short_sides
    assert relative_size.min() < 0.06 and relative_size.max() > 0.35  # small and large objects
    aspect = pixel_sides[:, 0] / pixel_sides[:, 1]
    assert aspect.min() < 0.6 and aspect.max() > 1.6 and aspect.min() > 0.45
    assert len({(sample.width, sample.height) for sample in samples}) > 1  # letterboxing matters
    assert any(_has_overlap(sample.labels) for sample in samples)


def _has_overlap(labels: np.ndarray) -> bool:
    corners = np.concatenate([labels[:, 1:3] - labels[:, 3:] / 2, labels[:, 1:3] + labels[:, 3:] / 2], axis=1)
    for i in range(len(corners)):
        for j in range(i + 1, len(corners)):
            width = min(corners[i, 2], corners[j, 2]) - max(corners[i, 0], corners[j, 0])
            height = min(corners[i, 3], corners[j, 3]) - max(corners[i, 1], corners[j, 1])
            if width > 0 and height > 0:
                return True
    return False


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_every_shape_fills_its_box_edge_to_edge(shape: int) -> None:
    """The label is the full box, so each shape must reach all four sides of it."""
    steps = torch.linspace(-0.999, 0.999, 201)
    v, u = torch.meshgrid(steps, steps, indexing="ij")
    mask = _shape_mask(shape, u, v)
    rows, columns = mask.any(dim=1), mask.any(dim=0)
    assert rows[0] and rows[-1] and columns[0] and columns[-1]
    assert 0.2 < mask.float().mean() <= 1.0


def test_generated_once_then_reused_then_regenerated_when_changed(tmp_path: Path) -> None:
    root = tmp_path / "datasets" / "synthetic"
    assert ensure_synthetic(root, seed=0, n_train=3, n_val=2, size=64)
    first_image = root / "images" / "train" / "000000.jpg"
    stamp = first_image.stat().st_mtime_ns
    assert not ensure_synthetic(root, seed=0, n_train=3, n_val=2, size=64)
    assert first_image.stat().st_mtime_ns == stamp
    assert ensure_synthetic(root, seed=0, n_train=4, n_val=2, size=64)
    assert len(list((root / "images" / "train").glob("*.jpg"))) == 4
    assert sorted(path.name for path in root.parent.iterdir()) == [".synthetic.lock", "synthetic"]


def test_an_existing_user_folder_is_never_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("keep")
    with pytest.raises(UserError, match="not a generated synthetic dataset"):
        ensure_synthetic(root, seed=0, n_train=2, n_val=1, size=64)
    assert (root / "precious.txt").read_text() == "keep"


def _ensure_after_barrier(
    root: Path, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue
) -> None:
    barrier.wait()
    results.put(ensure_synthetic(root, seed=1, n_train=6, n_val=2, size=64))


def test_many_processes_starting_together_generate_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    root = tmp_path / "synthetic"
    barrier, results = context.Barrier(4), context.Queue()
    processes = [
        context.Process(target=_ensure_after_barrier, args=(root, barrier, results)) for _ in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    generated = [results.get(timeout=5) for _ in processes]
    assert sorted(generated) == [False, False, False, True]
    assert len(list((root / "images" / "train").glob("*.jpg"))) == 6
    reference = tmp_path / "reference"
    generate_synthetic(reference, seed=1, n_train=6, n_val=2, size=64)
    assert {k: v for k, v in _all_files(root).items() if k.startswith(("images", "labels"))} == _all_files(
        reference
    )
