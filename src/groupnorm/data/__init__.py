"""Datasets as in-memory uint8 tensors and a loader that cuts batches without per-sample Python.

``load_dataset(name, split)`` returns an :class:`ImageDataset` (images, labels, num_classes, name,
train-split mean/std, the identity of the files read, class names; also a torch ``Dataset``);
``Loader`` shuffles, shards (DDP), augments (random crop + flip) and normalizes whole batches with
tensor ops. Names: :func:`list_datasets`. Image folders (``<split>/<class>/<image>``, a directory
or a .tar/.tar.gz) are read by :func:`read_image_folder` and cached decoded on disk.
"""

from .catalog import SPLITS, dataset_title, list_datasets, load_dataset
from .dataset import DataFile, ImageDataset, channel_stats, data_file, subset, train_val_split
from .imagefolder import FolderSplit, read_image_folder
from .loader import Loader
from .sources import CorruptDatasetError, DatasetNotFoundError

__all__ = [
    "ImageDataset", "DataFile", "data_file", "load_dataset", "list_datasets", "dataset_title",
    "train_val_split",
    "subset", "Loader", "channel_stats", "read_image_folder", "FolderSplit",
    "DatasetNotFoundError", "CorruptDatasetError", "SPLITS",
]
