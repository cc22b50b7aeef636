"""MNIST in Keras's shape: load_data() -> (x_train, y_train), (x_test, y_test), all uint8.

- `load_data()`: the bundled 8,000/2,000 subset of real MNIST digits (offline, the default).
- `load_data(DIR)`: any folder of MNIST-format IDX files (standard names, each optionally .gz).
- `load_data("file.npz")`: Keras's mnist.npz layout (x_train, y_train, x_test, y_test).
- `load_data("mnist")` or `load_data(download=True)`: the full 60,000/10,000 set, downloaded once into a
  cache folder (`cache_dir`, else $GRAPHCNN_DATA, else ~/.cache/graphcnn/mnist), every file MD5-checked.
"""
from __future__ import annotations

import os

import numpy as np

from . import download
from .download import TIMEOUT_SECONDS
from .idx import DatasetError, read_idx

# the four files of an MNIST folder, in load order: train images, train labels, test images, test labels
FILE_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")
# MD5 of the official .gz files (the same values torchvision checks)
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# tried in order; any URL base urllib opens works (tests use file:// folders)
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
# the largest official file is 9,912,422 bytes; a response past this cap is not MNIST
MAX_DOWNLOAD_BYTES = 32 << 20


def bundled_path() -> str:
    """The folder of the bundled subset (8,000 train / 2,000 test real MNIST digits, gzipped IDX)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist-10k")


def default_cache_dir(cache_dir=None) -> str:
    """Where the full MNIST is cached: `cache_dir`, else $GRAPHCNN_DATA, else ~/.cache/graphcnn/mnist."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    return os.environ.get("GRAPHCNN_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "graphcnn",
                                                           "mnist")


# -- reading a folder ------------------------------------------------------------------------------
def _find_file(folder: str, name: str):
    """The path of `name` in `folder`: as is, gzipped, or with the common '.idx3-ubyte' spelling."""
    dotted = name.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte, as some redistributions name it
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        p = os.path.join(folder, candidate)
        if os.path.isfile(p):
            return p
    return None


def _check_pair(images, labels, image_src: str, label_src: str):
    """Validate one split: uint8 images (N, H, W), uint8 labels (N,), same N."""
    if images.ndim != 3:
        raise DatasetError(f"{image_src}: expected images of shape (N, H, W), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise DatasetError(f"{image_src}: expected uint8 pixels, got {images.dtype}")
    if labels.ndim != 1:
        raise DatasetError(f"{label_src}: expected labels of shape (N,), got shape {labels.shape}")
    if labels.dtype != np.uint8:
        raise DatasetError(f"{label_src}: expected uint8 labels, got {labels.dtype}")
    if len(images) != len(labels):
        raise DatasetError(f"{image_src} has {len(images)} images but {label_src} has {len(labels)} labels")


def _check_splits(train, test, train_src: str, test_src: str):
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DatasetError(f"{train_src} holds {train[0].shape[1]}x{train[0].shape[2]} images but {test_src} "
                           f"holds {test[0].shape[1]}x{test[0].shape[2]}")


def check_label_range(splits, source: str, num_classes: int):
    """Return ((x_train, y_train), (x_test, y_test)) unchanged; refuse labels outside 0..num_classes-1
    (the files are not that dataset)."""
    for (_, y), part in zip(splits, ("train", "test")):
        if y.size and int(y.max()) >= num_classes:
            raise DatasetError(f"{source}: {part} labels go up to {int(y.max())}, but this dataset has "
                               f"{num_classes} classes (0..{num_classes - 1})")
    return splits


def load_folder(folder):
    """((x_train, y_train), (x_test, y_test)) from a folder of the four MNIST IDX files."""
    folder = os.fspath(folder)
    paths = [_find_file(folder, name) for name in FILE_NAMES]
    missing = [name for name, p in zip(FILE_NAMES, paths) if p is None]
    if missing:
        raise DatasetError(f"{folder}: missing {', '.join(n + '[.gz]' for n in missing)} (an MNIST folder "
                           f"holds {', '.join(FILE_NAMES)}, each optionally gzipped)")
    arrays = [read_idx(p) for p in paths]
    train, test = (arrays[0], arrays[1]), (arrays[2], arrays[3])
    _check_pair(*train, paths[0], paths[1])
    _check_pair(*test, paths[2], paths[3])
    _check_splits(train, test, paths[0], paths[2])
    return train, test


def load_npz(path):
    """((x_train, y_train), (x_test, y_test)) from a Keras-style mnist.npz (no pickles are loaded)."""
    path = os.fspath(path)
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise DatasetError(f"{path}: missing arrays {missing} (a Keras MNIST .npz holds {list(keys)})")
            arrays = {k: f[k] for k in keys}
    except (OSError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: not a readable .npz file: {e}") from None
    train, test = (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])
    _check_pair(*train, f"{path}[x_train]", f"{path}[y_train]")
    _check_pair(*test, f"{path}[x_test]", f"{path}[y_test]")
    _check_splits(train, test, f"{path}[x_train]", f"{path}[x_test]")
    return train, test


# -- downloading (the shared mechanism in download.py) ----------------------------------------------
def _fetch(url, timeout=TIMEOUT_SECONDS) -> bytes:
    """The body at `url`, at most MAX_DOWNLOAD_BYTES (tests replace this function or MIRRORS)."""
    return download.fetch_url(url, timeout, MAX_DOWNLOAD_BYTES)


OFFLINE_HINT = ("Offline, use load_data() for the bundled 8,000/2,000 subset, or copy the four MNIST .gz files "
                "into a folder and call load_data(path=DIR)")


def download_mnist(cache_dir=None) -> str:
    """Make sure the four official MNIST .gz files are in the cache folder (downloading and MD5-checking
    any that are missing or damaged) and return that folder. See default_cache_dir for the location."""
    return download.ensure_cached(default_cache_dir(cache_dir), MD5, mirrors=MIRRORS, fetch=_fetch,
                                  what="full MNIST", offline_hint=OFFLINE_HINT)


# -- the Keras-compatible entry point --------------------------------------------------------------
def load_data(path=None, *, download=False, cache_dir=None):
    """Load MNIST as ((x_train, y_train), (x_test, y_test)): uint8 images (N, H, W), uint8 labels (N,).

    path:      None -> the bundled 8,000/2,000 subset (no network);
               a folder -> MNIST-format IDX files with the standard names (each optionally .gz);
               a .npz file -> Keras's mnist.npz layout;
               "mnist" -> the full 60,000/10,000 MNIST (as download=True).
    download:  True -> the full MNIST from the cache, downloading (MD5-checked) what is missing.
    cache_dir: where the full MNIST is cached (default $GRAPHCNN_DATA or ~/.cache/graphcnn/mnist).
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_data: path must be None, a folder, a .npz file or 'mnist', got "
                        f"{type(path).__name__}")
    if not isinstance(download, bool):
        raise TypeError(f"load_data: download must be True or False, got {download!r}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"load_data: cache_dir must be a str or os.PathLike, got {type(cache_dir).__name__}")
    full = download or path == "mnist"
    if download and path not in (None, "mnist"):
        raise ValueError(f"load_data: download=True fetches the full MNIST into cache_dir; it cannot be "
                         f"combined with path={os.fspath(path)!r} (use cache_dir= to choose the folder)")
    if cache_dir is not None and not full:
        raise ValueError("load_data: cache_dir only applies to the full MNIST (path='mnist' or download=True)")
    if full:
        return load_folder(download_mnist(cache_dir))
    if path is None:
        return load_folder(bundled_path())
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_folder(path)
    if os.path.isfile(path) and path.lower().endswith(".npz"):
        return load_npz(path)
    if os.path.isfile(path):
        raise DatasetError(f"{path}: load_data(path=) wants a folder of MNIST IDX files or a .npz file; "
                           f"for one IDX file use graphcnn.datasets.read_idx")
    raise DatasetError(f"{path}: no such folder (load_data(path=) wants a folder of MNIST IDX files, a .npz "
                       f"file, or 'mnist' for the full download)")


__all__ = ["load_data", "bundled_path", "default_cache_dir", "download_mnist", "load_folder", "load_npz",
           "MIRRORS", "MD5", "FILE_NAMES"]
