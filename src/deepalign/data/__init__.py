"""Offline data sets (digits, Fashion-MNIST, MNIST, CIFAR-10) and INR targets; nothing downloads."""

from deepalign.data.batches import as_examples, labelled_batches, n_examples
from deepalign.data.dataset import Dataset
from deepalign.data.files import is_data_file, load_file
from deepalign.data.inr import InrTargets, coord_grid, image_targets, sine_frequency, sine_targets
from deepalign.data.sources import (
    FASHION_MNIST_DIR,
    NAMES,
    SOURCES,
    load,
    normalization_help,
    resolve_dir,
)

__all__ = [
    "as_examples",
    "FASHION_MNIST_DIR",
    "NAMES",
    "SOURCES",
    "Dataset",
    "InrTargets",
    "coord_grid",
    "image_targets",
    "is_data_file",
    "labelled_batches",
    "load",
    "load_file",
    "normalization_help",
    "n_examples",
    "resolve_dir",
    "sine_frequency",
    "sine_targets",
]
