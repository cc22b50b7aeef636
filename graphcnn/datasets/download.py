"""Downloading dataset files: first mirror that serves the right checksum wins, written atomically.

One mechanism for every dataset (MNIST, Fashion-MNIST, CIFAR-10): a dataset module names its files,
their published MD5s, its mirrors and a size cap, and calls `ensure_cached`. Files already in the cache
with the right checksum are not fetched again; a partial or damaged file is fetched again. Nothing
unverified is ever written.
"""
from __future__ import annotations

import errno
import hashlib
import os
import socket
import sys
import urllib.error
import urllib.request

from .idx import DatasetError, write_file_atomically

TIMEOUT_SECONDS = 15
_READ_CHUNK = 1 << 20
# errno values that mean "no route to the internet" rather than "the server said no"
_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ECONNREFUSED,
                   errno.ECONNRESET, errno.ETIMEDOUT}


def fetch_url(url: str, timeout: float, max_bytes: int) -> bytes:
    """The body at `url`, refusing a response longer than `max_bytes` (it cannot be the expected file)."""
    chunks, size = [], 0
    with urllib.request.urlopen(url, timeout=timeout) as response:
        while True:
            chunk = response.read(_READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise DatasetError(f"{url}: response larger than {max_bytes} bytes; not the expected file")
            chunks.append(chunk)
    return b"".join(chunks)


def is_network_failure(exc: BaseException) -> bool:
    """True when `exc` means the network is unreachable (no DNS, no route, timeout), not a server reply."""
    if isinstance(exc, urllib.error.HTTPError):
        return False  # the server answered (404, 403, ...)
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (TimeoutError, ConnectionError, socket.gaierror)):
        return True
    return isinstance(reason, OSError) and reason.errno in _NETWORK_ERRNOS


def md5_of_file(path: str) -> str | None:
    """Hex MD5 of a file's bytes, or None when it cannot be read (missing)."""
    try:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_READ_CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def download_one(fname: str, expected_md5: str, dest: str, *, mirrors, fetch, what: str,
                 offline_hint: str) -> None:
    """Fetch `fname` from the first of `mirrors` that serves it with MD5 `expected_md5`; write it to
    `dest` atomically. `fetch(url, timeout=...)` returns the body. `what` names the dataset in errors,
    `offline_hint` says what to do without a network."""
    failures, all_network = [], True
    for base in mirrors:
        url = base + fname
        print(f"graphcnn: downloading {url}", file=sys.stderr)
        try:
            data = fetch(url, timeout=TIMEOUT_SECONDS)
        except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors
            all_network = all_network and is_network_failure(e)
            failures.append(f"{url}: {e}")
            continue
        got = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if got != expected_md5:
            all_network = False
            failures.append(f"{url}: checksum mismatch (md5 {got}, expected {expected_md5}; {len(data)} bytes)")
            continue
        write_file_atomically(dest, data)
        return
    if not mirrors:
        failures.append("no mirrors configured")
    cause = "the network seems unavailable" if all_network and mirrors else "every mirror failed"
    raise DatasetError(f"could not download the {what} file {fname}: {cause} ({'; '.join(failures)}). "
                       f"{offline_hint}")


def ensure_cached(folder: str, checksums: dict, *, mirrors, fetch, what: str, offline_hint: str) -> str:
    """Make sure every file of `checksums` (name -> MD5) is in `folder` with its checksum, downloading
    what is missing or damaged; return the folder."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"{folder}: cannot create the {what} cache folder ({e.strerror or e}); pass "
                           f"cache_dir= or set GRAPHCNN_DATA to a writable folder") from None
    for fname, expected_md5 in checksums.items():
        dest = os.path.join(folder, fname)
        if md5_of_file(dest) != expected_md5:  # missing, partial or damaged: fetch it again
            download_one(fname, expected_md5, dest, mirrors=mirrors, fetch=fetch, what=what,
                         offline_hint=offline_hint)
    return folder


def cache_folder(dataset: str, cache_dir=None) -> str:
    """Where a downloaded dataset lives: `cache_dir`, else $GRAPHCNN_DATA/DATASET, else
    ~/.cache/graphcnn/DATASET (one subfolder each: Fashion-MNIST's files have MNIST's names)."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    root = os.environ.get("GRAPHCNN_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "graphcnn")
    return os.path.join(root, dataset)
