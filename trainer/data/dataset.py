"""The detection dataset: letterboxed images for validation, augmented ones for training.

Hyperparameter evolution trains many generations with different augmentation settings in one
process. Rebuilding datasets and loaders for each would re-cache images and restart workers,
so the augmentation hyperparameters live in a small shared-memory tensor that `set_hyp`
updates and that persistent DataLoader workers read on every sample. The epoch comes with each
training key, `(epoch, index)`, so workers may prefetch into the next epoch. A validation key,
and a --rect training key's index, name the canvas the image is letterboxed onto (`CanvasKey`),
which the loader chooses per batch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from trainer.config import Hyp
from trainer.data.augment import (
    Augmentation,
    augment_colour,
    copy_paste,
    letterbox,
    mixup,
    mosaic,
    random_flips,
    random_perspective,
    resize_to_fit,
    shift_boxes,
)
from trainer.data.disk_cache import DiskCache
from trainer.data.labels import Sample, read_image
from trainer.errors import UserError

logger = logging.getLogger("trainer.data")

# ((h0, w0), ((h / h0, w / w0), (pad_left, pad_top))): maps letterboxed pixels back to the original.
Shapes = tuple[tuple[int, int], tuple[tuple[float, float], tuple[int, int]]]
Item = tuple[torch.Tensor, torch.Tensor, str, Shapes | None]
AUGMENTATION_SIZE = len(fields(Augmentation))


class CanvasKey(NamedTuple):
    """An image and the (height, width) canvas to letterbox it onto: a validation item, or with
    its epoch a --rect training item."""

    index: int
    height: int
    width: int


class YoloDataset(Dataset):
    """Images with their boxes as (class, cx, cy, w, h), normalised to the returned image.

    Training items are asked for by `(epoch, index)` (a bare index is epoch 0), or by
    `(epoch, CanvasKey)` for --rect training. Every random choice for a sample comes from a
    generator seeded by (seed, epoch, index), so a sample is the same whatever the number of
    workers, and after resuming. Validation items are asked for by `CanvasKey` (a bare index:
    the imgsz×imgsz square).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        imgsz: int,
        augment: bool,
        hyp: Hyp,
        cache: str = "",
        seed: int = 0,
        single_cls: bool = False,
        stride: int = 32,
    ) -> None:
        if not samples:
            raise UserError("the dataset has no usable images; check the data config's train and val entries")
        if imgsz < stride or imgsz % stride:
            suggestion = max(stride, math.ceil(imgsz / stride) * stride)
            raise UserError(
                f"image size {imgsz} must be a multiple of the model's stride {stride}; try {suggestion}"
            )
        self.files = [sample.image for sample in samples]
        self.labels = [self._class_zero(sample.labels) if single_cls else sample.labels for sample in samples]
        self.shapes = np.array([(sample.width, sample.height) for sample in samples], dtype=np.int64)
        self.imgsz = imgsz
        self.stride = stride
        self.augment = augment
        # Augmentation hyperparameters and the seed, shared so persistent workers see updates.
        self._settings = torch.zeros(AUGMENTATION_SIZE, dtype=torch.float64).share_memory_()
        self._seed = torch.tensor([seed], dtype=torch.int64).share_memory_()
        self.set_hyp(hyp)
        self._images = self._decode_all() if cache == "ram" else None
        variant = f"{imgsz}-training" if augment else str(imgsz)  # training images are resized differently
        self._disk = DiskCache(self.files, variant) if cache == "disk" else None
        if self._disk is not None and not self._disk.fill(self._read_resized):
            self._disk = None

    @staticmethod
    def _class_zero(labels: np.ndarray) -> np.ndarray:
        labels = labels.copy()
        labels[:, 0] = 0
        return labels

    def set_hyp(self, hyp: Hyp) -> None:
        """Use these augmentation hyperparameters from the next sample on, in every worker."""
        self._settings[:] = torch.tensor(Augmentation.from_hyp(hyp).as_tuple(), dtype=torch.float64)

    def reseed(self, seed: int) -> None:
        """Draw every sample's augmentation from this seed from the next sample on, in every worker
        (an evolution's repeat trains on another seed than the run's, with the same workers)."""
        self._seed[0] = seed

    @property
    def seed(self) -> int:
        return int(self._seed[0])

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(*self._settings.tolist())

    def __len__(self) -> int:
        return len(self.files)

    def _decode_all(self) -> list[torch.Tensor]:
        """Decode and resize every image once, in threads (decoding releases the GIL).

        Done here, in the main process, so DataLoader workers forked later share the pixels.
        """
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(self._read_resized, range(len(self))))
        megabytes = sum(image.numel() for image in images) / 2**20
        logger.info("cached %d images in RAM (%.0f MB)", len(images), megabytes)
        return images

    def _read_resized(self, index: int) -> torch.Tensor:
        # Training images are shrunk as YOLOv5's training loader does, without antialiasing (see resize_to_fit).
        return resize_to_fit(read_image(self.files[index]), self.imgsz, antialias=not self.augment)

    def load_image(self, index: int) -> torch.Tensor:
        """The image with its long side resized to imgsz, from RAM or disk when cached."""
        if self._images is not None:
            return self._images[index]
        cached = self._disk.read(index) if self._disk is not None else None
        return cached if cached is not None else self._read_resized(index)

    def _image_and_boxes(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The resized image and its boxes as (class, x0, y0, x1, y1) in its pixels."""
        image = self.load_image(index)
        height, width = image.shape[1:]
        labels = torch.from_numpy(self.labels[index])
        corners = box_convert(labels[:, 1:] * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")
        return image, torch.cat([labels[:, :1], corners], dim=1)

    @staticmethod
    def _normalised(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Pixel (class, x0, y0, x1, y1) on a height×width image to normalised (class, cx, cy, w, h)."""
        scale = boxes.new_tensor([width, height, width, height])
        return torch.cat([boxes[:, :1], box_convert(boxes[:, 1:], "xyxy", "cxcywh") / scale], dim=1)

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, CanvasKey] | CanvasKey) -> Item:
        if not self.augment:
            return self._validation_item(key if isinstance(key, CanvasKey) else
                                         CanvasKey(key, self.imgsz, self.imgsz))
        epoch, target = key if isinstance(key, tuple) else (0, key)
        index = target.index if isinstance(target, CanvasKey) else target
        augmentation = self.augmentation
        rng = np.random.default_rng([self.seed, epoch, index])
        if isinstance(target, CanvasKey):
            canvas = (target.height, target.width)
            image, boxes = self._rect_view(index, canvas, augmentation, rng)
        else:
            canvas = (self.imgsz, self.imgsz)
            image, boxes = self._mosaic_or_mixup_view(index, augmentation, rng)
        image = augment_colour(image, augmentation, rng)
        image, boxes = random_flips(image, boxes, augmentation, rng)
        # A training image has no single mapping back to one original, hence no shapes.
        return image.contiguous(), self._normalised(boxes, *canvas), str(self.files[index]), None

    def _mosaic_or_mixup_view(
        self, index: int, augmentation: Augmentation, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with_mosaic = bool(rng.random() < augmentation.mosaic)
        image, boxes = self._training_view(index, with_mosaic, augmentation, rng)
        if rng.random() < augmentation.mixup:
            other_index = int(rng.integers(len(self)))
            other, other_boxes = self._training_view(other_index, with_mosaic, augmentation, rng)
            image, boxes = mixup(image, boxes, other, other_boxes, rng)
        return image, boxes

    def _rect_view(
        self, index: int, canvas: tuple[int, int], augmentation: Augmentation, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """--rect training, as in YOLOv5: the image letterboxed onto its batch's canvas, then a
        random perspective onto the same canvas; no mosaic, mixup or copy-paste."""
        image, boxes = self._image_and_boxes(index)
        image, (left, top) = letterbox(image, canvas)
        return random_perspective(image, shift_boxes(boxes, left, top), canvas, augmentation, rng)

    def _training_view(
        self, index: int, with_mosaic: bool, augmentation: Augmentation, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A mosaic of this and three random images, or this one letterboxed; then copy-paste
        and a random perspective down to imgsz×imgsz."""
        if with_mosaic:
            indices = [index, *rng.integers(len(self), size=3).tolist()]
            images, boxes = zip(*(self._image_and_boxes(i) for i in indices))
            centre = rng.integers(self.imgsz // 2, 3 * self.imgsz // 2, size=2, endpoint=True).tolist()
            image, merged = mosaic(list(images), list(boxes), self.imgsz, (centre[0], centre[1]))
        else:
            image, merged = self._image_and_boxes(index)
            image, (left, top) = letterbox(image, (self.imgsz, self.imgsz))
            merged = shift_boxes(merged, left, top)
        image, merged = copy_paste(image, merged, augmentation.copy_paste, rng)
        return random_perspective(image, merged, self.imgsz, augmentation, rng)

    def _validation_item(self, key: CanvasKey) -> Item:
        """The image letterboxed onto the key's canvas with grey padding; no randomness."""
        image, boxes = self._image_and_boxes(key.index)
        height, width = image.shape[1:]
        original_width, original_height = (int(value) for value in self.shapes[key.index])
        padded, (left, top) = letterbox(image, (key.height, key.width))
        shapes = (
            (original_height, original_width),
            ((height / original_height, width / original_width), (left, top)),
        )
        labels = self._normalised(shift_boxes(boxes, left, top), key.height, key.width)
        return padded, labels, str(self.files[key.index]), shapes


def collate(
    batch: Sequence[Item],
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple[Shapes | None, ...]]:
    """Stack images; join labels into (N, 6) targets: image index in the batch, class, cx, cy, w, h."""
    images, labels, paths, shapes = zip(*batch)
    targets = [
        torch.cat([torch.full((len(boxes), 1), float(i)), boxes], dim=1) for i, boxes in enumerate(labels)
    ]
    return torch.stack(images), torch.cat(targets), paths, shapes
