"""Datasets and DataLoaders for a run, the same for one process and for many."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from trainer.config import Hyp
from trainer.data.data_config import DataConfig
from trainer.data.dataset import CanvasKey, YoloDataset, collate
from trainer.data.labels import load_samples

Key = TypeVar("Key")  # what names a training sample within an epoch: an index, or a CanvasKey


def build_datasets(
    data_cfg: DataConfig, imgsz: int, hyp: Hyp, cache: str, single_cls: bool, seed: int, stride: int = 32
) -> tuple[YoloDataset, YoloDataset]:
    """The augmented training set and the letterboxed validation set; cache "ram" keeps
    decoded, resized images in memory, "disk" in .npy files (see trainer.data.disk_cache)."""
    train = YoloDataset(
        load_samples(data_cfg.train, data_cfg.nc, "train"),
        imgsz,
        augment=True,
        hyp=hyp,
        cache=cache,
        seed=seed,
        single_cls=single_cls,
        stride=stride,
    )
    val = YoloDataset(
        load_samples(data_cfg.val, data_cfg.nc, "val"),
        imgsz,
        augment=False,
        hyp=hyp,
        cache=cache,
        seed=seed,
        single_cls=single_cls,
        stride=stride,
    )
    return train, val


VALIDATION_PAD = 0.5  # strides added to a validation canvas's sides before rounding up, as in YOLOv5


def canvas_shape(aspects: np.ndarray, imgsz: int, stride: int, pad: float = VALIDATION_PAD) -> tuple[int, int]:
    """The (height, width) canvas for images of these height/width ratios, each resized to a long
    side of imgsz: the side that is imgsz for every image gets imgsz, the other the largest image's
    extent, then both `pad` strides more, rounded up to a multiple of the stride. A batch of both
    portrait and landscape images gets a square."""
    relative_height, relative_width = 1.0, 1.0
    if aspects.max() < 1:  # all landscape
        relative_height = float(aspects.max())
    elif aspects.min() > 1:  # all portrait
        relative_width = 1 / float(aspects.min())
    height, width = (math.ceil(relative * imgsz / stride + pad) * stride
                     for relative in (relative_height, relative_width))
    return height, width


def aspect_batches(sizes: np.ndarray, imgsz: int, stride: int, batch_size: int, rank: int, world_size: int,
                   pad: float = VALIDATION_PAD, order: np.ndarray | None = None) -> list[list[CanvasKey]]:
    """This rank's batches of images of similar aspect ratio, each with its own canvas.

    The images (`sizes`: (n, 2) original width, height), in `order` (default: all of them),
    are sorted by height/width and cut into groups of `batch_size × world_size`. Each group's
    canvas fits all of its images (`canvas_shape`); rank r takes every world_size-th image of
    each group from the r-th on, so a canvas does not depend on the number of ranks.
    """
    order = np.arange(len(sizes)) if order is None else order
    aspects = sizes[:, 1] / sizes[:, 0]
    order = order[np.argsort(aspects[order], kind="stable")]
    group_size = batch_size * world_size
    batches = []
    for start in range(0, len(order), group_size):
        group = order[start : start + group_size]
        height, width = canvas_shape(aspects[group], imgsz, stride, pad)
        batches.append([CanvasKey(int(index), height, width) for index in group[rank::world_size]])
    return batches


class ValidationBatches(Sampler[list[CanvasKey]]):
    """This rank's validation batches: images of similar aspect ratio together, each batch
    letterboxed onto its own canvas (`canvas_shape`), as YOLOv5 validates during training.

    Images are sorted by height/width and cut into groups of `batch_size × world_size`; each
    group's canvas fits all of its images, and rank r takes every world_size-th image of each
    group from the r-th on. So every image is on exactly one rank, and its canvas does not
    depend on how many ranks share the work. (DistributedSampler would repeat a few images so
    that all ranks get equally many; a repeated image would be counted twice.) Wide images no
    longer pay for a square canvas: at 640 px, 640×480 photos go onto 672×512, not 672×672.
    """

    def __init__(self, sizes: np.ndarray, imgsz: int, stride: int, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> None:
        """`sizes` is the (n, 2) array of the images' original (width, height)."""
        self.batches = [share for share in aspect_batches(sizes, imgsz, stride, batch_size, rank, world_size) if share]

    def __iter__(self) -> Iterator[list[CanvasKey]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EndlessBatches(Sampler[list[tuple[int, Key]]]):
    """Training batches of (epoch, key) pairs, epoch after epoch from `start_epoch`, without end.

    One loader iterator then serves a whole run and its workers prefetch into the next epoch,
    where a new iterator per epoch would leave the GPU waiting while every worker assembles its
    first batch again (seconds per epoch at 640 px). The epoch travels with each key, so a
    sample prefetched early still gets its own epoch's augmentation. `len()` is the batches per
    epoch; take that many per epoch from the iterator. Subclasses say what one epoch's batches are.
    """

    start_epoch = 0

    def start_at(self, epoch: int) -> None:
        """The epoch the next iterator starts with (a resumed run starts past 0)."""
        self.start_epoch = epoch

    def reseed(self, seed: int) -> None:
        """Order the epochs from this seed (built with the run's)."""
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> Iterator[list[Key]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[tuple[int, Key]]]:
        for epoch in itertools.count(self.start_epoch):
            for batch in self.epoch_batches(epoch):
                yield [(epoch, key) for key in batch]


class EpochBatches(EndlessBatches[int]):
    """Each epoch shuffled by the DistributedSampler with `set_epoch` and split into batches of
    image indices, the last one possibly short."""

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size

    def reseed(self, seed: int) -> None:
        self.sampler.seed = seed

    def epoch_batches(self, epoch: int) -> Iterator[list[int]]:
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)
        for start in range(0, len(indices), self.batch_size):
            yield indices[start : start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


class RectBatches(EndlessBatches[CanvasKey]):
    """--rect training batches: images of similar aspect ratio
    together, each batch letterboxed onto the smallest canvas that holds it (no padding beyond
    the stride, as YOLOv5's rectangular training).

    The batches are fixed, as in YOLOv5; unlike YOLOv5, their order is shuffled every epoch
    (the same on every rank, from the seed and the epoch). When the images do not split evenly
    over the ranks, the first few are repeated, so every rank takes the same number of steps.
    """

    def __init__(self, sizes: np.ndarray, imgsz: int, stride: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        order = np.arange(len(sizes))
        order = np.concatenate([order, order[: -len(order) % world_size]])
        self.batches = aspect_batches(sizes, imgsz, stride, batch_size, rank, world_size, pad=0.0, order=order)
        self.seed = seed

    def reseed(self, seed: int) -> None:
        self.seed = seed

    def epoch_batches(self, epoch: int) -> Iterator[list[CanvasKey]]:
        for batch in np.random.default_rng([self.seed % 2**32, epoch]).permutation(len(self.batches)):
            yield self.batches[batch]

    def __len__(self) -> int:
        return len(self.batches)


def build_dataloader(
    dataset: YoloDataset,
    batch_size: int,
    workers: int,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    shard: bool = False,
    rect: bool = False,
) -> tuple[DataLoader, EndlessBatches | ValidationBatches]:
    """A loader over this rank's share of the dataset, and what orders it.

    Without `shard` (training) the loader never ends: it goes through `EpochBatches` (a
    DistributedSampler even for one process, so a run shuffles the same way on one GPU as on
    many). Call `batches.start_at(epoch)`, make one iterator per run and take `len(loader)`
    batches from it per epoch. Workers are persistent: they survive iterators and, through the
    dataset's shared settings, changes of augmentation hyperparameters.

    shard=True (validation) gives each rank a disjoint, unshuffled share with no repeats, once
    per iterator, in batches of similar aspect ratio (`ValidationBatches`). rect=True (training)
    batches by aspect ratio too, without end (`RectBatches`).
    """
    if shard and shuffle:
        raise ValueError("a sharded loader is for validation and cannot shuffle")
    order: EndlessBatches | ValidationBatches
    if shard:
        order = ValidationBatches(dataset.shapes, dataset.imgsz, dataset.stride, batch_size, rank, world_size)
    elif rect:
        order = RectBatches(dataset.shapes, dataset.imgsz, dataset.stride, batch_size, seed, rank, world_size)
    else:
        order = EpochBatches(DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                seed=seed), batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=order,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        collate_fn=collate,
    )
    return loader, order
