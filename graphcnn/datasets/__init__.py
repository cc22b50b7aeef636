"""Datasets: MNIST (bundled 8,000/2,000 subset, any IDX folder, or the full set downloaded and
MD5-checked), Fashion-MNIST (installed copy, folder or download), CIFAR-10 (binary version), the IDX
file format, and minimal grayscale PNG reading/writing."""
from .idx import DatasetError, read_idx, write_idx
from . import cifar10, fashion_mnist, mnist, png

__all__ = ["mnist", "fashion_mnist", "cifar10", "png", "read_idx", "write_idx", "DatasetError"]
