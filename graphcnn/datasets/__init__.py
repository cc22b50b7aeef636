"""Datasets: MNIST (bundled subset, any IDX folder, or the full set downloaded and checksummed)."""
from .idx import DatasetError, read_idx, write_idx
from . import mnist

__all__ = ["mnist", "read_idx", "write_idx", "DatasetError"]
