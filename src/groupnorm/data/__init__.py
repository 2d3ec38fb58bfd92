"""Datasets as in-memory uint8 tensors and a loader that cuts batches without per-sample Python.

``load_dataset(name, split)`` returns an :class:`ImageDataset` (images, labels, num_classes, name,
train-split mean/std); ``Loader`` shuffles, shards (DDP), augments (random crop + flip) and
normalizes whole batches with tensor ops. Names: :func:`list_datasets`.
"""

from .catalog import SPLITS, list_datasets, load_dataset
from .dataset import ImageDataset, channel_stats, subset, train_val_split
from .loader import Loader
from .sources import CorruptDatasetError, DatasetNotFoundError

__all__ = [
    "ImageDataset", "load_dataset", "list_datasets", "train_val_split", "subset", "Loader",
    "channel_stats", "DatasetNotFoundError", "CorruptDatasetError", "SPLITS",
]
