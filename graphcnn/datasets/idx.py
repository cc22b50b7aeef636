"""MNIST's IDX file format: read (gzipped or raw) and write (atomically).

An IDX file is: two zero bytes, a type code, the number of dimensions n, then n big-endian uint32
sizes, then the data in big-endian row-major order. See http://yann.lecun.com/exdb/mnist/.
Reading never allocates more than the file can actually hold: header sizes are checked against the
real byte count (or, for gzip, against the decompressed stream read with a bound) first.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from ..atomic_file import write_file_atomically  # noqa: F401  (re-exported)
from ..errors import GraphcnnError

# type code -> on-disk dtype (IDX is big-endian)
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# native-order dtype -> type code, for writing
IDX_CODES = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}

GZIP_MAGIC = b"\x1f\x8b"
# gzip input is decompressed this many bytes at a time, so a lying header costs no memory
GZIP_CHUNK = 1 << 20


class DatasetError(GraphcnnError):
    """A data file is missing, truncated or malformed. The message names the file and the problem.

    A ValueError (through GraphcnnError), so `except ValueError` keeps working."""


def _header_layout(path, head: bytes):
    """Parse and check the first 4 bytes: -> (dtype, ndim). `head` may be shorter than 4 bytes."""
    if len(head) < 4:
        raise DatasetError(f"{path}: truncated IDX header: {len(head)} bytes, need at least 4")
    if head[0] != 0 or head[1] != 0:
        raise DatasetError(f"{path}: bad magic number 0x{head[:4].hex()} (an IDX file starts with two "
                           "zero bytes); not an IDX file")
    code, ndim = head[2], head[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DatasetError(f"{path}: unknown IDX data type code 0x{code:02X} (known: {known})")
    return IDX_DTYPES[code], ndim


def _dims(path, head: bytes, ndim: int):
    if len(head) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header: {ndim} dimensions need {4 + 4 * ndim} bytes, "
                           f"the file holds {len(head)}")
    return tuple(int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))


def _size_error(path, dims, dtype, want: int, have: int, more: bool = False) -> DatasetError:
    what = "truncated" if have < want else "extra bytes after the data"
    have_s = f"more than {have - 1}" if more else str(have)
    return DatasetError(f"{path}: header says shape {dims} of {dtype.name} ({want} data bytes) but the file "
                        f"holds {have_s} data bytes ({what})")


def _read_gzip(path, file):
    """Decompress an IDX stream, reading at most header-implied size + 1 bytes -> (dtype, dims, body)."""
    try:
        with gzip.GzipFile(fileobj=file, mode="rb") as stream:
            head = stream.read(4)
            dtype, ndim = _header_layout(path, head)
            head += stream.read(4 * ndim)
            dims = _dims(path, head, ndim)
            want = math.prod(dims) * dtype.itemsize
            # grow in chunks: the buffer only ever holds bytes the stream really produced
            body = bytearray()
            while len(body) <= want:
                chunk = stream.read(min(GZIP_CHUNK, want + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
    except (OSError, EOFError, zlib.error) as e:
        # BadGzipFile (an OSError), EOFError on a cut stream, zlib.error on corrupt deflate data / CRC
        raise DatasetError(f"{path}: corrupt or truncated gzip data: {e}") from None
    if len(body) != want:
        raise _size_error(path, dims, dtype, want, len(body), more=len(body) > want)
    return dtype, dims, body


def _read_raw(path, raw: bytearray):
    dtype, ndim = _header_layout(path, raw[:4])
    dims = _dims(path, raw[:4 + 4 * ndim], ndim)
    want = math.prod(dims) * dtype.itemsize
    have = len(raw) - 4 - 4 * ndim
    if have != want:
        raise _size_error(path, dims, dtype, want, have)
    return dtype, dims, memoryview(raw)[4 + 4 * ndim:]


def _read_all(f) -> bytearray:
    """The whole file as a bytearray (so the array built on it is writable without another copy)."""
    size = os.fstat(f.fileno()).st_size
    buf = bytearray(size)
    got = f.readinto(buf)
    if got < size:  # the file shrank while we read it
        del buf[got:]
    rest = f.read()  # non-regular files (pipes) report size 0; a growing file has more
    return buf + rest if rest else buf


def read_idx(path) -> np.ndarray:
    """Read an IDX file into a writable native-byte-order array of the header's shape and dtype.

    `path`: str or PathLike. The file may be gzip-compressed (detected by its magic bytes, whatever its
    name). Raises DatasetError naming the file for: missing/unreadable file, truncated header, bad magic,
    unknown type code, data shorter or longer than the header says, corrupt gzip.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"read_idx: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if f.read(2) == GZIP_MAGIC:
                f.seek(0)
                dtype, dims, body = _read_gzip(path, f)
            else:
                f.seek(0)
                dtype, dims, body = _read_raw(path, _read_all(f))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, not an IDX file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror or e}") from None
    arr = np.frombuffer(body, dtype).reshape(dims)
    if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("="))  # native order for fast arithmetic downstream
    return arr


def encode_idx(array) -> bytes:
    """The uncompressed IDX bytes of `array` (uint8, int8, int16, int32, float32 or float64)."""
    a = np.asarray(array)
    code = IDX_CODES.get(a.dtype.newbyteorder("=")) if a.dtype.kind in "uif" else None
    if code is None:
        supported = ", ".join(dt.newbyteorder("=").name for dt in IDX_DTYPES.values())
        raise TypeError(f"write_idx: array has dtype {a.dtype}, which IDX cannot store (supported: "
                        f"{supported}); convert it first, e.g. array.astype(np.int32)")
    if a.ndim > 255:
        raise ValueError(f"write_idx: array has {a.ndim} dimensions; IDX stores at most 255")
    if any(d >= 1 << 32 for d in a.shape):
        raise ValueError(f"write_idx: array shape {a.shape} has a dimension >= 2**32, which IDX cannot store")
    header = bytes([0, 0, code, a.ndim]) + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return header + np.ascontiguousarray(a, IDX_DTYPES[code]).tobytes()


def write_idx(path, array, compress=None) -> None:
    """Write `array` as an IDX file, atomically (temp file + os.replace).

    `compress`: True -> gzip, False -> raw, None -> gzip iff `path` ends in ".gz".
    Raises TypeError for a dtype IDX cannot hold (IDX has no int64: cast to int32 first).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"write_idx: path must be a str or os.PathLike, got {type(path).__name__}")
    if compress not in (None, True, False):
        raise TypeError(f"write_idx: compress must be None, True or False, got {compress!r}")
    path = os.fspath(path)
    data = encode_idx(array)
    if compress or (compress is None and path.lower().endswith(".gz")):
        data = gzip.compress(data, compresslevel=6, mtime=0)  # mtime=0: same array -> same bytes
    write_file_atomically(path, data)


__all__ = ["DatasetError", "read_idx", "write_idx", "encode_idx", "write_file_atomically", "IDX_DTYPES"]
