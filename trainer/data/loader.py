"""Datasets and DataLoaders for a run, the same for one process and for many."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

from torch.utils.data import DataLoader, DistributedSampler, Sampler

from trainer.config import Hyp
from trainer.data.data_config import DataConfig
from trainer.data.dataset import YoloDataset, collate
from trainer.data.labels import load_samples


def build_datasets(
    data_cfg: DataConfig, imgsz: int, hyp: Hyp, cache: str, single_cls: bool, seed: int, stride: int = 32
) -> tuple[YoloDataset, YoloDataset]:
    """The augmented training set and the letterboxed validation set; cache="ram" keeps
    decoded images in memory."""
    cache_ram = cache == "ram"
    train = YoloDataset(
        load_samples(data_cfg.train, data_cfg.nc, "train"),
        imgsz,
        augment=True,
        hyp=hyp,
        cache_ram=cache_ram,
        seed=seed,
        single_cls=single_cls,
        stride=stride,
    )
    val = YoloDataset(
        load_samples(data_cfg.val, data_cfg.nc, "val"),
        imgsz,
        augment=False,
        hyp=hyp,
        cache_ram=cache_ram,
        seed=seed,
        single_cls=single_cls,
        stride=stride,
    )
    return train, val


class ShardSampler(Sampler[int]):
    """Every world_size-th index from `rank` on, in order, each index on exactly one rank.

    DistributedSampler repeats a few indices so that all ranks get equally many; in
    validation a repeated image would be counted twice, so validation shards instead.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Training batches of (epoch, index) keys, epoch after epoch from `start_epoch`, without end.

    One loader iterator then serves a whole run and its workers prefetch into the next epoch,
    where a new iterator per epoch would leave the GPU waiting while every worker assembles its
    first batch again (seconds per epoch at 640 px). The epoch travels with each index, so a
    sample prefetched early still gets its own epoch's augmentation. Each epoch is shuffled by
    the DistributedSampler with `set_epoch`, split into batches, the last one possibly short.
    `len()` is the batches per epoch; take that many per epoch from the iterator.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.start_epoch = 0

    def start_at(self, epoch: int) -> None:
        """The epoch the next iterator starts with (a resumed run starts past 0)."""
        self.start_epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in itertools.count(self.start_epoch):
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            for start in range(0, len(indices), self.batch_size):
                yield [(epoch, index) for index in indices[start : start + self.batch_size]]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


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
) -> tuple[DataLoader, EpochBatches | ShardSampler]:
    """A loader over this rank's share of the dataset, and what orders it.

    Without `shard` (training) the loader never ends: it goes through `EpochBatches` (a
    DistributedSampler even for one process, so a run shuffles the same way on one GPU as on
    many). Call `batches.start_at(epoch)`, make one iterator per run and take `len(loader)`
    batches from it per epoch. Workers are persistent: they survive iterators and, through the
    dataset's shared settings, changes of augmentation hyperparameters.

    shard=True (validation) gives each rank a disjoint, unshuffled share with no repeats, once
    per iterator.
    """
    if shard and shuffle:
        raise ValueError("a sharded loader is for validation and cannot shuffle")
    order: EpochBatches | ShardSampler
    if shard:
        order = ShardSampler(len(dataset), rank, world_size)
        batching = {"sampler": order, "batch_size": batch_size, "drop_last": False}
    else:
        order = EpochBatches(DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                seed=seed), batch_size)
        batching = {"batch_sampler": order}
    loader = DataLoader(
        dataset,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        collate_fn=collate,
        **batching,
    )
    return loader, order
