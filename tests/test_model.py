"""The Keras-style API: build errors, input handling, fit/evaluate/predict, determinism, save/load."""
import numpy as np
import pytest

import graphcnn as gc
from graphcnn import layers
from conftest import load_example


def tiny_cnn(**kw):
    return gc.Sequential([
        layers.Input((8, 8, 1)),
        layers.Conv2D(4, 3, activation="relu", padding="same"),
        layers.MaxPool2D(2),
        layers.Flatten(),
        layers.Dropout(0.25),
        layers.Dense(3, activation="softmax"),
    ], name="tiny", **kw)


def tiny_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, 8, 8, 1)).astype(np.float32)
    for c in range(3):                      # a learnable signal: class c lights up row block c
        x[y == c, 2 * c:2 * c + 2, :, 0] += 1.0
    return x, y


@pytest.mark.parametrize("make,msg", [
    (lambda: gc.Sequential([layers.Input((8, 8, 1)), layers.Dense(3)]), "Flatten"),
    (lambda: gc.Sequential([layers.Input((4, 4, 1)), layers.Conv2D(2, 5)]), "conv2d"),
    (lambda: gc.Sequential([layers.Input((8, 8, 3)), layers.Conv2D(2, 3, activation="swish")]), "activation"),
    (lambda: gc.Sequential([layers.Input((8, 8, 3)), layers.Conv2D(2, 3, padding="full")]), "padding"),
    (lambda: gc.Sequential([layers.Dense(3)]), "input shape"),
])
def test_build_errors_name_the_layer(make, msg):
    with pytest.raises(gc.LayerError) as e:
        m = make()
        m.build()
    assert msg in str(e.value)


def test_dense_on_4d_error_names_layer_and_fix():
    m = gc.Sequential([layers.Input((8, 8, 1)), layers.Conv2D(2, 3), layers.Dense(3, name="head")])
    with pytest.raises(gc.LayerError, match=r"'head'.*Flatten"):
        m.build()


def test_kernel_larger_than_input_names_layer():
    m = gc.Sequential([layers.Input((4, 4, 1)), layers.Conv2D(2, 5, name="big")])
    with pytest.raises(gc.LayerError, match=r"'big'.*larger than the padded input"):
        m.build()


def test_fit_learns_and_is_deterministic():
    x, y = tiny_data()
    runs = []
    for _ in range(2):
        m = tiny_cnn()
        m.compile(optimizer={"name": "adam", "lr": 0.01}, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], backend="numpy")
        h = m.fit(x, y, epochs=6, batch_size=16, seed=3, verbose=0)
        runs.append((m.get_weights(), h.history))
    (w1, h1), (w2, h2) = runs
    assert h1["loss"][-1] < h1["loss"][0]
    assert h1["accuracy"][-1] > 0.6
    for k in w1:
        assert np.array_equal(w1[k], w2[k]), k           # bit-identical
    assert h1 == h2


def test_different_seeds_differ():
    x, y = tiny_data()
    ws = []
    for seed in (1, 2):
        m = tiny_cnn()
        m.compile(backend="numpy")
        m.fit(x, y, epochs=1, batch_size=16, seed=seed, verbose=0)
        ws.append(m.get_weights()["dense/kernel"])
    assert not np.array_equal(*ws)


def test_input_reshapes_like_keras():
    m = gc.Sequential([layers.Input((28, 28, 1)), layers.Flatten(), layers.Dense(10, activation="softmax")])
    m.compile(backend="numpy")
    x = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    a = m.predict(x)
    b = m.predict(x.reshape(3, 784))
    c = m.predict(x.reshape(3, 28, 28, 1))
    assert a.shape == (3, 10)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(a.sum(-1), 1, rtol=1e-5)


@pytest.mark.parametrize("x,y,msg", [
    (np.zeros((4, 5, 5, 1)), np.zeros(4), "expects"),
    (np.zeros((4, 8, 8, 1)), np.zeros(3), "samples"),
    (np.zeros((4, 8, 8, 1)), np.array([0, 1, 2, 3]), r"\[0, 2\]"),
    (np.zeros((4, 8, 8, 1)), np.array([0, 1, -1, 2]), "labels"),
    (np.full((4, 8, 8, 1), np.nan), np.zeros(4), "NaN"),
    (np.array(["a"] * 4), np.zeros(4), "real numbers"),
])
def test_bad_fit_inputs(x, y, msg):
    m = tiny_cnn()
    m.compile(backend="numpy")
    with pytest.raises(gc.GraphcnnError, match=msg):
        m.fit(x, y, epochs=1, verbose=0)


def test_nan_loss_stops_and_keeps_weights():
    x, y = tiny_data(32)
    m = tiny_cnn()
    m.compile(optimizer={"name": "sgd", "lr": 0.1}, backend="numpy")
    w = m.get_weights()["dense/kernel"]
    huge = np.where(np.arange(w.size).reshape(w.shape) % 2, 3e38, -3e38).astype(np.float32)
    m.set_weights({"dense/kernel": huge})          # logits = inf - inf = NaN on the first batch
    before = m.get_weights()
    with pytest.raises(gc.TrainingError, match=r"epoch 1, batch 1"):
        m.fit(x, y, epochs=3, batch_size=8, verbose=0)
    after = m.get_weights()
    for k in before:
        assert np.array_equal(before[k], after[k]), k


def test_compile_errors():
    m = tiny_cnn()
    with pytest.raises(gc.GraphcnnError, match="optimizer"):
        m.compile(optimizer="adagrad")
    with pytest.raises(gc.GraphcnnError, match="loss"):
        m.compile(loss="hinge")
    with pytest.raises(gc.GraphcnnError, match="backend"):
        m.compile(backend="cuda")
    with pytest.raises(gc.GraphcnnError, match="compile"):
        m.fit(*tiny_data(), verbose=0)


def test_sgd_momentum_and_mse_and_categorical():
    x, y = tiny_data()
    onehot = np.eye(3, dtype=np.float32)[y]
    for loss, target in (("mse", onehot), ("categorical_crossentropy", onehot)):
        m = tiny_cnn()
        m.compile(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, loss=loss, metrics=["accuracy"],
                  backend="numpy")
        h = m.fit(x, target, epochs=3, batch_size=16, seed=0, verbose=0)
        assert h.history["loss"][-1] < h.history["loss"][0], loss


def test_save_load_round_trip(tmp_path):
    x, y = tiny_data()
    m = tiny_cnn()
    m.compile(backend="numpy", metrics=["accuracy"])
    m.fit(x, y, epochs=1, batch_size=16, seed=0, verbose=0)
    p = tmp_path / "tiny.gcnn"
    m.save(p)
    rt = gc.load(p, backend="numpy")
    np.testing.assert_allclose(rt.predict(x), m.predict(x), rtol=1e-6, atol=1e-7)
    assert not list(tmp_path.glob(".tmp-*"))            # atomic save leaves no temp file


def test_examples_build():
    for name, n_params in (("mnist_cnn", 34826), ("lenet5", 61706), ("seed_dense", 7850)):
        m = load_example(name)
        assert m.count_params() == n_params, name
