"""Minimal dependency-free PNG support (zlib only), so `graphcnn run` can read drawn digits.

Reads 8-bit grayscale, gray+alpha, RGB and RGBA non-interlaced PNGs into a uint8 (H, W) gray image:
color becomes ITU-R BT.601 luma, round(0.299 R + 0.587 G + 0.114 B); alpha is dropped (not composited).
Writes 8-bit grayscale PNGs. Layout per the PNG specification (https://www.w3.org/TR/png/).
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from .idx import DatasetError, write_file_atomically

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# color type -> samples per pixel, for the color types we decode
CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}
COLOR_TYPE_NAMES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "gray+alpha", 6: "RGBA"}
MAX_DIMENSION = (1 << 31) - 1  # the PNG spec's limit for width, height and chunk length
DEFLATE_MAX_RATIO = 1032  # deflate's largest possible expansion (258-byte matches coded in 2 bits)


def _read_chunks(path: str, data: bytes):
    """-> (IHDR fields, concatenated IDAT bytes), checking order, lengths and every CRC."""
    pos, header, idat, ended = len(PNG_SIGNATURE), None, [], False
    while pos < len(data):
        if pos + 8 > len(data):
            raise DatasetError(f"{path}: truncated PNG: chunk header cut off at byte {pos}")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        name = kind.decode("latin-1")
        if length > MAX_DIMENSION:
            raise DatasetError(f"{path}: corrupt PNG: chunk {name!r} claims length {length}")
        end = pos + 12 + length
        if end > len(data):
            raise DatasetError(f"{path}: truncated PNG: chunk {name!r} needs {length} bytes + CRC, the file "
                               f"ends {end - len(data)} bytes early")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:end])
        if zlib.crc32(kind + body) != crc:
            raise DatasetError(f"{path}: CRC mismatch in PNG chunk {name!r} at byte {pos} (file corrupt)")
        if header is None and kind != b"IHDR":
            raise DatasetError(f"{path}: corrupt PNG: first chunk is {name!r}, must be 'IHDR'")
        if kind == b"IHDR":
            if header is not None:
                raise DatasetError(f"{path}: corrupt PNG: more than one IHDR chunk")
            if length != 13:
                raise DatasetError(f"{path}: corrupt PNG: IHDR is {length} bytes, must be 13")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            ended = True
            break
        elif kind != b"PLTE" and not kind[0] & 0x20:
            # bit 5 of the first byte clear = critical chunk: the spec says don't guess its meaning
            raise DatasetError(f"{path}: unsupported critical PNG chunk {name!r}")
        pos = end
    if header is None:
        raise DatasetError(f"{path}: truncated PNG: no IHDR chunk")
    if not ended:
        raise DatasetError(f"{path}: truncated PNG: no IEND chunk (file cut short?)")
    if not idat:
        raise DatasetError(f"{path}: corrupt PNG: no IDAT (image data) chunk")
    return header, b"".join(idat)


def _check_header(path: str, header) -> tuple[int, int, int]:
    """-> (width, height, channels) for a PNG this module can decode; else a DatasetError saying why."""
    width, height, depth, color_type, compression, filter_method, interlace = header
    if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
        raise DatasetError(f"{path}: corrupt PNG: size {width}x{height}")
    if color_type not in CHANNELS:
        kind = COLOR_TYPE_NAMES.get(color_type, f"invalid color type {color_type}")
        raise DatasetError(f"{path}: unsupported PNG color type {color_type} ({kind}); supported: grayscale, "
                           "gray+alpha, RGB, RGBA")
    if depth != 8:
        raise DatasetError(f"{path}: unsupported PNG bit depth {depth}; only 8 bits per sample are supported "
                           "(re-save the image as 8-bit)")
    if compression != 0 or filter_method != 0:
        raise DatasetError(f"{path}: corrupt PNG: compression method {compression}, filter method "
                           f"{filter_method} (both must be 0)")
    if interlace == 1:
        raise DatasetError(f"{path}: interlaced (Adam7) PNGs are not supported; re-save without interlacing")
    if interlace != 0:
        raise DatasetError(f"{path}: corrupt PNG: interlace method {interlace}")
    return width, height, CHANNELS[color_type]


def _inflate_exact(path: str, idat: bytes, expected: int) -> bytes:
    """Decompress the IDAT stream, refusing to produce more than `expected` + 1 bytes."""
    if expected > DEFLATE_MAX_RATIO * len(idat) + 1024:
        # deflate cannot expand data more than ~1032x, so this IDAT cannot hold the image IHDR claims
        raise DatasetError(f"{path}: truncated PNG image data: the image needs {expected} bytes but "
                           f"{len(idat)} compressed bytes can hold at most ~{DEFLATE_MAX_RATIO * len(idat)}")
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(idat, expected + 1)
        if len(raw) == expected and not inflater.eof:
            raw += inflater.decompress(inflater.unconsumed_tail, 1)  # more data, or the stream's end?
    except zlib.error as e:
        raise DatasetError(f"{path}: corrupt PNG image data: {e}") from None
    if len(raw) > expected:
        raise DatasetError(f"{path}: corrupt PNG: image data longer than the {expected} bytes IHDR implies")
    if len(raw) < expected or not inflater.eof:
        raise DatasetError(f"{path}: truncated PNG image data: got {len(raw)} of {expected} bytes"
                           f"{'' if inflater.eof else ' and the zlib stream is cut off'}")
    return raw


def _paeth(a: int, b: int, c: int) -> int:
    """The PNG Paeth predictor: whichever of left, up, up-left is closest to left + up - up-left."""
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(path: str, raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo the per-row PNG filters -> uint8 (height, stride). `bpp` = bytes per pixel."""
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    out = np.empty((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:]
        if kind == 0:  # None
            cur = line
        elif kind == 1:  # Sub: running sum per channel, mod 256
            cur = line.reshape(-1, bpp).cumsum(axis=0, dtype=np.uint8).reshape(stride)
        elif kind == 2:  # Up
            cur = line + prev  # uint8 arithmetic wraps mod 256, as the spec wants
        elif kind in (3, 4):  # Average, Paeth: each byte depends on the one just decoded
            up, cur_b, line_b = prev.tolist(), bytearray(stride), line.tolist()
            for i in range(stride):
                left = cur_b[i - bpp] if i >= bpp else 0
                if kind == 3:
                    pred = (left + up[i]) >> 1
                else:
                    pred = _paeth(left, up[i], up[i - bpp] if i >= bpp else 0)
                cur_b[i] = (line_b[i] + pred) & 0xFF
            cur = np.frombuffer(cur_b, np.uint8)
        else:
            raise DatasetError(f"{path}: corrupt PNG: unknown filter type {kind} on row {y}")
        out[y] = cur
        prev = out[y]
    return out


def read_png_gray(path) -> np.ndarray:
    """Read an 8-bit non-interlaced grayscale, gray+alpha, RGB or RGBA PNG as a uint8 (H, W) gray image.

    Color -> round(0.299 R + 0.587 G + 0.114 B) (ITU-R BT.601 luma); alpha is dropped. Raises
    DatasetError naming the file for: missing file, not a PNG, truncated file, CRC mismatch, interlaced,
    unsupported bit depth or color type, corrupt image data.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"read_png_gray: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror or e}") from None
    if not data.startswith(PNG_SIGNATURE):
        if PNG_SIGNATURE.startswith(data):
            raise DatasetError(f"{path}: truncated PNG: {len(data)} bytes, shorter than the PNG signature")
        raise DatasetError(f"{path}: not a PNG file (the PNG signature is missing)")
    header, idat = _read_chunks(path, data)
    width, height, channels = _check_header(path, header)
    stride = width * channels
    raw = _inflate_exact(path, idat, height * (stride + 1))
    pixels = _unfilter(path, raw, height, stride, channels).reshape(height, width, channels)
    if channels <= 2:  # gray or gray+alpha
        return np.ascontiguousarray(pixels[:, :, 0])
    rgb = pixels[:, :, :3].astype(np.int32)
    # integer form of round-half-up(0.299 R + 0.587 G + 0.114 B): exact, and white stays 255
    luma = (299 * rgb[:, :, 0] + 587 * rgb[:, :, 1] + 114 * rgb[:, :, 2] + 500) // 1000
    return luma.astype(np.uint8)


def _chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC-32 of type + body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png_gray(array) -> bytes:
    """The bytes of an 8-bit grayscale PNG of a 2-D integer array with values 0..255."""
    a = np.asarray(array)
    if a.ndim != 2:
        raise ValueError(f"write_png_gray: array must be 2-D (H, W), got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"write_png_gray: array must be at least 1x1, got shape {a.shape}")
    if a.dtype.kind not in "ui":
        raise TypeError(f"write_png_gray: array must hold integers 0..255 (uint8), got dtype {a.dtype}; "
                        "scale floats yourself, e.g. np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)")
    if a.dtype != np.uint8 and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"write_png_gray: pixel values must lie in 0..255, got {a.min()}..{a.max()}")
    height, width = a.shape
    if height > MAX_DIMENSION or width > MAX_DIMENSION:
        raise ValueError(f"write_png_gray: shape {a.shape} exceeds PNG's 2**31-1 limit")
    # each row: filter byte 0 (None) followed by the pixels
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 0
    rows[:, 1:] = a
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + _chunk(b"IEND", b""))


def write_png_gray(path, array) -> None:
    """Write a 2-D uint8 (or integer 0..255) array as an 8-bit grayscale PNG, atomically."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"write_png_gray: path must be a str or os.PathLike, got {type(path).__name__}")
    write_file_atomically(path, encode_png_gray(array))


__all__ = ["read_png_gray", "write_png_gray", "encode_png_gray"]
