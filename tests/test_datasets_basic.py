"""Bundled MNIST subset and IDX reader basics (no network)."""
import gzip

import numpy as np
import pytest

from graphcnn.datasets import DatasetError, mnist, read_idx, write_idx
from graphcnn.datasets.png import read_png_gray, write_png_gray


def test_bundled_subset():
    (xtr, ytr), (xte, yte) = mnist.load_data()
    assert xtr.shape == (8000, 28, 28) and ytr.shape == (8000,)
    assert xte.shape == (2000, 28, 28) and yte.shape == (2000,)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.uint8
    counts = np.bincount(np.concatenate([ytr, yte]), minlength=10)
    assert list(counts) == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert xtr.min() == 0 and xtr.max() == 255


def test_folder_of_raw_idx_files(tmp_path):
    (xtr, ytr), (xte, yte) = mnist.load_data()
    write_idx(tmp_path / "train-images-idx3-ubyte", xtr[:10])
    write_idx(tmp_path / "train-labels-idx1-ubyte", ytr[:10])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", xte[:4])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", yte[:4])
    (a, b), (c, d) = mnist.load_data(tmp_path)
    assert np.array_equal(a, xtr[:10]) and np.array_equal(d, yte[:4])


@pytest.mark.parametrize("data,msg", [
    (b"\x00\x00\x08", "truncated"),
    (b"\x12\x34\x08\x01\x00\x00\x00\x02\x01\x02", "magic"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x02\x01\x02", "data type"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated"),
    (b"\x00\x00\x08\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", "hold"),
])
def test_bad_idx_files(tmp_path, data, msg):
    for name, blob in (("f.idx", data), ("g.idx.gz", gzip.compress(data))):
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(DatasetError, match=msg) as e:
            read_idx(p)
        assert name in str(e.value)


def test_count_mismatch_names_both_files(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 2, 2), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(1, np.uint8))
    with pytest.raises(DatasetError, match="3 images.*4 labels"):
        mnist.load_data(tmp_path)


def test_download_checks_checksums_without_network(tmp_path, monkeypatch):
    served = {}
    (xtr, ytr), _ = mnist.load_data()
    for name in mnist.MD5:
        served[name] = gzip.compress(b"bogus")
    monkeypatch.setattr(mnist, "_fetch", lambda url, timeout=20: served[url.rsplit("/", 1)[1]])
    with pytest.raises(DatasetError, match="checksum mismatch"):
        mnist.load_data("mnist", cache_dir=str(tmp_path))


def test_png_round_trip(tmp_path):
    img = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    write_png_gray(tmp_path / "d.png", img)
    assert np.array_equal(read_png_gray(tmp_path / "d.png"), img)
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="not a PNG"):
        read_png_gray(tmp_path / "x.png")
