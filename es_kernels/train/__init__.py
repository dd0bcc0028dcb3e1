"""Training integrations: the loop helper, data utilities, and the command-line runs built on them."""

from es_kernels.train.data import IndexedDataset, corrupt_labels
from es_kernels.train.loop import METHODS, EvolvedTraining, SelectedBatch

__all__ = ["METHODS", "EvolvedTraining", "IndexedDataset", "SelectedBatch", "corrupt_labels"]
