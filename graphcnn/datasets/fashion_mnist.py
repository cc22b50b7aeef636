"""Fashion-MNIST in Keras's shape: load_data() -> (x_train, y_train), (x_test, y_test), all uint8,
images (N, 28, 28), labels (N,) in 0..9 (Zalando's 10 clothing classes).

The files are MNIST-format IDX (the same four names as MNIST), read with mnist.load_folder. Sources, in
order: `load_data(DIR)` a folder you name; else an installed copy (Debian's `dataset-fashion-mnist` puts
it in /usr/share/datasets/fashion-mnist); else the cache (`cache_dir`, else $GRAPHCNN_DATA/fashion-mnist,
else ~/.cache/graphcnn/fashion-mnist), downloading the official .gz files once, each MD5-checked.
"""
from __future__ import annotations

import os

from . import download
from .download import TIMEOUT_SECONDS
from .idx import DatasetError
from .mnist import FILE_NAMES, check_label_range, load_folder

# MD5 of Zalando's official .gz files (the values torchvision and Keras check). Debian re-compresses the
# files, so an installed copy has other .gz checksums: it is trusted like any folder you name.
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# tried in order (tests use file:// folders)
MIRRORS = [
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
]
# installed copies looked for before downloading (tests replace this list)
LOCAL_FOLDERS = ["/usr/share/datasets/fashion-mnist"]
# the largest official file is 26,421,880 bytes
MAX_DOWNLOAD_BYTES = 48 << 20
NUM_CLASSES = 10
OFFLINE_HINT = ("Offline, install Debian's dataset-fashion-mnist package, or copy the four Fashion-MNIST .gz "
                "files into a folder and call fashion_mnist.load_data(path=DIR)")


def _fetch(url, timeout=TIMEOUT_SECONDS) -> bytes:
    """The body at `url`, at most MAX_DOWNLOAD_BYTES (tests replace this function or MIRRORS)."""
    return download.fetch_url(url, timeout, MAX_DOWNLOAD_BYTES)


def default_cache_dir(cache_dir=None) -> str:
    """`cache_dir`, else $GRAPHCNN_DATA/fashion-mnist, else ~/.cache/graphcnn/fashion-mnist."""
    return download.cache_folder("fashion-mnist", cache_dir)


def installed_folder():
    """The first of LOCAL_FOLDERS holding the four files (each optionally gzipped), or None."""
    for folder in LOCAL_FOLDERS:
        if all(os.path.isfile(os.path.join(folder, n)) or os.path.isfile(os.path.join(folder, n + ".gz"))
               for n in FILE_NAMES):
            return folder
    return None


def download_fashion_mnist(cache_dir=None) -> str:
    """Make sure the four official .gz files are in the cache folder (downloading and MD5-checking any
    that are missing or damaged); return that folder."""
    return download.ensure_cached(default_cache_dir(cache_dir), MD5, mirrors=MIRRORS, fetch=_fetch,
                                  what="Fashion-MNIST", offline_hint=OFFLINE_HINT)


def load_data(path=None, *, download=False, cache_dir=None):
    """Load Fashion-MNIST as ((x_train, y_train), (x_test, y_test)): uint8 (N, 28, 28) and uint8 (N,).

    path:      None -> an installed copy (LOCAL_FOLDERS), else the cache, downloading what is missing;
               a folder -> the four IDX files with MNIST's names (each optionally .gz).
    download:  True -> skip installed copies: use the cache, downloading (MD5-checked) what is missing.
    cache_dir: where downloads are cached (default $GRAPHCNN_DATA/fashion-mnist or
               ~/.cache/graphcnn/fashion-mnist).
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"fashion_mnist.load_data: path must be None or a folder, got {type(path).__name__}")
    if not isinstance(download, bool):
        raise TypeError(f"fashion_mnist.load_data: download must be True or False, got {download!r}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"fashion_mnist.load_data: cache_dir must be a str or os.PathLike, got "
                        f"{type(cache_dir).__name__}")
    if path is not None:
        if download or cache_dir is not None:
            raise ValueError("fashion_mnist.load_data: path= reads a folder; it cannot be combined with "
                             "download= or cache_dir=")
        folder = os.fspath(path)
        if not os.path.isdir(folder):
            raise DatasetError(f"{folder}: no such folder (fashion_mnist.load_data(path=) wants a folder of "
                               f"the four IDX files {', '.join(FILE_NAMES)}, each optionally .gz)")
    else:
        folder = None if (download or cache_dir is not None) else installed_folder()
        if folder is None:
            folder = download_fashion_mnist(cache_dir)
    return check_label_range(load_folder(folder), folder, NUM_CLASSES)


__all__ = ["load_data", "default_cache_dir", "download_fashion_mnist", "installed_folder", "MD5", "MIRRORS",
           "LOCAL_FOLDERS"]
