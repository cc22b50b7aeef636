"""NaN and inf propagate as in NumPy / IEEE on both backends, fused or not (issue 9): relu(NaN) = NaN,
a max-pool window holding a NaN gives NaN, fused sigmoid(NaN) = NaN, and an all-NaN image gives NaN
outputs instead of a confident class. LLVM and NumPy agree on NaN positions."""
from __future__ import annotations

import numpy as np
import pytest

import graphcnn as gc
from graphcnn import ops
from conftest import load_example

BACKENDS = ("llvm", "numpy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool_window_with_nan_is_nan(backend):
    g = gc.Graph("pool_nan")
    x = g.input("x", (None, 4, 6, 19))
    g.output(ops.max_pool2d(x, pool=2, stride=2), ops.max_pool2d(x, pool=3, stride=1, padding=((1, 1), (1, 1))))
    rng = np.random.default_rng(0)
    xv = rng.normal(size=(2, 4, 6, 19)).astype(np.float32)
    xv[0, 1, 2, 3] = np.nan
    xv[1, 3, 5, 18] = np.nan
    xv[1, 0, 0, 7] = -np.inf
    xv[0, 2, 4, 0] = np.inf
    got2, got3 = gc.compile(g, backend=backend)(x=xv)
    for got, (p, s, pad) in ((got2, (2, 2, 0)), (got3, (3, 1, 1))):
        xp = np.pad(xv.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
        oh, ow = (xp.shape[1] - p) // s + 1, (xp.shape[2] - p) // s + 1
        want = np.empty((2, oh, ow, 19))
        for i in range(oh):
            for j in range(ow):
                want[:, i, j] = np.max(xp[:, i * s:i * s + p, j * s:j * s + p], axis=(1, 2))   # np.max: NaN wins
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got[~np.isnan(want)], want[~np.isnan(want)].astype(np.float32))
        assert np.isnan(got).sum() >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_relu_and_sigmoid_of_nan_are_nan(backend):
    for act in ("relu", "sigmoid", "tanh"):
        g = gc.Graph(f"nan_{act}")
        x = g.input("x", (None, 3))
        w = g.input("w", (3, 17))
        b = g.input("b", (17,))
        g.output(getattr(ops, act)(ops.dense(x, w, b)))
        fn = gc.compile(g, backend=backend)
        assert [n.op for n in fn.pipeline.graph.nodes] == ["dense"]
        bv = np.zeros(17, np.float32)
        bv[[0, 5, 16]] = (np.nan, np.inf, -np.inf)
        out = fn(x=np.ones((2, 3), np.float32), w=np.ones((3, 17), np.float32), b=bv)
        assert np.isnan(out[:, 0]).all(), act
        assert np.isfinite(out[:, 1:]).all() if act != "relu" else np.isinf(out[:, 5]).all()


def test_all_nan_image_gives_nan_probabilities_on_both_backends():
    m = load_example("mnist_cnn")
    g = m.inference_graph()
    x = np.full((2, 28, 28, 1), np.nan, np.float32)
    for backend in BACKENDS:
        probs = gc.compile(g, backend=backend, params=m.weights)(x=x)
        assert np.isnan(probs).all(), f"{backend}: an all-NaN image got a confident class"
    xv = np.random.default_rng(1).random((3, 28, 28, 1)).astype(np.float32)
    xv[1, 5, 5, 0] = np.nan                          # one NaN pixel poisons only its own sample
    outs = [gc.compile(g, backend=b, params=m.weights)(x=xv) for b in BACKENDS]
    for out in outs:
        assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(outs[0][[0, 2]], outs[1][[0, 2]], rtol=1e-4, atol=1e-6)
