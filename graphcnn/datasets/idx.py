"""MNIST's IDX file format: read (gzipped or raw) and write (atomically)."""
from __future__ import annotations

import gzip
import os
import tempfile
import zlib

import numpy as np

DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
CODES = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items()}


class DatasetError(ValueError):
    """A data file is missing, truncated or malformed. The message names the file."""


def _decompress(raw: bytes, path) -> bytes:
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        head = d.decompress(raw, 4 + 4 * 255)
        if len(head) < 4:
            raise DatasetError(f"{path}: truncated IDX header (gzip stream too short)")
        nd = head[3]
        head += d.decompress(d.unconsumed_tail, 4 + 4 * nd - len(head)) if len(head) < 4 + 4 * nd else b""
        dims = [int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)] if len(head) >= 4 + 4 * nd else None
        if dims is None:
            raise DatasetError(f"{path}: truncated IDX header")
        code = head[2]
        item = DTYPES[code].itemsize if code in DTYPES else 1
        want = 4 + 4 * nd + int(np.prod(dims, dtype=object)) * item
        if want > 64 * len(raw) + 4096 or want > (8 << 30):
            raise DatasetError(f"{path}: header claims {want} bytes, far more than the file can hold")
        body = head + d.decompress(d.unconsumed_tail, want + 1 - len(head))
        if not d.eof and len(body) <= want:
            body += d.flush()
        return body
    except (zlib.error, EOFError, OSError) as e:
        raise DatasetError(f"{path}: corrupt gzip data: {e}") from None


def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, detected by its magic bytes)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    data = _decompress(raw, path)
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: bad magic number {data[:4].hex()} (not an IDX file)")
    code, nd = data[2], data[3]
    if code not in DTYPES:
        raise DatasetError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if nd == 0 or len(data) < 4 + 4 * nd:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(nd))
    dt = DTYPES[code]
    want = int(np.prod(dims, dtype=object)) * dt.itemsize
    have = len(data) - 4 - 4 * nd
    if have != want:
        raise DatasetError(f"{path}: header says {dims} ({want} data bytes) but the file holds {have}"
                           f"{' (truncated)' if have < want else ' (extra bytes)'}")
    arr = np.frombuffer(data, dt, offset=4 + 4 * nd).reshape(dims)
    return arr.astype(dt.newbyteorder("="))


def write_idx(path, array, compress=None):
    """Write an IDX file atomically; gzip when compress is True or the name ends in .gz."""
    path = os.fspath(path)
    a = np.asarray(array)
    code = CODES.get(a.dtype.newbyteorder("="))
    if code is None:
        raise DatasetError(f"{path}: cannot store dtype {a.dtype} in IDX")
    body = bytes([0, 0, code, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + \
        a.astype(DTYPES[code]).tobytes()
    if compress or (compress is None and path.endswith(".gz")):
        body = gzip.compress(body, mtime=0)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
