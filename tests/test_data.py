"""data.yaml parsing, label checking and caching, the dataset's outputs, and the loaders."""

from __future__ import annotations

import errno
import itertools
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torchvision.io import encode_png, write_file
from torchvision.transforms.v2 import functional as F

from trainer.config import Hyp
from trainer.data import labels as labels_module
from trainer.data.data_config import load_data_config
from trainer.data.dataset import CanvasKey, YoloDataset, collate
from trainer.data.labels import Sample, label_path, load_samples
from trainer.data.loader import (
    EpochBatches,
    RectBatches,
    ValidationBatches,
    build_dataloader,
    build_datasets,
    canvas_shape,
)
from trainer.errors import UserError


def write_image(path: Path, width: int, height: int, box: tuple[int, int, int, int] | None = None) -> None:
    """A PNG (lossless, so pixels can be checked exactly): dark grey with an optional white box."""
    image = torch.full((3, height, width), 40, dtype=torch.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        image[:, y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_png(image))


def write_labels(image: Path, lines: list[str]) -> Path:
    path = label_path(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def make_split(root: Path, split: str, count: int, width: int = 64, height: int = 48) -> list[Path]:
    """`count` images, each with one white box whose label is exact in pixels."""
    images = []
    for index in range(count):
        image = root / "images" / split / f"{index:03d}.png"
        x0, y0 = 4 + 2 * index % 20, 6 + index % 10
        box = (x0, y0, x0 + 20, y0 + 16)
        write_image(image, width, height, box)
        cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
        write_labels(image, [f"{index % 3} {cx:.6f} {cy:.6f} {20 / width:.6f} {16 / height:.6f}"])
        images.append(image)
    return images


def write_yaml(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


# --- data.yaml ---------------------------------------------------------------------------


def test_names_as_list_or_mapping_and_nc_alone(tmp_path: Path) -> None:
    make_split(tmp_path, "train", 2)
    make_split(tmp_path, "val", 1)
    base = {"path": str(tmp_path), "train": "images/train", "val": "images/val"}
    listed = load_data_config(write_yaml(tmp_path / "a.yaml", {**base, "names": ["cat", "dog"]}))
    mapped = load_data_config(
        write_yaml(tmp_path / "b.yaml", {**base, "nc": 2, "names": {1: "dog", 0: "cat"}})
    )
    counted = load_data_config(write_yaml(tmp_path / "c.yaml", {**base, "nc": 3}))
    assert listed.names == mapped.names == ["cat", "dog"] and listed.nc == mapped.nc == 2
    assert counted.names == ["class0", "class1", "class2"] and counted.nc == 3
    assert listed.root == tmp_path and listed.train == [tmp_path / "images" / "train"]


def test_txt_lists_and_lists_of_sources(tmp_path: Path) -> None:
    first = make_split(tmp_path, "a", 2)
    make_split(tmp_path, "b", 3)
    (tmp_path / "val.txt").write_text(f"images/a/{first[0].name}\n\n{first[1]}\n")
    config = load_data_config(
        write_yaml(
            tmp_path / "data.yaml",
            {
                "path": str(tmp_path),
                "train": ["images/a", "images/b"],
                "val": "val.txt",
                "names": ["x", "y", "z"],
            },
        )
    )
    assert config.train == [tmp_path / "images" / "a", tmp_path / "images" / "b"]
    assert len(load_samples(config.train, config.nc, "train")) == 5
    assert [sample.image for sample in load_samples(config.val, config.nc, "val")] == first


def test_relative_path_is_found_from_the_working_directory_then_the_yaml_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for base in (tmp_path / "work", tmp_path / "configs"):
        make_split(base / "set", "train", 1)
        make_split(base / "set", "val", 1)
    config_file = write_yaml(
        tmp_path / "configs" / "data.yaml",
        {"path": "set", "train": "images/train", "val": "images/val", "nc": 3},
    )
    monkeypatch.chdir(tmp_path / "work")
    assert load_data_config(config_file).root == tmp_path / "work" / "set"
    monkeypatch.chdir(tmp_path)
    assert load_data_config(config_file).root == tmp_path / "configs" / "set"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"path": "nowhere"}, "path='nowhere' not found"),
        ({"train": "images/missing"}, "train folder 'images/missing' not found"),
        ({"val": "images/empty"}, "val='images/empty'.*has no images"),
        ({"val": None}, "`val` is missing"),
        ({"nc": 3}, "nc=3 but 2 names"),
        ({"names": {0: "a", 2: "b"}}, "must be the class indices"),
        ({"names": None, "nc": None}, "give `names`"),
        ({"synthetic": {"sed": 1}}, "unknown synthetic option"),
    ],
)
def test_config_mistakes_are_user_errors_naming_the_value(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    make_split(tmp_path, "train", 1)
    (tmp_path / "images" / "empty").mkdir()
    (tmp_path / "images" / "empty" / "notes.md").write_text("no images here")
    values = {
        "path": str(tmp_path),
        "train": "images/train",
        "val": "images/train",
        "names": ["a", "b"],
        **change,
    }
    values = {key: value for key, value in values.items() if value is not None}
    with pytest.raises(UserError, match=message):
        load_data_config(write_yaml(tmp_path / "data.yaml", values))


def test_missing_or_malformed_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no-such-data"):
        load_data_config("no-such-data")
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_data_config(tmp_path / "bad.yaml")


def test_a_synthetic_block_generates_under_the_datasets_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVOLVECTL_DATASETS", str(tmp_path / "store"))
    config_file = write_yaml(
        tmp_path / "tiny.yaml",
        {
            "path": "tiny",
            "train": "images/train",
            "val": "images/val",
            "names": ["disc", "square", "triangle", "cross", "ring", "diamond"],
            "synthetic": {"seed": 2, "train": 3, "val": 2, "size": 64},
        },
    )
    config = load_data_config(config_file)
    assert config.root == tmp_path / "store" / "tiny"
    assert len(load_samples(config.train, config.nc, "train")) == 3
    assert len(load_samples(config.val, config.nc, "val")) == 2


@pytest.mark.slow
def test_the_bundled_synthetic_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOLVECTL_DATASETS", str(tmp_path))
    config = load_data_config("synthetic")
    assert config.root == tmp_path / "synthetic" and config.nc == 6
    train, val = build_datasets(config, imgsz=256, hyp=Hyp(), cache="", single_cls=False, seed=0)
    assert (len(train), len(val)) == (400, 100)


# --- label discovery, checking and the cache --------------------------------------------


def test_label_path_replaces_the_last_images_folder() -> None:
    assert label_path(Path("/d/images/x/images/a.b.jpg")) == Path("/d/images/x/labels/a.b.txt")
    assert label_path(Path("/d/pictures/a.png")) == Path("/d/pictures/a.txt")


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff", ".webp"])
def test_lossless_image_formats_decode_to_their_pixels(tmp_path: Path, suffix: str) -> None:
    """YOLOv5 datasets come as BMP and TIFF too; torchvision has no decoder for those, Pillow has."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    path = tmp_path / "images" / f"a{suffix}"
    path.parent.mkdir()
    Image.fromarray(pixels).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    assert labels_module.find_images([path.parent]) == [path]
    np.testing.assert_array_equal(labels_module.read_image(path).permute(1, 2, 0).numpy(), pixels)


def test_polygon_labels_become_the_box_around_their_points(tmp_path: Path) -> None:
    """YOLOv5's COCO download has segment labels; its detection training boxes them, and so do we."""
    path = tmp_path / "a.txt"
    path.write_text("2 0.1 0.2 0.5 0.2 0.3 0.6\n0 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.4 0.25 0.3 0.5 0.1 0.3\n")
    labels, duplicates = labels_module.parse_label_file(path, nc=3)
    np.testing.assert_allclose(labels, [[2, 0.3, 0.4, 0.4, 0.4], [0, 0.5, 0.5, 0.2, 0.2], [1, 0.25, 0.35, 0.3, 0.3]],
                               atol=1e-6)
    assert duplicates == 0
    for text, message in (("0 0.1 0.2 0.3 0.4 0.5 0.6 0.7", "has 8 values"),  # half a point
                          ("0 0.1 0.2 0.3 0.4 0.5 1.6", "line 1: polygon points are not normalised")):
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            labels_module.parse_label_file(path, nc=3)


def test_corrupt_labels_and_unreadable_images_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_split(tmp_path, "train", 2)
    folder = tmp_path / "images" / "train"
    broken = {
        "class.png": "5 0.5 0.5 0.1 0.1",  # class >= nc
        "coords.png": "0 0.5 1.5 0.1 0.1",  # outside 0..1
        "columns.png": "0 0.5 0.5 0.1",
        "text.png": "0 0.5 half 0.1 0.1",
    }
    for name, line in broken.items():
        write_image(folder / name, 32, 32)
        write_labels(folder / name, [line])
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_image(folder / "background.png", 32, 32)  # no label file: an image with no objects
    empty = folder / "empty.png"
    write_image(empty, 32, 32)
    write_labels(empty, [])
    duplicated = folder / "twice.png"
    write_image(duplicated, 32, 32)
    write_labels(duplicated, ["1 0.5 0.5 0.2 0.2", "1 0.5 0.5 0.2 0.2", "0 0.3 0.3 0.1 0.1"])

    with caplog.at_level(logging.INFO, logger="trainer.data"):
        samples = load_samples([folder], nc=3, split="train")
    by_name = {sample.image.name: sample for sample in samples}
    assert sorted(by_name) == sorted(
        [image.name for image in good] + ["background.png", "empty.png", "twice.png"]
    )
    np.testing.assert_allclose(
        by_name["twice.png"].labels, [[1, 0.5, 0.5, 0.2, 0.2], [0, 0.3, 0.3, 0.1, 0.1]]
    )
    assert len(by_name["background.png"].labels) == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    for name in [*broken, "truncated.png"]:
        assert any(name in warning for warning in warnings), name
    assert any("twice.txt: removed 1 duplicate" in warning for warning in warnings)
    summary = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO][-1]
    assert summary == "train: 10 images, 3 with labels, 1 missing labels, 1 empty, 5 corrupt"


def test_cache_is_written_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = make_split(tmp_path, "train", 3)
    folder = tmp_path / "images" / "train"
    yolov5_cache = tmp_path / "labels" / "train.cache"  # YOLOv5's own, in its format: left as it is
    yolov5_cache.write_bytes(b"\x93NUMPY yolov5's label cache")
    first = load_samples([folder], nc=3, split="train")
    assert (tmp_path / "labels" / "train.evolvectl.cache").is_file()
    assert yolov5_cache.read_bytes() == b"\x93NUMPY yolov5's label cache"

    def must_not_run(image: Path, nc: int) -> None:
        raise AssertionError(f"{image} checked again although the cache is valid")

    monkeypatch.setattr(labels_module, "check_image", must_not_run)
    second = load_samples([folder], nc=3, split="train")
    assert [(s.image, s.width, s.height, s.labels.tolist()) for s in second] == [
        (s.image, s.width, s.height, s.labels.tolist()) for s in first
    ]
    monkeypatch.undo()

    write_labels(images[0], ["2 0.5 0.5 0.25 0.25"])  # an edited label file invalidates the cache
    third = load_samples([folder], nc=3, split="train")
    np.testing.assert_allclose(third[0].labels, [[2, 0.5, 0.5, 0.25, 0.25]])


def test_a_read_only_dataset_folder_only_costs_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    make_split(tmp_path, "train", 2)

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)  # what atomic_output creates
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        samples = load_samples([tmp_path / "images" / "train"], nc=3, split="train")
        load_samples([tmp_path / "images" / "train"], nc=3, split="train")
    assert len(samples) == 2
    assert not (tmp_path / "labels" / "train.evolvectl.cache").exists()
    warnings = [
        record.getMessage() for record in caplog.records if "cannot write label cache" in record.getMessage()
    ]
    assert len(warnings) == 2 and "Read-only file system" in warnings[0]


def test_no_usable_image_is_a_user_error(tmp_path: Path) -> None:
    image = tmp_path / "images" / "train" / "a.png"
    write_image(image, 16, 16)
    write_labels(image, ["7 0.5 0.5 0.1 0.1"])
    with pytest.raises(UserError, match="none of the 1 images is usable"):
        load_samples([image.parent], nc=2, split="train")
    with pytest.raises(UserError, match="no usable images"):
        YoloDataset([], imgsz=64, augment=False, hyp=Hyp())


# --- the dataset ------------------------------------------------------------------------


def _samples(tmp_path: Path, count: int = 4, width: int = 64, height: int = 48) -> list[Sample]:
    make_split(tmp_path, "train", count, width, height)
    return load_samples([tmp_path / "images" / "train"], nc=3, split="train")


@pytest.mark.parametrize(("canvas", "padding"), [(None, (0, 24)), ((64, 128), (16, 8)), ((80, 97), (0, 16))])
def test_validation_letterbox_maps_back_to_the_original(
    tmp_path: Path, canvas: tuple[int, int] | None, padding: tuple[int, int]
) -> None:
    image = tmp_path / "images" / "val" / "wide.png"
    box = (30, 10, 90, 40)
    write_image(image, 120, 60, box)
    write_labels(image, [f"1 {60 / 120} {25 / 60} {60 / 120} {30 / 60}"])
    dataset = YoloDataset(load_samples([image.parent], 2, "val"), imgsz=96, augment=False, hyp=Hyp())
    padded, labels, path, shapes = dataset[0] if canvas is None else dataset[CanvasKey(0, *canvas)]
    canvas_height, canvas_width = canvas or (96, 96)  # a bare index: the imgsz square
    (height0, width0), ((ratio_h, ratio_w), (pad_w, pad_h)) = shapes
    assert padded.shape == (3, canvas_height, canvas_width) and path == str(image) and (height0, width0) == (60, 120)
    assert (ratio_w, ratio_h) == (96 / 120, 48 / 60) and (pad_w, pad_h) == padding
    assert (padded[:, :pad_h] == 114).all() and (padded[:, pad_h + 48 :] == 114).all()
    assert (padded[:, :, :pad_w] == 114).all() and (padded[:, :, pad_w + 96 :] == 114).all()

    cx, cy, w, h = (labels[0, 1:] * torch.tensor([canvas_width, canvas_height] * 2)).tolist()
    original = [(cx - w / 2 - pad_w) / ratio_w, (cy - h / 2 - pad_h) / ratio_h]
    original += [(cx + w / 2 - pad_w) / ratio_w, (cy + h / 2 - pad_h) / ratio_h]
    assert original == pytest.approx(box, abs=1e-3)
    white = (padded[0] > 200).nonzero()
    assert white.min(0).values.tolist() == pytest.approx([cy - h / 2, cx - w / 2], abs=1)
    assert (white.max(0).values + 1).tolist() == pytest.approx([cy + h / 2, cx + w / 2], abs=1)


def test_single_class_stride_and_exposed_fields(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    dataset = YoloDataset(samples, imgsz=64, augment=False, hyp=Hyp(), single_cls=True)
    assert dataset.files == [sample.image for sample in samples]
    assert dataset.shapes.tolist() == [[64, 48]] * 4
    assert all(labels[:, 0].tolist() == [0.0] for labels in dataset.labels)
    assert samples[1].labels[0, 0] == 1  # the samples themselves are untouched
    with pytest.raises(UserError, match="multiple of the model's stride 32; try 96"):
        YoloDataset(samples, imgsz=80, augment=False, hyp=Hyp())


def test_ram_cache_serves_images_without_the_files(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    from_disk = YoloDataset(samples, imgsz=64, augment=True, hyp=Hyp(mixup=0.5), seed=1)
    in_ram = YoloDataset(samples, imgsz=64, augment=True, hyp=Hyp(mixup=0.5), seed=1, cache="ram")
    expected = [from_disk[index] for index in range(len(samples))]
    for sample in samples:
        sample.image.unlink()
    for index, (image, labels, _, _) in enumerate(expected):
        assert torch.equal(in_ram[index][0], image) and torch.equal(in_ram[index][1], labels)


def test_training_images_shrink_without_antialiasing_and_validation_images_with_it(tmp_path: Path) -> None:
    # As YOLOv5's loader: INTER_LINEAR for training, INTER_AREA for validation. 1-pixel stripes
    # shrunk to 0.8 show the difference: plain bilinear keeps them sharp (aliased), antialiasing
    # averages them towards grey.
    stripes = torch.zeros((3, 80, 80), dtype=torch.uint8)
    stripes[:, :, ::2] = 255
    path = tmp_path / "images" / "train" / "stripes.png"
    path.parent.mkdir(parents=True)
    write_file(str(path), encode_png(stripes))
    samples = load_samples([path.parent], nc=3, split="train")
    training = YoloDataset(samples, imgsz=64, augment=True, hyp=Hyp()).load_image(0)
    validation = YoloDataset(samples, imgsz=64, augment=False, hyp=Hyp()).load_image(0)
    assert torch.equal(training, F.resize(stripes, [64, 64], antialias=False))
    assert torch.equal(validation, F.resize(stripes, [64, 64], antialias=True))
    contrast = [float((image.float() - 127.5).abs().mean()) for image in (training, validation)]
    assert contrast[0] > 1.5 * contrast[1], contrast
    # Each kind has its own disk cache.
    YoloDataset(samples, imgsz=64, augment=True, hyp=Hyp(), cache="disk")
    YoloDataset(samples, imgsz=64, augment=False, hyp=Hyp(), cache="disk")
    cached = {folder.name: torch.from_numpy(np.load(next(folder.glob("*.npy"))))
              for folder in (tmp_path / "images" / "train-cache").iterdir()}
    assert set(cached) == {"64", "64-training"}
    assert torch.equal(cached["64-training"], training) and torch.equal(cached["64"], validation)


def test_disk_cache_serves_the_same_items_and_outlives_the_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = _samples(tmp_path)
    decoded = YoloDataset(samples, imgsz=64, augment=True, hyp=Hyp(mixup=0.5), seed=1)
    expected = [decoded[index] for index in range(len(samples))]
    YoloDataset(samples, imgsz=64, augment=True, hyp=Hyp(mixup=0.5), seed=1, cache="disk")
    folder = tmp_path / "images" / "train-cache" / "64-training"
    assert len(list(folder.glob("*.npy"))) == len(samples)

    def no_decoding(path: Path) -> torch.Tensor:
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr("trainer.data.dataset.read_image", no_decoding)
    again = YoloDataset(samples, imgsz=64, augment=True, hyp=Hyp(mixup=0.5), seed=1, cache="disk")
    for index, (image, labels, _, _) in enumerate(expected):  # every pixel from the cache
        assert torch.equal(again[index][0], image) and torch.equal(again[index][1], labels)


def test_disk_cache_follows_changed_images_and_decodes_what_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    samples = _samples(tmp_path)
    folder = tmp_path / "images" / "train-cache" / "64"
    cached = YoloDataset(samples, imgsz=64, augment=False, hyp=Hyp(), cache="disk")
    expected = [cached[index][0] for index in range(len(samples))]
    write_image(samples[0].image, 64, 48, box=(1, 1, 20, 20))  # new pixels, new size and time
    changed = YoloDataset(samples, imgsz=64, augment=False, hyp=Hyp(), cache="disk")
    assert len(list(folder.glob("*.npy"))) == len(samples) + 1
    assert not torch.equal(changed[0][0], expected[0])
    changed._disk.paths[1].write_bytes(b"not an array")
    assert torch.equal(changed[1][0], expected[1])

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)  # what atomic_output creates
    write_image(samples[2].image, 64, 48, box=(2, 2, 30, 30))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        read_only_data = YoloDataset(samples, imgsz=64, augment=False, hyp=Hyp(), cache="disk")
    assert "cannot write the image cache" in caplog.text and "Read-only file system" in caplog.text
    assert torch.equal(read_only_data[3][0], expected[3])


def test_collate_stacks_images_and_indexes_targets(tmp_path: Path) -> None:
    dataset = YoloDataset(_samples(tmp_path, count=3), imgsz=64, augment=False, hyp=Hyp())
    images, targets, paths, shapes = collate([dataset[0], dataset[1], dataset[2]])
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8
    assert targets.shape == (3, 6) and targets[:, 0].tolist() == [0, 1, 2]
    assert torch.equal(targets[1, 1:], dataset[1][1][0])
    assert len(paths) == len(shapes) == 3


# --- loaders ----------------------------------------------------------------------------


def _epochs_bytes(loader: torch.utils.data.DataLoader, batches: EpochBatches, start: int,
                  epochs: int) -> list[list[tuple[bytes, bytes]]]:
    """`epochs` epochs from one iterator starting at `start`, as a run draws them, batch by batch."""
    batches.start_at(start)
    drawn = iter(loader)
    return [[(images.numpy().tobytes(), targets.numpy().tobytes())
             for images, targets, _, _ in itertools.islice(drawn, len(loader))] for _ in range(epochs)]


@pytest.mark.parametrize("rect", [False, True])
def test_persistent_workers_draw_from_a_new_seed_as_a_loader_built_with_it(tmp_path: Path, rect: bool) -> None:
    samples = _samples(tmp_path, count=6)
    dataset = YoloDataset(samples, imgsz=64, augment=True, hyp=Hyp(), seed=3)
    loader, batches = build_dataloader(dataset, batch_size=4, workers=2, shuffle=True, seed=3, rect=rect)
    first_seed = _epochs_bytes(loader, batches, 0, 2)
    dataset.reseed(11)
    batches.reseed(11)
    fresh = YoloDataset(samples, imgsz=64, augment=True, hyp=Hyp(), seed=11)
    fresh_loader, fresh_batches = build_dataloader(fresh, batch_size=4, workers=0, shuffle=True, seed=11, rect=rect)
    reseeded = _epochs_bytes(loader, batches, 0, 2)
    assert reseeded == _epochs_bytes(fresh_loader, fresh_batches, 0, 2)
    assert reseeded != first_seed


def test_persistent_workers_see_new_hyps_and_epochs_and_match_no_workers(tmp_path: Path) -> None:
    dataset = YoloDataset(_samples(tmp_path, count=6), imgsz=64, augment=True, hyp=Hyp(fliplr=0.0), seed=3)
    loader, batches = build_dataloader(dataset, batch_size=4, workers=2, shuffle=True, seed=5)
    serial_loader, serial_batches = build_dataloader(dataset, batch_size=4, workers=0, shuffle=True, seed=5)
    assert len(loader) == 2  # batches of 4 and 2 per epoch, never one across two epochs

    # Workers prefetch into the next epoch; each sample still gets its own epoch's augmentation.
    first, second, third = _epochs_bytes(loader, batches, 0, 3)
    assert [first, second, third] == _epochs_bytes(serial_loader, serial_batches, 0, 3)
    assert second != first and third != second  # a new epoch draws new augmentations and a new order
    assert _epochs_bytes(loader, batches, 1, 2) == [second, third]  # as a resumed run draws them

    dataset.set_hyp(Hyp(fliplr=1.0, mosaic=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, translate=0.0, scale=0.0))
    batches.start_at(0)
    flipped = next(iter(loader))  # a new iterator: nothing prefetched with the old settings comes out
    # No mosaic, no colour or geometry change: every image must be its letterboxed original, mirrored.
    for image, path in zip(flipped[0], flipped[2]):
        index = dataset.files.index(Path(path))
        original = dataset._validation_item(CanvasKey(index, 64, 64))[0]
        assert torch.equal(image, original.flip(-1))

    dataset.set_hyp(Hyp(fliplr=0.0))
    assert _epochs_bytes(loader, batches, 0, 1) == [first]


def test_samplers_split_ranks_and_shuffle_like_one_process(tmp_path: Path) -> None:
    dataset = YoloDataset(_samples(tmp_path, count=5), imgsz=64, augment=False, hyp=Hyp())
    _, single = build_dataloader(dataset, batch_size=2, workers=0, shuffle=True, seed=7)
    ranks = [build_dataloader(dataset, 2, 0, True, 7, rank=rank, world_size=2)[1] for rank in (0, 1)]
    epochs = itertools.islice(iter(single), 2 * len(single))
    keys = [key for batch in epochs for key in batch]
    order = [index for epoch, index in keys if epoch == 0]
    assert sorted(order) == list(range(5)) and [epoch for epoch, _ in keys] == [0] * 5 + [1] * 5
    assert [index for epoch, index in keys if epoch == 1] != order  # shuffled again for epoch 1
    shares = [[index for batch in itertools.islice(iter(sampler), len(sampler)) for _, index in batch]
              for sampler in ranks]
    assert sorted(set(shares[0]) | set(shares[1])) == list(range(5)) and len(shares[0]) == len(shares[1]) == 3


@pytest.mark.parametrize(
    ("aspects", "imgsz", "canvas"),
    [
        ([1.0], 320, (352, 352)),  # square images get half a stride around them
        ([0.75, 0.75], 640, (512, 672)),  # 4:3 landscape, e.g. 640×480 photos
        ([0.5, 0.75], 640, (512, 672)),  # the group's tallest image sets the height
        ([4 / 3, 2.0], 640, (672, 512)),  # portrait: the widest sets the width
        ([0.75, 1.5], 640, (672, 672)),  # landscape and portrait together: a square
        ([0.5], 320, (192, 352)),  # 320 × 0.5 = 160 px, 5 strides, plus half a stride: 6
    ],
)
def test_validation_canvas(aspects: list[float], imgsz: int, canvas: tuple[int, int]) -> None:
    assert canvas_shape(np.array(aspects), imgsz, 32) == canvas


def test_validation_batches_group_by_aspect_and_keep_canvases_across_ranks() -> None:
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(100, 800, 23), rng.integers(100, 800, 23)], axis=1)  # (width, height)
    aspects = sizes[:, 1] / sizes[:, 0]
    single = ValidationBatches(sizes, 320, 32, batch_size=4)
    keys = [key for batch in single for key in batch]
    assert len(single) == 6 and [len(batch) for batch in single] == [4] * 5 + [3]
    assert sorted(key.index for key in keys) == list(range(23))
    assert np.all(np.diff(aspects[[key.index for key in keys]]) >= 0)  # sorted by height / width
    for batch in single:
        assert len({(key.height, key.width) for key in batch}) == 1  # one canvas per batch
        height, width = batch[0].height, batch[0].width
        assert canvas_shape(aspects[[key.index for key in batch]], 320, 32) == (height, width)

    # Two ranks with 2 images each per batch: the same groups of 4, so the same canvas per image.
    ranks = [ValidationBatches(sizes, 320, 32, batch_size=2, rank=rank, world_size=2) for rank in (0, 1)]
    shared = [key for batches in ranks for batch in batches for key in batch]
    assert sorted(shared) == sorted(keys)
    assert [len(batches) for batches in ranks] == [6, 6]

    # A last group smaller than the world: the rank with nothing in it gets no (empty) batch.
    small = [ValidationBatches(sizes[:5], 320, 32, batch_size=2, rank=rank, world_size=2) for rank in (0, 1)]
    assert [[len(batch) for batch in batches] for batches in small] == [[2, 1], [2]]


def test_rect_training_batches_by_aspect_shuffled_per_epoch_alike_on_every_rank() -> None:
    rng = np.random.default_rng(1)
    sizes = np.stack([rng.integers(100, 800, 23), rng.integers(100, 800, 23)], axis=1)  # (width, height)
    aspects = sizes[:, 1] / sizes[:, 0]
    single = RectBatches(sizes, 320, 32, batch_size=4, seed=0)
    batches = list(itertools.islice(iter(single), 2 * len(single)))
    assert len(single) == 6 and {epoch for batch in batches[:6] for epoch, _ in batch} == {0}
    first, second = ([[key for _, key in batch] for batch in batches[i * 6:(i + 1) * 6]] for i in (0, 1))
    assert sorted(key.index for batch in first for key in batch) == list(range(23))
    assert first != second and sorted(first) == sorted(second)  # the same batches, in another order
    for batch in first:
        assert canvas_shape(aspects[[key.index for key in batch]], 320, 32, pad=0.0) == (batch[0].height,
                                                                                         batch[0].width)
    # 23 images over 3 ranks: one repeated, so that every rank takes the same number of steps.
    ranks = [RectBatches(sizes, 320, 32, batch_size=2, seed=0, rank=rank, world_size=3) for rank in range(3)]
    epochs = [list(itertools.islice(iter(sampler), len(sampler))) for sampler in ranks]
    assert [len(epoch) for epoch in epochs] == [4, 4, 4]
    steps = list(zip(*epochs))  # what the ranks train together, step by step: one canvas
    assert all(len({(key.height, key.width) for batch in step for _, key in batch}) == 1 for step in steps)
    indices = [key.index for epoch in epochs for batch in epoch for _, key in batch]
    assert sorted(set(indices)) == list(range(23)) and len(indices) == 24
    ranks[0].start_at(3)
    assert next(iter(ranks[0]))[0][0] == 3


def test_validation_shards_cover_every_image_once(tmp_path: Path) -> None:
    for index, (width, height) in enumerate([(64, 48), (48, 64), (64, 32), (64, 64), (40, 64)]):
        write_image(tmp_path / "images" / "val" / f"{index}.png", width, height)
    dataset = YoloDataset(load_samples([tmp_path / "images" / "val"], 3, "val"), imgsz=64, augment=False, hyp=Hyp())
    loaders = [build_dataloader(dataset, 2, 0, False, 0, rank, 2, shard=True)[0] for rank in (0, 1)]
    paths = []
    for loader in loaders:
        for (images, _, batch_paths, _), keys in zip(loader, loader.batch_sampler):
            assert images.shape[2:] == (keys[0].height, keys[0].width)
            paths.extend(batch_paths)
    assert sorted(paths) == sorted(str(file) for file in dataset.files)
    with pytest.raises(ValueError, match="cannot shuffle"):
        build_dataloader(dataset, 2, 0, True, 0, shard=True)


def test_build_datasets_from_a_config(tmp_path: Path) -> None:
    make_split(tmp_path, "train", 3)
    make_split(tmp_path, "val", 2)
    config = load_data_config(
        write_yaml(
            tmp_path / "d.yaml",
            {"path": str(tmp_path), "train": "images/train", "val": "images/val", "nc": 3},
        )
    )
    train, val = build_datasets(config, imgsz=64, hyp=Hyp(), cache="ram", single_cls=False, seed=0)
    assert (len(train), len(val), train.augment, val.augment) == (3, 2, True, False)
    assert np.array_equal(val.shapes, [[64, 48], [64, 48]])
