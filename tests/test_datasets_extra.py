"""Fashion-MNIST and CIFAR-10 loaders, on generated files only (no test touches the network: downloads
come from file:// mirrors and any other URL fails the test). CIFAR records are built byte by byte here
from the published layout, independent of the loader's NumPy reshapes."""
import gzip
import hashlib
import io
import os
import struct
import tarfile
import urllib.request

import numpy as np
import pytest

import graphcnn as gc
from graphcnn.datasets import DatasetError, cifar10, download, fashion_mnist


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real_urlopen = urllib.request.urlopen

    def guarded(url, *args, **kwargs):
        target = url if isinstance(url, str) else url.full_url
        if not target.startswith("file:"):
            raise AssertionError(f"test tried to open a network URL: {target}")
        return real_urlopen(url, *args, **kwargs)
    monkeypatch.setattr(urllib.request, "urlopen", guarded)


def idx_bytes(array):
    """uint8 IDX bytes built with struct (big-endian sizes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + bytes(array.ravel().tolist())


FASHION_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def make_fashion_folder(folder, n_train=7, n_test=3, seed=0, gz=True, max_label=9):
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              rng.integers(0, max_label + 1, n_train, dtype=np.uint8),
              rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              rng.integers(0, max_label + 1, n_test, dtype=np.uint8)]
    arrays[1][0] = max_label
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in zip(FASHION_NAMES, arrays):
        data = idx_bytes(a)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return arrays


# -- Fashion-MNIST ---------------------------------------------------------------------------------
def test_fashion_reads_a_named_folder(tmp_path):
    arrays = make_fashion_folder(tmp_path / "f", gz=False)
    (a, b), (c, d) = gc.datasets.fashion_mnist.load_data(tmp_path / "f")
    for got, want in zip((a, b, c, d), arrays):
        assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert a.shape == (7, 28, 28) and b.shape == (7,)


def test_fashion_prefers_an_installed_copy(tmp_path, monkeypatch):
    arrays = make_fashion_folder(tmp_path / "installed", seed=4)
    monkeypatch.setattr(fashion_mnist, "LOCAL_FOLDERS", [str(tmp_path / "absent"), str(tmp_path / "installed")])

    def no_fetch(url, timeout=None):
        raise AssertionError("an installed copy must be used without downloading")
    monkeypatch.setattr(fashion_mnist, "_fetch", no_fetch)
    (a, _), (_, d) = fashion_mnist.load_data()
    assert np.array_equal(a, arrays[0]) and np.array_equal(d, arrays[3])


@pytest.fixture
def served_fashion(tmp_path, monkeypatch):
    served = tmp_path / "served"
    arrays = make_fashion_folder(served, seed=5)
    monkeypatch.setattr(fashion_mnist, "MD5", {n + ".gz": hashlib.md5((served / (n + ".gz")).read_bytes()).hexdigest()
                                               for n in FASHION_NAMES})
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(fashion_mnist, "MIRRORS", [empty.as_uri() + "/", served.as_uri() + "/"])
    monkeypatch.setattr(fashion_mnist, "LOCAL_FOLDERS", [])
    return served, arrays


def test_fashion_downloads_into_its_own_cache_subfolder(tmp_path, monkeypatch, served_fashion, capsys):
    _, arrays = served_fashion
    monkeypatch.setenv("GRAPHCNN_DATA", str(tmp_path / "data"))
    (a, b), (c, d) = fashion_mnist.load_data()
    assert all(np.array_equal(g, w) for g, w in zip((a, b, c, d), arrays))
    # not $GRAPHCNN_DATA itself: MNIST caches there under the same file names
    assert sorted(os.listdir(tmp_path / "data" / "fashion-mnist")) == sorted(fashion_mnist.MD5)
    assert "downloading" in capsys.readouterr().err
    monkeypatch.setattr(fashion_mnist, "_fetch", lambda url, timeout=None: pytest.fail("cache hit expected"))
    assert np.array_equal(fashion_mnist.load_data(download=True)[0][0], arrays[0])


def test_fashion_refuses_a_mirror_with_a_bad_checksum(tmp_path, monkeypatch, served_fashion):
    served, _ = served_fashion
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in fashion_mnist.MD5:
        blob = bytearray((served / name).read_bytes())
        blob[-1] ^= 1
        (bad / name).write_bytes(bytes(blob))
    monkeypatch.setattr(fashion_mnist, "MIRRORS", [bad.as_uri() + "/"])
    with pytest.raises(DatasetError, match="Fashion-MNIST.*checksum mismatch") as err:
        fashion_mnist.load_data(cache_dir=tmp_path / "c")
    assert "dataset-fashion-mnist" in str(err.value)
    assert os.listdir(tmp_path / "c") == []


def test_fashion_published_checksums_and_mirrors():
    assert fashion_mnist.MD5 == {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}
    assert all(m.endswith("/") for m in fashion_mnist.MIRRORS)
    assert fashion_mnist.LOCAL_FOLDERS == ["/usr/share/datasets/fashion-mnist"]


def test_fashion_bad_arguments_and_labels(tmp_path):
    make_fashion_folder(tmp_path / "f", max_label=12)
    with pytest.raises(DatasetError, match="train labels go up to 12.*10 classes"):
        fashion_mnist.load_data(tmp_path / "f")
    with pytest.raises(DatasetError, match="no such folder"):
        fashion_mnist.load_data(tmp_path / "absent")
    with pytest.raises(TypeError, match="path"):
        fashion_mnist.load_data(3)
    with pytest.raises(TypeError, match="download"):
        fashion_mnist.load_data(download="yes")
    with pytest.raises(ValueError, match="cannot be combined"):
        fashion_mnist.load_data(tmp_path / "f", download=True)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist package is not installed")
def test_fashion_installed_debian_copy_has_keras_shapes():
    (a, b), (c, d) = fashion_mnist.load_data()
    assert a.shape == (60000, 28, 28) and b.shape == (60000,) and c.shape == (10000, 28, 28)
    assert a.dtype == b.dtype == np.uint8 and sorted(np.unique(b)) == list(range(10))


# -- CIFAR-10 --------------------------------------------------------------------------------------
def cifar_records(n, seed, max_label=9):
    """(bytes, images (n, 32, 32, 3), labels (n, 1)); bytes laid out record by record in Python."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, max_label + 1, (n, 1), dtype=np.uint8)
    labels[0, 0] = max_label
    out = bytearray()
    for i in range(n):
        out.append(int(labels[i, 0]))
        for ch in range(3):
            for y in range(32):
                out.extend(int(v) for v in images[i, y, :, ch])
    return bytes(out), images, labels


CIFAR_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def make_cifar_batches(seed=0, counts=(2, 3, 1, 2, 2, 3), max_label=9):
    batches = {}
    for k, (name, n) in enumerate(zip(CIFAR_FILES, counts)):
        batches[name] = cifar_records(n, seed * 10 + k, max_label)
    xtr = np.concatenate([batches[n][1] for n in CIFAR_FILES[:5]])
    ytr = np.concatenate([batches[n][2] for n in CIFAR_FILES[:5]])
    return batches, (xtr, ytr), (batches["test_batch.bin"][1], batches["test_batch.bin"][2])


def write_tar(path, members, mode="w:gz"):
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def assert_splits(got, train, test):
    (a, b), (c, d) = got
    assert a.dtype == b.dtype == c.dtype == d.dtype == np.uint8
    assert a.shape[1:] == (32, 32, 3) and b.shape[1:] == (1,)
    assert np.array_equal(a, train[0]) and np.array_equal(b, train[1])
    assert np.array_equal(c, test[0]) and np.array_equal(d, test[1])


@pytest.mark.parametrize("layout", ["flat", "subfolder", "archive_in_folder", "archive_file", "plain_tar"])
def test_cifar_reads_every_layout(tmp_path, layout):
    batches, train, test = make_cifar_batches()
    members = {f"cifar-10-batches-bin/{n}": b[0] for n, b in batches.items()}
    members["cifar-10-batches-bin/readme.html"] = b"<html>"
    if layout in ("flat", "subfolder"):
        folder = tmp_path if layout == "flat" else tmp_path / "cifar-10-batches-bin"
        folder.mkdir(exist_ok=True)
        for n, b in batches.items():
            (folder / n).write_bytes(b[0])
        target = tmp_path
    elif layout == "archive_in_folder":
        write_tar(tmp_path / "cifar-10-binary.tar.gz", members)
        target = tmp_path
    else:
        target = tmp_path / ("c.tar.gz" if layout == "archive_file" else "c.tar")
        write_tar(target, members, "w:gz" if layout == "archive_file" else "w")
    assert_splits(cifar10.load_data(target), train, test)


def test_cifar_downloads_checks_md5_and_caches(tmp_path, monkeypatch, capsys):
    batches, train, test = make_cifar_batches(seed=3)
    served = tmp_path / "served"
    served.mkdir()
    write_tar(served / "cifar-10-binary.tar.gz", {f"cifar-10-batches-bin/{n}": b[0] for n, b in batches.items()})
    monkeypatch.setattr(cifar10, "MD5", {"cifar-10-binary.tar.gz":
                                         hashlib.md5((served / "cifar-10-binary.tar.gz").read_bytes()).hexdigest()})
    monkeypatch.setattr(cifar10, "MIRRORS", [served.as_uri() + "/"])
    monkeypatch.setenv("GRAPHCNN_DATA", str(tmp_path / "data"))
    assert_splits(gc.datasets.cifar10.load_data(), train, test)
    assert os.listdir(tmp_path / "data" / "cifar10") == ["cifar-10-binary.tar.gz"]
    assert "downloading" in capsys.readouterr().err
    monkeypatch.setattr(cifar10, "_fetch", lambda url, timeout=None: pytest.fail("cache hit expected"))
    assert_splits(cifar10.load_data(download=True), train, test)
    # a damaged cache is fetched again, and a mirror serving other bytes is refused
    (tmp_path / "data" / "cifar10" / "cifar-10-binary.tar.gz").write_bytes(b"half")
    monkeypatch.setattr(cifar10, "_fetch", lambda url, timeout=None: b"not the archive")
    with pytest.raises(DatasetError, match="CIFAR-10 file cifar-10-binary.tar.gz.*checksum mismatch"):
        cifar10.load_data()


def test_cifar_published_checksum():
    assert cifar10.MD5 == {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"}
    assert cifar10.MIRRORS == ["https://www.cs.toronto.edu/~kriz/"]


def test_cifar_malformed_inputs_are_refused(tmp_path):
    batches, _, _ = make_cifar_batches()
    good = {f"cifar-10-batches-bin/{n}": b[0] for n, b in batches.items()}
    cases = {
        "short": ({**good, "cifar-10-batches-bin/test_batch.bin": good["cifar-10-batches-bin/test_batch.bin"][:-1]},
                  "not a whole number of CIFAR-10 records"),
        "missing": ({k: v for k, v in good.items() if not k.endswith("data_batch_3.bin")}, "lacks.*data_batch_3"),
        "labels": (dict(good, **{"cifar-10-batches-bin/data_batch_1.bin": cifar_records(2, 1, max_label=11)[0]}),
                   "labels go up to 11"),
    }
    for name, (members, msg) in cases.items():
        write_tar(tmp_path / f"{name}.tar.gz", members)
        with pytest.raises(DatasetError, match=msg):
            cifar10.load_data(tmp_path / f"{name}.tar.gz")
    # a symlink member where a batch should be is refused, and nothing is ever extracted to disk
    with tarfile.open(tmp_path / "link.tar.gz", "w:gz") as tar:
        for k, v in good.items():
            if k.endswith("data_batch_2.bin"):
                info = tarfile.TarInfo(k)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info = tarfile.TarInfo(k)
                info.size = len(v)
                tar.addfile(info, io.BytesIO(v))
    with pytest.raises(DatasetError, match="not a regular file"):
        cifar10.load_data(tmp_path / "link.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b junk")
    with pytest.raises(DatasetError, match="not a readable CIFAR-10 tar archive"):
        cifar10.load_data(tmp_path / "junk.tar.gz")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no CIFAR-10 binary batches"):
        cifar10.load_data(empty)
    with pytest.raises(DatasetError, match="no such file or folder"):
        cifar10.load_data(tmp_path / "absent")
    with pytest.raises(TypeError, match="path"):
        cifar10.load_data(1.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        cifar10.load_data(empty, cache_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(["emptydir", "junk.tar.gz", "link.tar.gz"] +
                                                  [f"{n}.tar.gz" for n in cases])


def test_download_size_cap(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    with pytest.raises(DatasetError, match="larger than 4096 bytes"):
        download.fetch_url(big.as_uri(), 5, 4096)
    assert download.fetch_url(big.as_uri(), 5, 5000) == b"x" * 5000


# -- graphcnn train --data / --input-shape -----------------------------------------------------------
from graphcnn import cli  # noqa: E402

TINY_MODEL = '''
import graphcnn as gc
from graphcnn import layers

TRAIN = {"epochs": 1, "batch_size": 4, "data": DATA}


def build_model(input_shape=(28, 28, 1)):
    return gc.Sequential([layers.Input(input_shape), layers.Conv2D(2, 3), layers.Flatten(),
                          layers.Dense(10, activation="softmax")], name="tiny_" + "x".join(map(str, input_shape)))


model = build_model()
'''


def test_cli_load_data_names_and_folders(tmp_path, monkeypatch):
    make_fashion_folder(tmp_path / "f", seed=7)
    monkeypatch.setattr(fashion_mnist, "LOCAL_FOLDERS", [str(tmp_path / "f")])
    (a, b), (c, d) = cli.load_data("fashion-mnist")
    assert a.shape == (7, 28, 28) and d.shape == (3,)
    batches, train, test = make_cifar_batches(seed=2)
    (tmp_path / "c").mkdir()
    for n, blob in batches.items():
        (tmp_path / "c" / n).write_bytes(blob[0])
    (a, b), (c, d) = cli.load_data(str(tmp_path / "c"))
    assert np.array_equal(a, train[0]) and np.array_equal(b, train[1].reshape(-1)) and d.shape == (len(test[1]),)
    assert cli.load_data(str(tmp_path / "f"))[0][0].shape == (7, 28, 28)
    with pytest.raises(cli.UsageError, match="fashion-mnist, cifar10"):
        cli.load_data("imagenet")
    for bad in ("32,32", "a,b,c", "0,3,3"):
        with pytest.raises(cli.UsageError, match="H,W,C"):
            cli.parse_input_shape(bad)
    assert cli.parse_input_shape("32,32,3") == (32, 32, 3)


def test_cli_train_rebuilds_the_model_for_the_data(tmp_path, capsys):
    batches, _, _ = make_cifar_batches(seed=1, counts=(4, 4, 4, 4, 4, 4))
    data = tmp_path / "cifar"
    data.mkdir()
    for n, blob in batches.items():
        (data / n).write_bytes(blob[0])
    src = tmp_path / "tiny.py"
    src.write_text(TINY_MODEL.replace("DATA", repr(str(data))))
    out = tmp_path / "m.gcnn"
    # TRAIN["data"] is CIFAR-shaped, the module's model MNIST-shaped: rebuilt for (32, 32, 3)
    assert cli.main(["train", str(src), "--backend", "numpy", "--quiet", "--out", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    meta = gc.load(str(out))
    assert meta.predict(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 10)
    assert cli.main(["train", str(src), "--backend", "numpy", "--quiet", "--out", str(out),
                     "--input-shape", "28,28,1"]) == 2
    assert "does not match the data's 32x32x3" in capsys.readouterr().err
    plain = tmp_path / "plain.py"
    fixed_shape = TINY_MODEL.replace("def build_model", "def _build").replace("= build_model()", "= _build()")
    plain.write_text(fixed_shape.replace("DATA", repr(str(data))))
    assert cli.main(["train", str(plain), "--backend", "numpy", "--quiet", "--out", str(out)]) == 2
    assert "needs a module function build_model(input_shape)" in capsys.readouterr().err
