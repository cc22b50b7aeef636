"""relu_grad folded into the max_pool2d_grad before it (ir/passes/fold_relu_grad.py, max_pool2d_grad's
relu_mask): the folded kernel bit-identical to the two unfolded ones on both backends (NaN, inf, zeros,
ties, windows that do not tile the image), training steps bit-identical with and without the pass, and
the pass leaving what it must not fold."""
import numpy as np
import pytest

import graphcnn as gc
from graphcnn import layers
from ir.graph import Graph
from ir.ops import emit
from ir.passes import PIPELINES, run_pipeline
from ir.types import IRError

NO_FOLD = [p for p in PIPELINES["training"] if p != "fold_relu_grad"]


def _pair_graph(shape, pool, stride=None, padding="valid", folded=False):
    """relu_grad(y, max_pool2d_grad(y, dy)), or the folded op alone."""
    g = Graph("pool_relu_grad")
    y = g.input("y", (None,) + shape)
    probe = emit("max_pool2d", y, pool=pool, stride=stride, padding=padding)
    dy = g.input("dy", probe.shape)
    if folded:
        g.output(emit("max_pool2d_grad", y, dy, pool=pool, stride=stride, padding=padding, relu_mask=True))
    else:
        g.output(emit("relu_grad", y, emit("max_pool2d_grad", y, dy, pool=pool, stride=stride, padding=padding)))
    return g


def _relu_like(rng, shape):
    """Relu outputs with what makes masks and maxima hard: zeros, ties, NaN, inf (and a few negatives,
    which a relu output cannot have but the kernel must still mask)."""
    y = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    flat = y.reshape(-1)
    k = max(1, flat.size // 20)
    flat[rng.integers(0, flat.size, k)] = np.nan
    flat[rng.integers(0, flat.size, k)] = np.inf
    flat[rng.integers(0, flat.size, k)] = -1.5
    flat[rng.integers(0, flat.size, k)] = 1.0          # ties with other 1.0s
    return y


@pytest.mark.parametrize("shape, pool, stride, padding", [
    ((26, 26, 32), 2, None, "valid"),               # mnist_cnn's first pool
    ((11, 11, 64), 2, None, "valid"),               # its second: the last row and column belong to no window
    ((1, 7, 1), (1, 2), None, "valid"),
    ((7, 5, 3), 3, None, "valid"),
    ((9, 13, 17), (2, 3), (3, 4), "valid"),         # gaps between windows
    ((5, 7, 5), 2, None, "same"),                   # padded windows
])
def test_folded_kernel_is_bit_identical(shape, pool, stride, padding):
    rng = np.random.default_rng(0)
    unfolded, folded = _pair_graph(shape, pool, stride, padding), _pair_graph(shape, pool, stride, padding, True)
    for backend in ("llvm", "numpy"):
        a = gc.compile(unfolded, backend, passes="none")
        b = gc.compile(folded, backend, passes="none")
        for n in (1, 4):
            y = _relu_like(rng, (n,) + shape)
            dy = rng.standard_normal((n,) + tuple(unfolded.inputs[1].shape[1:])).astype(np.float32)
            dy.reshape(-1)[::7] = np.inf
            ra, rb = a(y=y, dy=dy), b(y=y, dy=dy)
            assert ra.tobytes() == rb.tobytes(), f"{backend}: folded and unfolded differ"
    # the two backends agree too (NaN positions, infinities, values)
    y = _relu_like(rng, (3,) + shape)
    dy = rng.standard_normal((3,) + tuple(unfolded.inputs[1].shape[1:])).astype(np.float32)
    np.testing.assert_array_equal(gc.compile(folded, "llvm", passes="none")(y=y, dy=dy),
                                  gc.compile(unfolded, "numpy", passes="none")(y=y, dy=dy))


def _cnn():
    return gc.Sequential([
        layers.Input((13, 11, 2)),
        layers.Conv2D(5, 3, activation="relu"),         # 11 x 9: the pool leaves a row and a column
        layers.MaxPool2D(2),
        layers.Conv2D(7, 2, padding="same", activation="relu"),
        layers.MaxPool2D((1, 2)),
        layers.Flatten(),
        layers.Dense(3, activation="softmax"),
    ], name="fold_cnn")


@pytest.mark.parametrize("backend", ["llvm", "numpy"])
def test_training_steps_are_bit_identical_with_and_without_the_fold(monkeypatch, backend):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((24, 13, 11, 2)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    weights, losses = {}, {}
    for label, pipeline in (("start", NO_FOLD), ("folded", PIPELINES["training"]), ("unfolded", NO_FOLD)):
        monkeypatch.setitem(PIPELINES, "training", pipeline)
        m = _cnn()
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", backend=backend)
        # seed 3: the same initial weights for all three (epochs=0 only initializes)
        h = m.fit(x, y, epochs=0 if label == "start" else 2, batch_size=8, verbose=0, seed=3, shuffle=False)
        weights[label], losses[label] = m.get_weights(), h.history.get("loss")
    folded, unfolded, start = weights["folded"], weights["unfolded"], weights["start"]
    assert sorted(folded) == sorted(unfolded) and len(folded) == 6
    assert losses["folded"] == losses["unfolded"] and len(losses["folded"]) == 2
    for name in folded:
        assert folded[name].tobytes() == unfolded[name].tobytes(), name
        assert folded[name].tobytes() != start[name].tobytes(), f"{name} did not train"


def test_training_pipeline_folds_both_pools():
    m = _cnn()
    m.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", backend="llvm")
    tg = run_pipeline(m.training_graph(), "training").graph
    ops = [n.op for n in tg.nodes]
    assert "relu_grad" not in ops
    assert [n.attrs["relu_mask"] for n in tg.nodes if n.op == "max_pool2d_grad"] == [True, True]


def test_pass_leaves_what_it_must_not_fold():
    from ir.passes.fold_relu_grad import fold_relu_grad
    # overlapping windows: a cell gets several shares, masked after their sum
    g = Graph("overlap")
    y = g.input("y", (None, 6, 6, 2))
    dy = g.input("dy", emit("max_pool2d", y, pool=3, stride=2).shape)
    g.output(emit("relu_grad", y, emit("max_pool2d_grad", y, dy, pool=3, stride=2)))
    assert "relu_grad" in [n.op for n in fold_relu_grad(g).nodes]
    # the mask of another tensor than the pool's input
    g = Graph("other")
    y, z = g.input("y", (None, 4, 4, 2)), g.input("z", (None, 4, 4, 2))
    dy = g.input("dy", (None, 2, 2, 2))
    g.output(emit("relu_grad", z, emit("max_pool2d_grad", y, dy)))
    assert "relu_grad" in [n.op for n in fold_relu_grad(g).nodes]
    # the pool gradient is read elsewhere too
    g = Graph("shared")
    y = g.input("y", (None, 4, 4, 2))
    dy = g.input("dy", (None, 2, 2, 2))
    grad = emit("max_pool2d_grad", y, dy)
    g.output(emit("relu_grad", y, grad))
    g.output(emit("neg", grad))
    assert "relu_grad" in [n.op for n in fold_relu_grad(g).nodes]


def test_op_refuses_a_mask_on_overlapping_windows():
    g = Graph("bad")
    y = g.input("y", (None, 6, 6, 2))
    dy = g.input("dy", (None, 2, 2, 2))
    with pytest.raises(IRError, match="relu_mask needs windows that cannot overlap"):
        emit("max_pool2d_grad", y, dy, pool=3, stride=2, relu_mask=True)
    with pytest.raises(IRError, match="relu_mask must be a bool"):
        emit("max_pool2d_grad", y, g.input("d2", (None, 3, 3, 2)), relu_mask=1)
