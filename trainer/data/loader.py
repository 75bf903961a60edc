"""Datasets and DataLoaders for a run, the same for one process and for many."""

from __future__ import annotations

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

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reshuffle; here so callers can treat both samplers alike."""


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
) -> tuple[DataLoader, DistributedSampler | ShardSampler]:
    """A loader over this rank's share of the dataset.

    The sampler is a DistributedSampler even for one process, so a run shuffles the same way
    on one GPU as on many; call `sampler.set_epoch(epoch)` (and `dataset.set_epoch(epoch)`)
    before each epoch. Workers are persistent: they survive epochs and, through the dataset's
    shared settings, changes of augmentation hyperparameters.

    shard=True (validation) gives each rank a disjoint, unshuffled share with no repeats.
    """
    if shard and shuffle:
        raise ValueError("a sharded loader is for validation and cannot shuffle")
    sampler: DistributedSampler | ShardSampler
    if shard:
        sampler = ShardSampler(len(dataset), rank, world_size)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        collate_fn=collate,
        drop_last=False,
    )
    return loader, sampler
