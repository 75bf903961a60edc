"""Datasets in YOLO layout: the data config, label checking and caching, augmentation, loaders,
and the built-in synthetic dataset."""

from trainer.data.data_config import DataConfig, load_data_config
from trainer.data.dataset import YoloDataset, collate
from trainer.data.labels import Sample, load_samples
from trainer.data.loader import EpochBatches, ValidationBatches, build_dataloader, build_datasets
from trainer.data.synthetic import generate_synthetic

__all__ = [
    "DataConfig",
    "EpochBatches",
    "Sample",
    "ValidationBatches",
    "YoloDataset",
    "build_dataloader",
    "build_datasets",
    "collate",
    "generate_synthetic",
    "load_data_config",
    "load_samples",
]
