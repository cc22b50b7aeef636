"""Datasets: MNIST (bundled 8,000/2,000 subset, any IDX folder, or the full set downloaded and
MD5-checked), the IDX file format, and minimal grayscale PNG reading/writing."""
from .idx import DatasetError, read_idx, write_idx
from . import mnist, png

__all__ = ["mnist", "png", "read_idx", "write_idx", "DatasetError"]
