"""Dataset layer: IDX reading/writing, MNIST loading (bundled, folders, .npz, cached download) and PNG.

No test touches the network: downloads are served from temp folders through file:// mirrors, and an
autouse fixture makes any other URL fail the test. References are built independently here (IDX bytes
packed with struct, PNG scanlines filtered by a naive encoder, luma with exact fractions).
"""
import gzip
import hashlib
import os
import socket
import struct
import tracemalloc
import urllib.error
import urllib.request
import zlib
from fractions import Fraction

import numpy as np
import pytest

from graphcnn.datasets import DatasetError, mnist, read_idx, write_idx
from graphcnn.datasets.png import read_png_gray, write_png_gray
from graphcnn.errors import GraphcnnError

BUNDLED_CLASS_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Only file:// URLs may be opened; anything else is a test bug."""
    real_urlopen = urllib.request.urlopen

    def guarded(url, *args, **kwargs):
        target = url if isinstance(url, str) else url.full_url
        if not target.startswith("file:"):
            raise AssertionError(f"test tried to open a network URL: {target}")
        return real_urlopen(url, *args, **kwargs)
    monkeypatch.setattr(urllib.request, "urlopen", guarded)


# -- independent IDX encoder -----------------------------------------------------------------------
STRUCT_CODES = {np.uint8: (0x08, "B"), np.int8: (0x09, "b"), np.int16: (0x0B, "h"), np.int32: (0x0C, "i"),
                np.float32: (0x0D, "f"), np.float64: (0x0E, "d")}


def idx_bytes(array):
    """IDX bytes built element by element with struct (big-endian), independent of write_idx."""
    code, fmt = STRUCT_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + b"".join(struct.pack(">" + fmt, v) for v in array.ravel().tolist())


def write_bytes(path, data):
    path.write_bytes(data)
    return path


# -- bundled subset --------------------------------------------------------------------------------
def test_bundled_subset_shapes_dtypes_and_class_counts():
    (xtr, ytr), (xte, yte) = mnist.load_data()
    assert xtr.shape == (8000, 28, 28) and ytr.shape == (8000,)
    assert xte.shape == (2000, 28, 28) and yte.shape == (2000,)
    for a in (xtr, ytr, xte, yte):
        assert a.dtype == np.uint8 and a.flags.writeable
    train_counts = np.bincount(ytr, minlength=10)
    test_counts = np.bincount(yte, minlength=10)
    assert len(train_counts) == 10 and len(test_counts) == 10  # labels are 0..9
    assert train_counts.sum() == 8000 and test_counts.sum() == 2000
    assert (train_counts + test_counts).tolist() == BUNDLED_CLASS_COUNTS
    assert sum(BUNDLED_CLASS_COUNTS) == 10000
    for x in (xtr, xte):
        assert x.min() == 0 and x.max() == 255
        # real digits: mostly background, some ink in every image
        assert 0.7 < np.mean(x == 0) < 0.9
        assert (x.reshape(len(x), -1).max(axis=1) > 128).all()


def test_bundled_path_and_files_match_read_idx():
    folder = mnist.bundled_path()
    assert sorted(f for f in os.listdir(folder) if f.endswith(".gz")) == sorted(mnist.MD5)
    (xtr, ytr), (xte, yte) = mnist.load_data()
    assert np.array_equal(read_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz")), xte)
    # the bundled .gz decompresses to exactly the bytes our independent encoder gives for the array
    with gzip.open(os.path.join(folder, "train-labels-idx1-ubyte.gz")) as f:
        assert f.read() == idx_bytes(ytr)


def test_official_md5_table():
    assert mnist.MD5 == {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    assert mnist.MIRRORS[:2] == ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                                 "https://storage.googleapis.com/cvdf-datasets/mnist/"]


# -- IDX round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4), (2, 1, 3, 2), (0, 3)])
def test_idx_round_trip_matches_struct_encoding(tmp_path, dtype, shape):
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info:
        a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        a = (rng.standard_normal(shape) * 1e3).astype(dtype)
    expected = idx_bytes(a)
    write_idx(tmp_path / "a.idx", a)
    assert (tmp_path / "a.idx").read_bytes() == expected  # byte-exact big-endian layout
    write_idx(tmp_path / "a.idx.gz", a)
    assert gzip.decompress((tmp_path / "a.idx.gz").read_bytes()) == expected
    for name in ("a.idx", "a.idx.gz"):
        b = read_idx(tmp_path / name)
        assert b.dtype == np.dtype(dtype) and b.dtype.isnative and b.shape == shape
        assert np.array_equal(a, b)
    # reading the independently encoded bytes gives the same array
    assert np.array_equal(read_idx(write_bytes(tmp_path / "s.idx", expected)), a)


def test_gzip_detected_by_magic_bytes_not_name(tmp_path):
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 12
    write_bytes(tmp_path / "looks-raw", gzip.compress(idx_bytes(a)))
    write_bytes(tmp_path / "looks-gzipped.gz", idx_bytes(a))
    assert np.array_equal(read_idx(tmp_path / "looks-raw"), a)
    assert np.array_equal(read_idx(str(tmp_path / "looks-gzipped.gz")), a)


def test_compress_flag_overrides_the_name(tmp_path):
    a = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "plain", a, compress=True)
    write_idx(tmp_path / "named.gz", a, compress=False)
    assert (tmp_path / "plain").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "named.gz").read_bytes() == idx_bytes(a)
    assert np.array_equal(read_idx(tmp_path / "plain"), a)


def test_multi_member_gzip_reads_like_gunzip(tmp_path):
    data = idx_bytes(np.arange(100, dtype=np.uint8).reshape(10, 10))
    write_bytes(tmp_path / "m.gz", gzip.compress(data[:37]) + gzip.compress(data[37:]))
    assert np.array_equal(read_idx(tmp_path / "m.gz"), np.arange(100, dtype=np.uint8).reshape(10, 10))


def test_read_idx_result_is_writable_and_independent(tmp_path):
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    write_idx(tmp_path / "a.idx", a)
    b = read_idx(tmp_path / "a.idx")
    b[0, 0] = 99  # must not raise (read-only buffers would)
    assert read_idx(tmp_path / "a.idx")[0, 0] == 0


def test_write_idx_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.idx"
    write_idx(target, np.zeros(4, np.uint8))
    before = target.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        write_idx(target, np.ones(100, np.uint8))
    monkeypatch.undo()
    assert target.read_bytes() == before  # old file untouched
    assert os.listdir(tmp_path) == ["x.idx"]  # temp file cleaned up


def test_write_idx_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="int64.*int32"):
        write_idx(tmp_path / "a.idx", np.arange(3, dtype=np.int64))
    with pytest.raises(TypeError, match="dtype bool"):
        write_idx(tmp_path / "a.idx", np.ones(3, bool))
    with pytest.raises(TypeError, match="compress"):
        write_idx(tmp_path / "a.idx", np.ones(3, np.uint8), compress="yes")
    with pytest.raises(TypeError, match="path"):
        write_idx(3, np.ones(3, np.uint8))
    assert os.listdir(tmp_path) == []


# -- IDX errors ------------------------------------------------------------------------------------
HEADER_2X3_U8 = b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x03"
BAD_IDX = {
    "empty file": (b"", "truncated IDX header"),
    "three bytes": (b"\x00\x00\x08", "truncated IDX header"),
    "dims cut off": (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00", "truncated IDX header"),
    "bad magic": (b"\x12\x34\x08\x01\x00\x00\x00\x02\x01\x02", "bad magic"),
    "unknown dtype": (b"\x00\x00\x07\x01\x00\x00\x00\x02\x01\x02", "unknown IDX data type code 0x07"),
    "data too short": (HEADER_2X3_U8 + b"\x01" * 5, r"6 data bytes.*holds 5.*truncated"),
    "data too long": (HEADER_2X3_U8 + b"\x01" * 7, r"6 data bytes.*extra bytes"),
    "huge header, tiny file": (b"\x00\x00\x0e\x03" + b"\xff" * 12, r"holds 0 data bytes.*truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDX))
@pytest.mark.parametrize("compressed", [False, True])
def test_bad_idx_files_raise_dataset_error_naming_the_file(tmp_path, case, compressed):
    data, message = BAD_IDX[case]
    name = "bad.idx.gz" if compressed else "bad.idx"
    path = write_bytes(tmp_path / name, gzip.compress(data) if compressed else data)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=message) as err:
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value)
    assert peak < 4 << 20  # never allocates what the header merely claims


def test_gzip_stream_longer_than_header_is_refused_without_inflating_it(tmp_path):
    # header says 16 bytes; the stream holds 64 MiB of zeros (64 KiB compressed)
    path = write_bytes(tmp_path / "bomb.gz", gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x10" + bytes(64 << 20)))
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"more than 16 data bytes.*extra bytes"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_corrupt_and_truncated_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(5000, dtype=np.int32)))
    corrupt = bytearray(good)
    corrupt[len(good) // 2] ^= 0xFF
    for name, blob in (("corrupt.gz", bytes(corrupt)), ("cut.gz", good[:len(good) // 2]),
                       ("no-trailer.gz", good[:-8]), ("garbage-after.gz", good + b"garbage!")):
        path = write_bytes(tmp_path / name, blob)
        with pytest.raises(DatasetError, match="gzip") as err:
            read_idx(path)
        assert name in str(err.value)


def test_gzip_data_past_the_header_size_is_refused_at_a_member_boundary(tmp_path):
    data = idx_bytes(np.arange(10, dtype=np.uint8))
    path = write_bytes(tmp_path / "two.gz", gzip.compress(data) + gzip.compress(b"extra"))
    with pytest.raises(DatasetError, match=r"more than 10 data bytes.*extra bytes"):
        read_idx(path)


def test_gzip_crc_is_checked_on_streams_larger_than_one_read_chunk(tmp_path):
    from graphcnn.datasets import idx
    a = np.random.default_rng(0).integers(0, 256, (idx.GZIP_CHUNK * 3 // 2,), dtype=np.uint8)
    blob = gzip.compress(idx_bytes(a), compresslevel=1)
    assert np.array_equal(read_idx(write_bytes(tmp_path / "big.gz", blob)), a)
    with pytest.raises(DatasetError, match="gzip.*CRC"):
        read_idx(write_bytes(tmp_path / "badcrc.gz", flipped(blob, len(blob) - 6)))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DatasetError, match="no such file") as err:
        read_idx(tmp_path / "nope.idx")
    assert "nope.idx" in str(err.value)
    with pytest.raises(DatasetError, match="is a folder"):
        read_idx(tmp_path)
    with pytest.raises(TypeError, match="path"):
        read_idx(None)


def test_dataset_error_is_a_graphcnn_value_error():
    assert issubclass(DatasetError, GraphcnnError) and issubclass(DatasetError, ValueError)


# -- MNIST folders ---------------------------------------------------------------------------------
def make_mnist_folder(folder, n_train=6, n_test=3, h=28, w=28, gz=(False, True, False, True), seed=0):
    """A folder with the four standard files of random uint8 data; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (n_train, h, w), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8),
              rng.integers(0, 256, (n_test, h, w), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8)]
    os.makedirs(folder, exist_ok=True)
    for name, a, compressed in zip(mnist.FILE_NAMES, arrays, gz):
        data = idx_bytes(a)
        write_bytes(folder / (name + (".gz" if compressed else "")), gzip.compress(data) if compressed else data)
    return arrays


def test_folder_of_mixed_raw_and_gzipped_files(tmp_path):
    arrays = make_mnist_folder(tmp_path, h=20, w=17)  # any (N, H, W) is accepted
    (a, b), (c, d) = mnist.load_data(tmp_path)
    for got, want in zip((a, b, c, d), arrays):
        assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert mnist.load_data(str(tmp_path))[0][0].shape == (6, 20, 17)


def test_folder_with_dotted_names(tmp_path):
    arrays = make_mnist_folder(tmp_path)
    for path in tmp_path.iterdir():  # train-images-idx3-ubyte -> train-images.idx3-ubyte (Kaggle spelling)
        path.rename(tmp_path / path.name.replace("-idx", ".idx"))
    (x, _), (_, y) = mnist.load_data(tmp_path)
    assert np.array_equal(x, arrays[0]) and np.array_equal(y, arrays[3])


def test_folder_missing_files_are_named(tmp_path):
    make_mnist_folder(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        mnist.load_data(tmp_path)


def test_count_mismatch_names_both_files(tmp_path):
    make_mnist_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DatasetError) as err:
        mnist.load_data(tmp_path)
    msg = str(err.value)
    assert "train-images-idx3-ubyte has 6 images" in msg and "train-labels-idx1-ubyte has 5 labels" in msg


@pytest.mark.parametrize("name,array,message", [
    ("train-images-idx3-ubyte", np.zeros((6, 28), np.uint8), r"images of shape \(N, H, W\)"),
    ("train-images-idx3-ubyte", np.zeros((6, 28, 28), np.float32), "uint8 pixels"),
    ("t10k-labels-idx1-ubyte", np.zeros((3, 1), np.uint8), r"labels of shape \(N,\)"),
    ("t10k-labels-idx1-ubyte", np.zeros(3, np.int32), "uint8 labels"),
    ("t10k-images-idx3-ubyte", np.zeros((3, 14, 14), np.uint8), "28x28 images but .* 14x14"),
])
def test_folder_content_is_validated(tmp_path, name, array, message):
    make_mnist_folder(tmp_path, gz=(False,) * 4)
    write_idx(tmp_path / name, array)
    with pytest.raises(DatasetError, match=message) as err:
        mnist.load_data(tmp_path)
    assert name in str(err.value)


def test_npz_in_keras_layout(tmp_path):
    arrays = make_mnist_folder(tmp_path / "f")
    np.savez(tmp_path / "mnist.npz", x_train=arrays[0], y_train=arrays[1], x_test=arrays[2], y_test=arrays[3])
    (a, b), (c, d) = mnist.load_data(tmp_path / "mnist.npz")
    assert all(np.array_equal(g, w) for g, w in zip((a, b, c, d), arrays))
    np.savez(tmp_path / "partial.npz", x_train=arrays[0])
    with pytest.raises(DatasetError, match="missing arrays"):
        mnist.load_data(tmp_path / "partial.npz")


def test_load_data_argument_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        mnist.load_data(tmp_path / "absent")
    write_bytes(tmp_path / "one.idx", idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DatasetError, match="read_idx"):
        mnist.load_data(tmp_path / "one.idx")
    with pytest.raises(TypeError, match="path"):
        mnist.load_data(42)
    with pytest.raises(TypeError, match="download"):
        mnist.load_data(download="yes")
    with pytest.raises(ValueError, match="cannot be combined"):
        mnist.load_data(tmp_path, download=True)
    with pytest.raises(ValueError, match="cache_dir only applies"):
        mnist.load_data(cache_dir=tmp_path)


# -- downloading, served from file:// mirrors ------------------------------------------------------
@pytest.fixture
def served_mnist(tmp_path, monkeypatch):
    """A fake 'full MNIST' served from a folder; MD5 table patched to its checksums."""
    served = tmp_path / "served"
    arrays = make_mnist_folder(served, n_train=12, n_test=4, gz=(True,) * 4, seed=3)
    table = {n + ".gz": hashlib.md5((served / (n + ".gz")).read_bytes()).hexdigest() for n in mnist.FILE_NAMES}
    monkeypatch.setattr(mnist, "MD5", table)
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    # first mirror lacks the files (like a 404), the second serves them
    monkeypatch.setattr(mnist, "MIRRORS", [empty.as_uri() + "/", served.as_uri() + "/"])
    return served, arrays


def test_download_fills_the_cache_then_reads_offline(tmp_path, monkeypatch, served_mnist, capsys):
    _, arrays = served_mnist
    cache = tmp_path / "cache" / "mnist"
    (a, b), (c, d) = mnist.load_data("mnist", cache_dir=cache)
    assert all(np.array_equal(g, w) for g, w in zip((a, b, c, d), arrays))
    assert sorted(os.listdir(cache)) == sorted(mnist.MD5)  # no temp files left behind
    assert "downloading" in capsys.readouterr().err

    def no_fetch(url, timeout=None):
        raise AssertionError("cache hit expected")
    monkeypatch.setattr(mnist, "_fetch", no_fetch)
    (a2, _), _ = mnist.load_data(download=True, cache_dir=str(cache))
    assert np.array_equal(a2, arrays[0])


def test_download_uses_graphcnn_data_env(tmp_path, monkeypatch, served_mnist):
    monkeypatch.setenv("GRAPHCNN_DATA", str(tmp_path / "envcache"))
    assert mnist.default_cache_dir() == str(tmp_path / "envcache")
    mnist.load_data("mnist")
    assert sorted(os.listdir(tmp_path / "envcache")) == sorted(mnist.MD5)


def test_download_skips_a_mirror_with_bad_checksum(tmp_path, monkeypatch, served_mnist):
    served, arrays = served_mnist
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    for name in mnist.MD5:
        blob = bytearray((served / name).read_bytes())
        blob[-1] ^= 1
        write_bytes(bad / name, bytes(blob))
    monkeypatch.setattr(mnist, "MIRRORS", [bad.as_uri() + "/", served.as_uri() + "/"])
    (x, _), _ = mnist.load_data("mnist", cache_dir=tmp_path / "c")
    assert np.array_equal(x, arrays[0])
    for name, md5 in mnist.MD5.items():
        assert hashlib.md5((tmp_path / "c" / name).read_bytes()).hexdigest() == md5

    monkeypatch.setattr(mnist, "MIRRORS", [bad.as_uri() + "/"])
    with pytest.raises(DatasetError, match="checksum mismatch") as err:
        mnist.load_data("mnist", cache_dir=tmp_path / "c2")
    assert "path=" in str(err.value)
    assert os.listdir(tmp_path / "c2") == []  # nothing unverified was written


def test_damaged_cache_file_is_downloaded_again(tmp_path, served_mnist):
    _, arrays = served_mnist
    cache = tmp_path / "cache"
    mnist.load_data("mnist", cache_dir=cache)
    write_bytes(cache / "t10k-images-idx3-ubyte.gz", b"half a file")
    (_, _), (c, _) = mnist.load_data("mnist", cache_dir=cache)
    assert np.array_equal(c, arrays[2])


def test_network_unavailable_gives_a_clear_error(tmp_path, monkeypatch):
    def unreachable(url, timeout=None):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr(mnist, "_fetch", unreachable)
    with pytest.raises(DatasetError) as err:
        mnist.load_data("mnist", cache_dir=tmp_path)
    msg = str(err.value)
    assert "network seems unavailable" in msg and "path=DIR" in msg and "load_data()" in msg
    assert "ossci-datasets.s3.amazonaws.com" in msg and "storage.googleapis.com" in msg


def test_http_error_is_not_reported_as_network_down(tmp_path, monkeypatch):
    def not_found(url, timeout=None):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
    monkeypatch.setattr(mnist, "_fetch", not_found)
    with pytest.raises(DatasetError, match="every mirror failed.*404"):
        mnist.load_data(download=True, cache_dir=tmp_path)


# -- PNG: an independent naive encoder -------------------------------------------------------------
def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def filter_rows(pixels, filter_types):
    """PNG scanlines (filter byte + filtered bytes) for an 8-bit (H, W, C) image, one filter per row."""
    h, w, c = pixels.shape
    rows = pixels.reshape(h, w * c).astype(int).tolist()
    out = bytearray()
    for y, ft in enumerate(filter_types):
        cur, up = rows[y], rows[y - 1] if y else [0] * (w * c)
        out.append(ft)
        for i, x in enumerate(cur):
            a = cur[i - c] if i >= c else 0
            b = up[i]
            cc = up[i - c] if i >= c else 0
            pred = [0, a, b, (a + b) // 2, paeth(a, b, cc)][ft]
            out.append((x - pred) % 256)
    return bytes(out)


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def build_png(pixels, color_type, filter_types, depth=8, interlace=0, idat_parts=1, extra_chunks=()):
    h, w = pixels.shape[:2]
    stream = zlib.compress(filter_rows(pixels, filter_types))
    cut = np.linspace(0, len(stream), idat_parts + 1).astype(int)
    idats = b"".join(png_chunk(b"IDAT", stream[cut[i]:cut[i + 1]]) for i in range(idat_parts))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + b"".join(extra_chunks) + idats
            + png_chunk(b"IEND", b""))


def reference_gray(pixels):
    """Gray per ITU-R 601 with exact rational arithmetic, rounding halves up."""
    h, w, c = pixels.shape
    if c <= 2:
        return pixels[:, :, 0].copy()
    out = np.empty((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            r, g, b = (int(v) for v in pixels[y, x, :3])
            luma = Fraction(299, 1000) * r + Fraction(587, 1000) * g + Fraction(114, 1000) * b
            out[y, x] = int(luma + Fraction(1, 2))  # floor(luma + 1/2)
    return out


PNG_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}


@pytest.mark.parametrize("color_type", [0, 4, 2, 6])
@pytest.mark.parametrize("filters", ["0", "1", "2", "3", "4", "mixed"])
def test_png_decodes_each_filter_and_color_type(tmp_path, color_type, filters):
    rng = np.random.default_rng(color_type * 10 + len(filters))
    h, w = 7, 9
    pixels = rng.integers(0, 256, (h, w, PNG_CHANNELS[color_type]), dtype=np.uint8)
    pixels[0, :3] = 255  # some saturated and zero runs alongside random bytes
    pixels[1, :2] = 0
    types = [0, 1, 2, 3, 4, 4, 3] if filters == "mixed" else [int(filters)] * h
    text = png_chunk(b"tEXt", b"Comment\x00hand-built")
    path = write_bytes(tmp_path / "img.png", build_png(pixels, color_type, types, idat_parts=3,
                                                      extra_chunks=[text]))
    got = read_png_gray(path)
    assert got.dtype == np.uint8 and got.shape == (h, w)
    assert np.array_equal(got, reference_gray(pixels))


def test_png_luma_of_pure_colors(tmp_path):
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [1, 1, 1]]], np.uint8)
    path = write_bytes(tmp_path / "c.png", build_png(pixels, 2, [0]))
    # 0.299*255 = 76.245, 0.587*255 = 149.685, 0.114*255 = 29.07
    assert read_png_gray(path).tolist() == [[76, 150, 29, 255, 1]]


@pytest.mark.parametrize("shape", [(1, 1), (28, 28), (3, 300), (64, 5)])
def test_png_round_trip(tmp_path, shape):
    img = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    write_png_gray(tmp_path / "d.png", img)
    assert np.array_equal(read_png_gray(tmp_path / "d.png"), img)
    assert os.listdir(tmp_path) == ["d.png"]


def test_png_round_trip_of_a_real_digit(tmp_path):
    (x, _), _ = mnist.load_data()
    write_png_gray(tmp_path / "digit.png", x[0])
    assert np.array_equal(read_png_gray(tmp_path / "digit.png"), x[0])
    write_png_gray(tmp_path / "i64.png", x[1].astype(np.int64))  # integers 0..255 of any dtype
    assert np.array_equal(read_png_gray(tmp_path / "i64.png"), x[1])


def test_write_png_gray_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        write_png_gray(tmp_path / "a.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 1x1"):
        write_png_gray(tmp_path / "a.png", np.zeros((0, 3), np.uint8))
    with pytest.raises(TypeError, match="float32"):
        write_png_gray(tmp_path / "a.png", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="0..255.*-1..300"):
        write_png_gray(tmp_path / "a.png", np.array([[-1, 300]], np.int16))
    assert os.listdir(tmp_path) == []


def png_with_header(depth=8, color_type=0, interlace=0):
    return build_png(np.zeros((2, 2, PNG_CHANNELS.get(color_type, 1)), np.uint8), color_type, [0, 0],
                     depth=depth, interlace=interlace)


def with_idat_stream(stream, w=2, h=2):
    """A gray 8-bit PNG whose IDAT holds exactly `stream` (valid CRCs)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", stream)
            + png_chunk(b"IEND", b""))


def good_png():
    return build_png(np.arange(16, dtype=np.uint8).reshape(4, 4, 1), 0, [1, 2, 3, 4])


def flipped(data, index):
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


BAD_PNG = {
    "not a png": (b"GIF89a...", "not a PNG"),
    "cut signature": (good_png()[:5], "truncated PNG"),
    "cut in a chunk": (good_png()[:40], "truncated PNG"),
    "no IEND": (good_png()[:-12], "truncated PNG.*IEND"),
    "CRC mismatch": (flipped(good_png(), 45), "CRC mismatch"),
    "interlaced": (png_with_header(interlace=1), "interlaced"),
    "16-bit": (png_with_header(depth=16), "bit depth 16"),
    "4-bit": (png_with_header(depth=4), "bit depth 4"),
    "palette": (png_with_header(color_type=3), "color type 3 .palette"),
    "cut zlib stream": (with_idat_stream(zlib.compress(bytes(6))[:-6]), "truncated PNG image data"),
    "too little data": (with_idat_stream(zlib.compress(bytes(5))), "truncated PNG image data: got 5 of 6"),
    "too much data": (with_idat_stream(zlib.compress(bytes(7))), "longer than the 6 bytes"),
    "bad filter type": (with_idat_stream(zlib.compress(b"\x00\x01\x02\x07\x01\x02")), "filter type 7 on row 1"),
    "corrupt zlib": (with_idat_stream(b"\x78\x9c\xff\xff\xff\xff"), "corrupt PNG image data"),
    "huge IHDR, tiny IDAT": (with_idat_stream(zlib.compress(bytes(6)), w=2**20, h=2**5),
                             "truncated PNG image data: the image needs"),
}


@pytest.mark.parametrize("case", sorted(BAD_PNG))
def test_bad_png_files_raise_dataset_error_naming_the_file(tmp_path, case):
    data, message = BAD_PNG[case]
    path = write_bytes(tmp_path / "bad.png", data)
    with pytest.raises(DatasetError, match=message) as err:
        read_png_gray(path)
    assert str(path) in str(err.value)


def test_png_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_png_gray(tmp_path / "absent.png")
