"""Minimal grayscale PNG reading/writing with zlib (for `graphcnn run` on PNG digits)."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from .idx import DatasetError

SIG = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def read_png_gray(path) -> np.ndarray:
    """8-bit gray / gray+alpha / RGB / RGBA, non-interlaced PNG -> uint8 (H, W) gray (ITU-R 601 luma)."""
    path = os.fspath(path)
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    if not data.startswith(SIG):
        raise DatasetError(f"{path}: not a PNG file")
    pos, idat, hdr = 8, b"", None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if len(chunk) != length or pos + 12 + length > len(data):
            raise DatasetError(f"{path}: truncated PNG chunk {kind!r}")
        crc = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        if zlib.crc32(kind + chunk) != crc:
            raise DatasetError(f"{path}: CRC mismatch in chunk {kind!r}")
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
        pos += 12 + length
    if hdr is None:
        raise DatasetError(f"{path}: PNG has no IHDR")
    w, h, depth, ctype, _, _, interlace = hdr
    if depth != 8 or ctype not in CHANNELS:
        raise DatasetError(f"{path}: unsupported PNG (bit depth {depth}, color type {ctype}); use 8-bit gray or RGB")
    if interlace:
        raise DatasetError(f"{path}: interlaced PNGs are not supported")
    if w * h > (1 << 26):
        raise DatasetError(f"{path}: image too large ({w}x{h})")
    ch = CHANNELS[ctype]
    stride = w * ch
    try:
        raw = zlib.decompressobj().decompress(idat, h * (stride + 1) + 1)
    except zlib.error as e:
        raise DatasetError(f"{path}: corrupt PNG data: {e}") from None
    if len(raw) < h * (stride + 1):
        raise DatasetError(f"{path}: truncated PNG image data")
    img = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        ft = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if ft == 0:
            cur = line
        elif ft == 2:
            cur = (line + prev) & 255
        elif ft in (1, 3, 4):
            cur = np.zeros(stride, np.int32)
            for i in range(stride):
                a = cur[i - ch] if i >= ch else 0
                c = prev[i - ch] if i >= ch else 0
                pred = a if ft == 1 else ((a + prev[i]) >> 1 if ft == 3 else _paeth(a, prev[i], c))
                cur[i] = (line[i] + pred) & 255
        else:
            raise DatasetError(f"{path}: bad PNG filter type {ft} on row {y}")
        img[y] = cur
        prev = cur
    px = img.reshape(h, w, ch).astype(np.float32)
    if ch >= 3:
        gray = 0.299 * px[..., 0] + 0.587 * px[..., 1] + 0.114 * px[..., 2]
    else:
        gray = px[..., 0]
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def write_png_gray(path, array):
    """Write a uint8 (H, W) array as an 8-bit grayscale PNG (filter 0)."""
    a = np.asarray(array, np.uint8)
    if a.ndim != 2:
        raise DatasetError(f"{path}: expected a 2-D image, got shape {a.shape}")
    h, w = a.shape
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    png = SIG + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)
