"""A split's images and labels: found on disk, checked once, and cached next to the labels.

Checking decodes every image and parses every label file, which takes minutes on a large
dataset, so the result is saved to labels/<split>.evolvectl.cache and reused for as long as no
image or label file changes (paths, sizes and modification times are the cache key). YOLOv5
keeps its own cache as labels/<split>.cache beside it: each trainer leaves the other's alone, so
switching between them checks nothing again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from trainer.errors import UserError
from trainer.files import atomic_output

logger = logging.getLogger("trainer.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# torchvision's decoders have no BMP or TIFF; Pillow, which torchvision itself depends on, has.
PILLOW_SUFFIXES = (".bmp", ".tif", ".tiff")
CACHE_VERSION = 2  # bump when what is cached, or how labels are checked, changes
STATUSES = ("found", "missing", "empty", "corrupt")


@dataclass(frozen=True)
class Sample:
    """One usable image: where it is, its size, and its boxes."""

    image: Path
    width: int
    height: int
    labels: np.ndarray  # float32 (n, 5): class, cx, cy, w, h, normalised to the image


def image_list_entries(list_file: Path) -> list[Path]:
    """The image paths listed in a .txt file, one per line; relative ones are relative to its folder."""
    entries = (line.strip() for line in list_file.read_text().splitlines())
    paths = [
        Path(entry) if Path(entry).is_absolute() else list_file.parent / entry for entry in entries if entry
    ]
    return [path for path in paths if path.suffix.lower() in IMAGE_SUFFIXES]


def find_images(sources: Sequence[Path]) -> list[Path]:
    """Every image under the given folders or listed in the given .txt files, sorted."""
    files: set[Path] = set()
    for source in sources:
        candidates: Iterable[Path] = source.rglob("*") if source.is_dir() else image_list_entries(source)
        files.update(path for path in candidates if path.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(files)


def label_path(image: Path) -> Path:
    """The label file of an image: the last /images/ becomes /labels/, the suffix .txt."""
    text = str(image)
    marker = f"{os.sep}images{os.sep}"
    if marker in text:
        head, tail = text.rsplit(marker, 1)
        text = f"{head}{os.sep}labels{os.sep}{tail}"
    return Path(text).with_suffix(".txt")


def read_image(path: Path) -> torch.Tensor:
    """Decode an image file to RGB uint8 (3, H, W), honouring EXIF orientation."""
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:
        if path.suffix.lower() not in PILLOW_SUFFIXES:
            raise
    from PIL import Image, ImageOps
    from torchvision.transforms.v2.functional import pil_to_tensor

    with Image.open(path) as image:
        return pil_to_tensor(ImageOps.exif_transpose(image).convert("RGB"))


def parse_label_file(path: Path, nc: int) -> tuple[np.ndarray, int]:
    """Labels of one file as float32 (n, 5), and how many duplicate rows were dropped.

    A line is a box, `class cx cy w h`, or a polygon, `class x1 y1 x2 y2 x3 y3 ...` (YOLOv5's
    segment labels, as its COCO download has them), which becomes the box around its points.
    Raises ValueError naming the problem when a line is malformed or out of range.
    """
    rows, line_numbers = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
            raise ValueError(f"line {number} has {len(values)} values, expected 5 (class cx cy w h) "
                             "or a polygon of 3 or more points (class x1 y1 x2 y2 x3 y3 ...)")
        try:
            numbers = [float(value) for value in values]
        except ValueError:
            raise ValueError(f"line {number} is not numeric: {line.strip()!r}") from None
        rows.append(numbers if len(numbers) == 5 else [numbers[0], *polygon_box(numbers[1:], number)])
        line_numbers.append(number)
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below as not normalised
        labels = np.array(rows, dtype=np.float32).reshape(-1, 5)
    classes, boxes = labels[:, 0], labels[:, 1:]
    bad_class = ~np.isfinite(classes) | (classes < 0) | (classes >= nc) | (classes != np.round(classes))
    bad_box = (~np.isfinite(boxes) | (boxes < 0) | (boxes > 1)).any(axis=1)
    if bad_class.any():
        row = int(np.argmax(bad_class))
        raise ValueError(f"line {line_numbers[row]}: class {classes[row]:g} is not an integer in 0..{nc - 1}")
    if bad_box.any():
        row = int(np.argmax(bad_box))
        box = " ".join(f"{value:g}" for value in boxes[row].tolist())
        raise ValueError(f"line {line_numbers[row]}: box {box} is not normalised to 0..1")
    _, first_rows = np.unique(labels, axis=0, return_index=True)
    return labels[np.sort(first_rows)], len(labels) - len(first_rows)


def polygon_box(coordinates: list[float], line: int) -> list[float]:
    """`cx cy w h` of the box around a polygon's normalised points `x1 y1 x2 y2 ...`."""
    points = np.array(coordinates, dtype=np.float64).reshape(-1, 2)
    if not (np.isfinite(points).all() and (points >= 0).all() and (points <= 1).all()):
        raise ValueError(f"line {line}: polygon points are not normalised to 0..1")
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]


def check_image(image: Path, nc: int) -> tuple[str, Sample | None, str | None]:
    """Check one image and its labels: (status, the sample or None if unusable, a warning)."""
    try:
        _, height, width = read_image(image).shape
    except (RuntimeError, OSError, ValueError) as error:
        return "corrupt", None, f"skipping {image}: unreadable image ({error})"
    label_file = label_path(image)
    if not label_file.is_file():
        return "missing", Sample(image, width, height, np.zeros((0, 5), np.float32)), None
    try:
        labels, duplicates = parse_label_file(label_file, nc)
    except (OSError, ValueError) as error:
        return "corrupt", None, f"skipping {image}: corrupt label file {label_file}: {error}"
    warning = f"{label_file}: removed {duplicates} duplicate label(s)" if duplicates else None
    return ("found" if len(labels) else "empty"), Sample(image, width, height, labels), warning


def load_samples(sources: Sequence[Path], nc: int, split: str) -> list[Sample]:
    """The usable samples of a split, from the label cache when it is still valid.

    Unusable images are skipped with a warning each, then one summary line is logged.
    """
    images = find_images(sources)
    if not images:
        raise UserError(f"{split}: no images found in {', '.join(map(str, sources))}")
    cache_path = cache_file(label_path(images[0]).parent)
    key = _cache_key(images, nc)
    cached = _read_cache(cache_path, key)
    if cached is None:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(partial(check_image, nc=nc), images))
        samples = [sample for _, sample, _ in results if sample is not None]
        counts = Counter(status for status, _, _ in results)
        warnings = [warning for _, _, warning in results if warning]
        _write_cache(cache_path, _cache_payload(key, samples, counts, warnings))
    else:
        samples, counts, warnings = cached
    for warning in warnings:
        logger.warning("%s", warning)
    logger.info(
        "%s: %d images, %d with labels, %d missing labels, %d empty, %d corrupt%s",
        split,
        len(images),
        *(counts.get(status, 0) for status in STATUSES),
        " (from cache)" if cached else "",
    )
    if not samples:
        raise UserError(f"{split}: none of the {len(images)} images is usable; see the warnings above")
    return samples


def cache_file(labels_folder: Path) -> Path:
    """Where a split's check is cached: labels/train → labels/train.evolvectl.cache (not YOLOv5's
    labels/train.cache, which YOLOv5 would rebuild on finding ours there, and ours on finding its)."""
    return labels_folder.with_name(f"{labels_folder.name}.evolvectl.cache")


def _cache_key(images: Sequence[Path], nc: int) -> str:
    """A hash of every image and label file's path, size and modification time."""
    digest = hashlib.sha256(f"{CACHE_VERSION} {nc}".encode())
    for image in images:
        for path in (image, label_path(image)):
            try:
                status = path.stat()
                digest.update(f"{path} {status.st_size} {status.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path} -\n".encode())
    return digest.hexdigest()


def _cache_payload(key: str, samples: list[Sample], counts: Counter, warnings: list[str]) -> dict:
    """The check's result as plain containers and tensors, loadable with weights_only=True."""
    return {
        "version": CACHE_VERSION,
        "key": key,
        "files": [str(sample.image) for sample in samples],
        "sizes": torch.tensor([[sample.width, sample.height] for sample in samples], dtype=torch.int64),
        "label_counts": torch.tensor([len(sample.labels) for sample in samples], dtype=torch.int64),
        "labels": torch.from_numpy(
            np.concatenate([sample.labels for sample in samples] + [np.zeros((0, 5), np.float32)])
        ),
        "counts": dict(counts),
        "warnings": warnings,
    }


def _read_cache(path: Path, key: str) -> tuple[list[Sample], Counter, list[str]] | None:
    """The cached samples, counts and warnings, or None when missing, stale or unreadable."""
    try:
        payload = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        # A missing, truncated or foreign file just means checking again.
        return None
    if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION or payload.get("key") != key:
        return None
    all_labels = payload["labels"].numpy()
    offsets = np.cumsum([0, *payload["label_counts"].tolist()])
    samples = [
        Sample(Path(file), width, height, all_labels[offsets[index] : offsets[index + 1]])
        for index, (file, (width, height)) in enumerate(zip(payload["files"], payload["sizes"].tolist()))
    ]
    return samples, Counter(payload["counts"]), list(payload["warnings"])


def _write_cache(path: Path, payload: dict) -> None:
    """Save the cache atomically; a read-only dataset folder only costs a warning."""
    if not path.parent.is_dir():
        return  # no labels folder at all: nowhere sensible to put it
    try:
        with atomic_output(path) as handle:
            torch.save(payload, handle)
    except OSError as error:
        logger.warning(
            "cannot write label cache %s (%s); labels will be checked again on every start",
            path,
            error.strerror or error,
        )
