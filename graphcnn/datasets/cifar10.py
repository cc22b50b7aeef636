"""CIFAR-10 in Keras's shape: load_data() -> (x_train, y_train), (x_test, y_test) with x uint8
(N, 32, 32, 3) channels-last and y uint8 (N, 1), 50,000 train / 10,000 test, 10 classes.

Read from the dataset authors' *binary* version (`cifar-10-binary.tar.gz`), which is plain bytes: each
record is one label byte then 3,072 pixel bytes (1,024 red, 1,024 green, 1,024 blue, each a row-major
32x32 plane). The python version is pickled, and unpickling a downloaded file can run code, so it is
not read. Members are read from the archive in memory (nothing is extracted to disk, so archive paths
cannot escape), only the six expected names, each a regular file of a bounded size.

Sources: `load_data(DIR)` (a folder holding the six .bin files, their `cifar-10-batches-bin/` folder,
or the .tar.gz), `load_data("file.tar.gz")`, else the cache (`cache_dir`, else $GRAPHCNN_DATA/cifar10,
else ~/.cache/graphcnn/cifar10), downloading the archive once and checking its published MD5.
"""
from __future__ import annotations

import os
import tarfile

import numpy as np

from . import download
from .download import TIMEOUT_SECONDS
from .idx import DatasetError
from .mnist import check_label_range

ARCHIVE = "cifar-10-binary.tar.gz"
# the MD5 published on https://www.cs.toronto.edu/~kriz/cifar.html for the binary version (170,052,171 bytes)
MD5 = {ARCHIVE: "c32a1d4ab5d03f1284b67883e8d87530"}
MIRRORS = ["https://www.cs.toronto.edu/~kriz/"]
MAX_DOWNLOAD_BYTES = 200 << 20
MEMBER_FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
HEIGHT = WIDTH = 32
CHANNELS = 3
RECORD_BYTES = 1 + HEIGHT * WIDTH * CHANNELS
# an official batch file holds 10,000 records (30,730,000 bytes); anything bigger is not CIFAR-10
MAX_MEMBER_BYTES = 10000 * RECORD_BYTES
NUM_CLASSES = 10
OFFLINE_HINT = ("Offline, copy cifar-10-binary.tar.gz (or its six .bin files) into a folder and call "
                "cifar10.load_data(path=DIR)")


def _fetch(url, timeout=TIMEOUT_SECONDS) -> bytes:
    """The body at `url`, at most MAX_DOWNLOAD_BYTES (tests replace this function or MIRRORS)."""
    return download.fetch_url(url, timeout, MAX_DOWNLOAD_BYTES)


def default_cache_dir(cache_dir=None) -> str:
    """`cache_dir`, else $GRAPHCNN_DATA/cifar10, else ~/.cache/graphcnn/cifar10."""
    return download.cache_folder("cifar10", cache_dir)


def download_cifar10(cache_dir=None) -> str:
    """Make sure the official archive is in the cache folder with its published MD5 (downloading it when
    missing or damaged); return the archive's path."""
    folder = download.ensure_cached(default_cache_dir(cache_dir), MD5, mirrors=MIRRORS, fetch=_fetch,
                                    what="CIFAR-10", offline_hint=OFFLINE_HINT)
    return os.path.join(folder, ARCHIVE)


def parse_batch(data: bytes, source: str):
    """Records of one binary batch -> (images uint8 (N, 32, 32, 3), labels uint8 (N, 1))."""
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise DatasetError(f"{source}: {len(data)} bytes is not a whole number of CIFAR-10 records "
                           f"({RECORD_BYTES} bytes each: 1 label byte + 32*32*3 pixel bytes)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, :1].copy()
    # planes (N, C, H, W) -> channels-last, as Keras returns them
    images = np.ascontiguousarray(records[:, 1:].reshape(-1, CHANNELS, HEIGHT, WIDTH).transpose(0, 2, 3, 1))
    return images, labels


def _read_file(path: str) -> bytes:
    size = os.path.getsize(path)
    if size > MAX_MEMBER_BYTES:
        raise DatasetError(f"{path}: {size} bytes, more than a CIFAR-10 batch file holds ({MAX_MEMBER_BYTES})")
    with open(path, "rb") as f:
        return f.read()


def _read_archive(path: str) -> dict:
    """name -> bytes of the six batch files inside a cifar-10-binary tar archive (gzipped or not)."""
    wanted = {f"{MEMBER_FOLDER}/{n}": n for n in TRAIN_FILES + TEST_FILES}
    found = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = wanted.get(member.name)
                if name is None:
                    continue
                if not member.isfile():
                    raise DatasetError(f"{path}: member {member.name} is not a regular file")
                if member.size > MAX_MEMBER_BYTES:
                    raise DatasetError(f"{path}: member {member.name} has {member.size} bytes, more than a "
                                       f"CIFAR-10 batch file holds ({MAX_MEMBER_BYTES})")
                found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: not a readable CIFAR-10 tar archive ({e})") from None
    missing = [n for n in TRAIN_FILES + TEST_FILES if n not in found]
    if missing:
        raise DatasetError(f"{path}: archive lacks {', '.join(f'{MEMBER_FOLDER}/{n}' for n in missing)}")
    return found


def _read_folder(folder: str) -> tuple[dict, str]:
    """The six batch files from a folder: directly, in cifar-10-batches-bin/, or in the .tar.gz there."""
    for candidate in (folder, os.path.join(folder, MEMBER_FOLDER)):
        if all(os.path.isfile(os.path.join(candidate, n)) for n in TRAIN_FILES + TEST_FILES):
            return {n: _read_file(os.path.join(candidate, n)) for n in TRAIN_FILES + TEST_FILES}, candidate
    archive = os.path.join(folder, ARCHIVE)
    if os.path.isfile(archive):
        return _read_archive(archive), archive
    raise DatasetError(f"{folder}: no CIFAR-10 binary batches ({', '.join(TRAIN_FILES + TEST_FILES)}, "
                       f"directly or in {MEMBER_FOLDER}/) and no {ARCHIVE}")


def _assemble(files: dict, source: str):
    splits = []
    for names in (TRAIN_FILES, TEST_FILES):
        parts = [parse_batch(files[n], f"{source}: {n}") for n in names]
        splits.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    return check_label_range(tuple(splits), source, NUM_CLASSES)


def load_data(path=None, *, download=False, cache_dir=None):
    """Load CIFAR-10 as ((x_train, y_train), (x_test, y_test)): uint8 (N, 32, 32, 3) and uint8 (N, 1).

    path:      None -> the cached archive, downloaded (MD5-checked) when missing;
               a folder -> the six .bin batch files (directly or in cifar-10-batches-bin/) or the archive;
               a .tar.gz / .tar file -> the binary archive itself (not checksummed: your file).
    download:  True -> the cache, downloading as needed (the default when path is None).
    cache_dir: where the download is cached (default $GRAPHCNN_DATA/cifar10 or ~/.cache/graphcnn/cifar10).
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"cifar10.load_data: path must be None, a folder or a .tar.gz file, got "
                        f"{type(path).__name__}")
    if not isinstance(download, bool):
        raise TypeError(f"cifar10.load_data: download must be True or False, got {download!r}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cifar10.load_data: cache_dir must be a str or os.PathLike, got {type(cache_dir).__name__}")
    if path is None:
        archive = download_cifar10(cache_dir)
        return _assemble(_read_archive(archive), archive)
    if download or cache_dir is not None:
        raise ValueError("cifar10.load_data: path= reads your files; it cannot be combined with download= or "
                         "cache_dir=")
    path = os.fspath(path)
    if os.path.isdir(path):
        files, source = _read_folder(path)
        return _assemble(files, source)
    if os.path.isfile(path):
        return _assemble(_read_archive(path), path)
    raise DatasetError(f"{path}: no such file or folder (cifar10.load_data(path=) wants a folder of CIFAR-10 "
                       f"binary batches or {ARCHIVE})")


__all__ = ["load_data", "default_cache_dir", "download_cifar10", "parse_batch", "MD5", "MIRRORS"]
