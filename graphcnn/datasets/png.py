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
# Documented decoding bounds (refused beyond them, before inflating): at most 2**26 pixels (8192 x 8192,
# 256 MiB of RGBA), and for images using the Average/Paeth filters width + height <= 2**16, the number of
# vectorized decoding steps those filters need (see _unfilter).
MAX_PIXELS = 1 << 26
MAX_WAVEFRONT_STEPS = (1 << 16) - 1


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
    if width * height > MAX_PIXELS:
        raise DatasetError(f"{path}: PNG of {width}x{height} pixels is over this reader's limit of {MAX_PIXELS} "
                           f"pixels; downscale it first")
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


def _unfilter(path: str, raw: bytes, height: int, width: int, bpp: int) -> np.ndarray:
    """Undo the per-row PNG filters -> uint8 (height, width * bpp). `bpp` = bytes per pixel.

    Cost is a fixed number of NumPy calls per image (None/Sub/Up only) or per anti-diagonal (with
    Average/Paeth rows), never a Python step per byte: a byte depends on its left, upper and upper-left
    neighbours, so all pixels on one anti-diagonal (row + column = d) are independent and decode together;
    that is height + width - 1 vectorized steps (see MAX_WAVEFRONT_STEPS)."""
    rows = np.frombuffer(raw, np.uint8).reshape(height, width * bpp + 1)
    kinds, data = rows[:, 0], rows[:, 1:].reshape(height, width, bpp)
    bad = np.flatnonzero(kinds > 4)
    if bad.size:
        raise DatasetError(f"{path}: corrupt PNG: unknown filter type {kinds[bad[0]]} on row {bad[0]}")
    if (kinds >= 3).any():
        if height + width - 1 > MAX_WAVEFRONT_STEPS:
            raise DatasetError(f"{path}: PNG of {width}x{height} pixels uses Average/Paeth filters; this reader "
                               f"decodes those only when width + height <= {MAX_WAVEFRONT_STEPS + 1}")
        return _unfilter_wavefront(kinds, data).reshape(height, width * bpp)
    return _unfilter_none_sub_up(kinds, data).reshape(height, width * bpp)


def _unfilter_none_sub_up(kinds, data) -> np.ndarray:
    """Rows filtered with None (0), Sub (1) or Up (2) only, fully vectorized: a None or Sub row does not
    depend on the row above (Sub is a running sum along the row), an Up row adds the row above, so
    each column is a running sum restarted at every None/Sub row. uint8 arithmetic wraps mod 256, which
    makes differences of running sums exact."""
    height = len(kinds)
    own = data.copy()
    sub = kinds == 1
    own[sub] = np.cumsum(data[sub], axis=1, dtype=np.uint8)
    if not (kinds == 2).any():
        return own
    total = np.zeros((height + 1,) + data.shape[1:], np.uint8)       # total[y + 1] = own[0] + ... + own[y]
    np.cumsum(own, axis=0, dtype=np.uint8, out=total[1:])
    del own
    restart = np.maximum.accumulate(np.where(kinds != 2, np.arange(height), 0))   # last None/Sub row
    out = total[1:]
    out -= total[restart]
    return out


def _unfilter_wavefront(kinds, data) -> np.ndarray:
    """Any filter mix, decoded one anti-diagonal d = y + x at a time: pixel (y, x) needs its left (y, x-1)
    and upper (y-1, x) neighbours, both on diagonal d-1, and its upper-left (y-1, x-1) on d-2. The last two
    decoded diagonals are kept indexed by row (slot y+1; slot 0 and never-written slots are the spec's
    zero "outside" bytes), so the neighbours are slices; only the filtered input and the result are
    gathered/scattered."""
    height, width, bpp = data.shape
    out = np.empty((height * width, bpp), np.uint8)
    src = data.reshape(-1, bpp)
    row_start = np.arange(height) * (width - 1)          # + d = flat index of (y, d - y)
    prev2 = np.zeros((height + 1, bpp), np.int16)        # diagonal d-2
    prev1 = np.zeros((height + 1, bpp), np.int16)        # diagonal d-1
    zero = np.int16(0)
    for d in range(height + width - 1):
        lo, hi = max(0, d - width + 1), min(height - 1, d) + 1
        a = prev1[lo + 1:hi + 1]                           # left
        b = prev1[lo:hi]                                   # up
        c = prev2[lo:hi]                                   # up-left
        bc, ac = b - c, a - c
        pa, pb, pc = np.abs(bc), np.abs(ac), np.abs(bc + ac)   # |p - a|, |p - b|, |p - c| for p = a + b - c
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.choose(kinds[lo:hi, None], [zero, a, b, (a + b) >> 1, paeth])
        at = row_start[lo:hi] + d
        cur = (src[at] + pred) & 0xFF                     # int16 sum; & 0xFF = mod 256, as the spec wants
        out[at] = cur
        prev2, prev1 = prev1, prev2
        prev1[lo + 1:hi + 1] = cur
        if lo > 0:      # row lo-1 left this diagonal at its right edge: (lo-1, width) is outside, reads as 0
            prev1[lo] = 0
    return out.reshape(height, width, bpp)


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
    pixels = _unfilter(path, raw, height, width, channels).reshape(height, width, channels)
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
