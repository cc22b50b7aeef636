"""MNIST in Keras's shape: load_data() -> (x_train, y_train), (x_test, y_test), uint8.

path=None: the bundled 10k subset (offline); path=DIR: any folder of MNIST-format IDX files (.gz or
raw); path="mnist" / download=True: the full 70k, downloaded once into a cache with MD5 checks."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request

from .idx import DatasetError, read_idx

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
       "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
       "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
       "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"]


def bundled_path() -> str:
    """The folder of the bundled 8,000/2,000-image subset."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist-10k")


def _find(folder, name):
    for cand in (name, name + ".gz"):
        p = os.path.join(folder, cand)
        if os.path.isfile(p):
            return p
    raise DatasetError(f"{folder}: no {name}[.gz] (expected the four MNIST IDX files: {', '.join(NAMES)})")


def _pair(folder, img_name, lab_name):
    ip, lp = _find(folder, img_name), _find(folder, lab_name)
    x, y = read_idx(ip), read_idx(lp)
    if x.ndim != 3:
        raise DatasetError(f"{ip}: expected images of shape (N, H, W), got {x.shape}")
    if y.ndim != 1:
        raise DatasetError(f"{lp}: expected labels of shape (N,), got {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{ip} has {len(x)} images but {lp} has {len(y)} labels")
    return x, y


def default_cache_dir(explicit=None) -> str:
    return explicit or os.environ.get("GRAPHCNN_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "graphcnn", "mnist")


def _fetch(url, timeout=20) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def fetch_full_mnist(folder=None) -> str:
    """Make sure the full MNIST is in `folder` (default cache); verify MD5s; return the folder."""
    folder = default_cache_dir(folder)
    os.makedirs(folder, exist_ok=True)
    for fname, md5 in MD5.items():
        dest = os.path.join(folder, fname)
        if os.path.isfile(dest) and hashlib.md5(open(dest, "rb").read()).hexdigest() == md5:
            continue
        errors = []
        for base in MIRRORS:
            try:
                data = _fetch(base + fname)
            except Exception as e:  # network down, 404, timeout
                errors.append(f"{base}: {e}")
                continue
            got = hashlib.md5(data).hexdigest()
            if got != md5:
                errors.append(f"{base}: checksum mismatch (md5 {got}, expected {md5})")
                continue
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
            break
        else:
            raise DatasetError(f"could not download {fname} ({'; '.join(errors)}); without network access use "
                               f"load_data() for the bundled subset or load_data(path=DIR) for local files")
    return folder


def load_data(path=None, *, download=False, cache_dir=None):
    """Keras-compatible: ((x_train, y_train), (x_test, y_test)), images uint8 (N, 28, 28)."""
    if path == "mnist" or download:
        folder = fetch_full_mnist(cache_dir)
    elif path is None:
        folder = bundled_path()
    else:
        folder = os.fspath(path)
        if not os.path.isdir(folder):
            raise DatasetError(f"{folder}: not a folder of MNIST IDX files")
    return _pair(folder, NAMES[0], NAMES[1]), _pair(folder, NAMES[2], NAMES[3])
