"""Offline data sets (digits, Fashion-MNIST, MNIST, CIFAR-10) and INR targets; nothing downloads."""

from deepalign.data.batches import labelled_batches, n_examples
from deepalign.data.dataset import Dataset
from deepalign.data.inr import InrTargets, coord_grid, image_targets, sine_frequency, sine_targets
from deepalign.data.sources import FASHION_MNIST_DIR, NAMES, SOURCES, load, resolve_dir

__all__ = [
    "FASHION_MNIST_DIR",
    "NAMES",
    "SOURCES",
    "Dataset",
    "InrTargets",
    "coord_grid",
    "image_targets",
    "labelled_batches",
    "load",
    "n_examples",
    "resolve_dir",
    "sine_frequency",
    "sine_targets",
]
