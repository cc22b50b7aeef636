"""Losses with Keras semantics in both backends: binary_crossentropy (probabilities clipped at 1e-7, or
logits), from_logits for every cross-entropy, and the optional per-sample weight (sample_weight /
class_weight): sum_i w_i * loss_i / N, Keras' "sum_over_batch_size". Forward values against float64
references written out here, gradients against central finite differences."""
import numpy as np
import pytest

import graphcnn as gc
import ir
from backends.numpy import compile_numpy
from ir.passes import run_pipeline
from ir.training import make_training_graph

BACKENDS = ("numpy", "llvm")
LO, HI = float(np.float32(1e-7)), float(np.float32(1 - 1e-7))     # Keras' epsilon, as float32


# ---------------------------------------------------------------------------------------------------------
# float64 references: per-sample losses, then the weighted batch reduction

def per_sample(loss, p, t, from_logits):
    p = p.astype(np.float64)
    if loss == "binary_crossentropy":
        if from_logits:
            elem = np.logaddexp(0.0, p) - p * t                       # -log sigmoid terms, stable
        else:
            q = np.clip(p, LO, HI)
            elem = -(t * np.log(q) + (1 - t) * np.log(1 - q))
        return elem.mean(axis=-1)
    if loss == "mse":
        return ((p - t) ** 2).reshape(len(p), -1).mean(axis=1)
    if from_logits:
        logq = p - p.max(1, keepdims=True)
        logq -= np.log(np.exp(logq).sum(1, keepdims=True))
    else:
        q = np.clip(p, LO, HI)
        logq = np.log(q / q.sum(1, keepdims=True))
    if loss == "sparse_categorical_crossentropy":
        return -logq[np.arange(len(p)), t.astype(int)]
    return -(t * logq).sum(1)


def reference(loss, p, t, w, from_logits):
    rows = per_sample(loss, p, t, from_logits)
    return float(np.sum(rows * (1.0 if w is None else w)) / len(p))


def loss_graph(loss, n_classes, weighted, from_logits, rank=2):
    g = ir.Graph("loss")
    shape = (None, n_classes) if rank == 2 else (None, 2, n_classes)
    p = g.input("p", shape)
    t = g.input("t", (None,) if loss == "sparse_categorical_crossentropy" else shape)
    w = g.input("w", (None,)) if weighted else None
    fn = getattr(gc.ops, loss)
    out = fn(p, t, sample_weight=w) if loss == "mse" else fn(p, t, from_logits=from_logits, sample_weight=w)
    g.output(out)
    return g


def make_feed(loss, n, k, weighted, from_logits, rng, rank=2):
    shape = (n, k) if rank == 2 else (n, 2, k)
    if from_logits or loss == "mse":
        p = rng.standard_normal(shape) * 3
    elif loss == "binary_crossentropy":
        p = rng.uniform(0.05, 0.95, shape)
    else:
        p = rng.uniform(0.05, 1.0, shape)
        p /= p.sum(-1, keepdims=True)
    if loss == "sparse_categorical_crossentropy":
        t = rng.integers(0, k, n).astype(np.float64)
    elif loss == "binary_crossentropy":
        t = (rng.random(shape) > 0.5) * 1.0
    elif loss == "categorical_crossentropy":
        t = rng.uniform(0, 1, shape)
        t /= t.sum(-1, keepdims=True)                                   # soft targets
    else:
        t = rng.standard_normal(shape)
    feed = {"p": p, "t": t}
    if weighted:
        feed["w"] = rng.uniform(0, 3, n)
    return feed


CASES = [(loss, fl) for loss in ("binary_crossentropy", "sparse_categorical_crossentropy", "categorical_crossentropy")
         for fl in (False, True)] + [("mse", False)]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 3), (4, 7)])
@pytest.mark.parametrize("loss,from_logits", CASES)
def test_loss_values_and_gradients_both_backends(loss, from_logits, n, k, weighted):
    rng = np.random.default_rng(n * 10 + k)
    g = loss_graph(loss, k, weighted, from_logits)
    feed = make_feed(loss, n, k, weighted, from_logits, rng)
    want = reference(loss, feed["p"], feed["t"], feed.get("w"), from_logits)
    gg = ir.grad(g, wrt=["p"])
    f32 = {k_: v.astype(np.float32) for k_, v in feed.items()}
    results = {}
    for be in BACKENDS:
        value, dp = gc.compile(gg, backend=be)(**f32)
        assert abs(float(value) - want) <= 2e-6 * max(1.0, abs(want)), (be, float(value), want)
        results[be] = dp
    np.testing.assert_allclose(results["numpy"], results["llvm"], rtol=2e-5, atol=1e-7)
    # gradient: the float64 NumPy build vs central differences of the float64 reference
    dp64 = compile_numpy(gg, compute_dtype=np.float64)(**feed)[1]
    np.testing.assert_allclose(results["numpy"], dp64, rtol=1e-4, atol=1e-7)
    h = 1e-6
    fd = np.zeros_like(feed["p"])
    for idx in np.ndindex(feed["p"].shape):
        hi, lo = feed["p"].copy(), feed["p"].copy()
        hi[idx] += h
        lo[idx] -= h
        fd[idx] = (reference(loss, hi, feed["t"], feed.get("w"), from_logits)
                   - reference(loss, lo, feed["t"], feed.get("w"), from_logits)) / (2 * h)
    np.testing.assert_allclose(dp64, fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_mse_on_rank_3_predictions(backend):
    rng = np.random.default_rng(2)
    g = loss_graph("mse", 3, True, False, rank=3)
    feed = make_feed("mse", 4, 3, True, False, rng, rank=3)
    gg = ir.grad(g, wrt=["p"])
    value, dp = gc.compile(gg, backend=backend)(**{k: v.astype(np.float32) for k, v in feed.items()})
    want = reference("mse", feed["p"], feed["t"], feed["w"], False)
    assert abs(float(value) - want) <= 2e-6 * max(1, want)
    want_dp = 2 * (feed["p"] - feed["t"]) * feed["w"][:, None, None] / feed["p"].size
    np.testing.assert_allclose(dp, want_dp, rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Keras semantics, as numbers

@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_crossentropy_keras_numbers(backend):
    g = loss_graph("binary_crossentropy", 1, True, False)
    fn = gc.compile(g, backend=backend)
    p = np.array([[0.9], [0.2]], np.float32)
    y = np.array([[1.0], [0.0]], np.float32)
    both = (-np.log(0.9) - np.log(0.8)) / 2
    assert float(fn(p=p, t=y, w=np.ones(2, np.float32))) == pytest.approx(both, rel=1e-6)
    # sum_over_batch_size: divided by N = 2, not by the weights' sum
    assert float(fn(p=p, t=y, w=np.array([2.0, 0.0], np.float32))) == pytest.approx(-np.log(0.9), rel=1e-6)
    # probabilities 0 and 1 are clipped at 1e-7: the loss is large but finite
    hard = float(fn(p=np.array([[0.0], [1.0]], np.float32), t=y, w=np.ones(2, np.float32)))
    assert hard == pytest.approx(-np.log(LO) / 2 - np.log(1 - HI) / 2, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_crossentropy_from_extreme_logits_is_finite_and_nan_propagates(backend):
    g = loss_graph("binary_crossentropy", 3, False, True)
    gg = ir.grad(g, wrt=["p"])
    fn = gc.compile(gg, backend=backend)
    z = np.array([[100.0, -100.0, 30.0]], np.float32)
    y = np.array([[1.0, 0.0, 0.0]], np.float32)
    value, dp = fn(p=z, t=y)
    assert float(value) == pytest.approx(30.0 / 3, rel=1e-6)                  # only the wrong logit costs
    np.testing.assert_allclose(dp, [[0.0, 0.0, 1.0 / 3]], atol=1e-7)
    value, dp = fn(p=np.array([[np.nan, 0.0, 0.0]], np.float32), t=y)
    assert np.isnan(value) and np.isnan(dp[0, 0])


def test_class_weight_as_per_sample_weights_doubles_the_step():
    """Weights of 2 for every sample double the gradient: one SGD step at lr equals one at 2 lr unweighted."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = rng.integers(0, 2, (6, 1)).astype(np.float32)
    w0 = (rng.standard_normal((5, 1)) * 0.3).astype(np.float32)
    out = {}
    for weighted in (False, True):
        g = ir.Graph("bce")
        xi, yi = g.input("x", (None, 5)), g.input("y", (None, 1))
        wi = g.input("sw", (None,)) if weighted else None
        w = g.param("w", (5, 1))
        g.output(gc.ops.binary_crossentropy(gc.ops.sigmoid(gc.ops.dense(xi, w)), yi, sample_weight=wi))
        fwd = run_pipeline(g, "training_forward").graph
        tg = make_training_graph(fwd, fwd.outputs[0].name, "sgd", {"lr": 0.05 if weighted else 0.1})
        for be in BACKENDS:
            exe = gc.compile(tg, backend=be, params={"w": w0.copy()}, passes="training")
            feed = {"x": x, "y": y, **({"sw": np.full(6, 2.0, np.float32)} if weighted else {})}
            exe(**feed)
            out[be, weighted] = exe.state["w"].copy()
    for be in BACKENDS:
        np.testing.assert_allclose(out[be, True], out[be, False], rtol=1e-6, atol=1e-7)
        assert not np.allclose(out[be, True], w0)


def test_sigmoid_binary_crossentropy_is_computed_from_logits():
    g = ir.Graph("fold")
    z, y, sw = g.input("z", (None, 3)), g.input("y", (None, 3)), g.input("sw", (None,))
    g.output(gc.ops.binary_crossentropy(gc.ops.sigmoid(z), y, sample_weight=sw))
    folded = run_pipeline(g, "training_forward").graph
    (node,) = folded.nodes
    assert node.op == "binary_crossentropy" and node.attrs["from_logits"]
    assert [v.name for v in node.inputs] == ["z", "y", "sw"]
    rng = np.random.default_rng(0)
    feed = {"z": rng.standard_normal((4, 3)).astype(np.float32),
            "y": (rng.random((4, 3)) > 0.5).astype(np.float32), "sw": rng.random(4).astype(np.float32)}
    for be in BACKENDS:
        a = float(gc.compile(g, backend=be, passes="none")(**feed))
        b = float(gc.compile(folded, backend=be, passes="none")(**feed))
        assert a == pytest.approx(b, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("build,message", [
    (lambda g: gc.ops.binary_crossentropy(g.input("p", (None, 3)), g.input("t", (None, 2))),
     r"binary_crossentropy: targets .* must have the predictions' shape"),
    (lambda g: gc.ops.binary_crossentropy(g.input("p", (None, 3)), g.input("t", (None, 3)),
                                          sample_weight=g.input("w", (None, 3))),
     r"binary_crossentropy: weight must be 1-D \(batch,\) per-sample weights"),
    (lambda g: gc.ops.sparse_categorical_crossentropy(g.input("p", (4, 3)), g.input("t", (4,)),
                                                      sample_weight=g.input("w", (5,))),
     "sparse_categorical_crossentropy: weight must be 1-D"),
    (lambda g: gc.ops.mse(g.input("p", ()), g.input("t", ())), "mse: predictions must have a batch axis"),
])
def test_bad_loss_operands_are_refused(build, message):
    with pytest.raises(ir.IRError, match=message):
        build(ir.Graph("bad"))


def test_numpy_kernel_checks_the_weight_shape():
    from backends.numpy import kernels as K
    with pytest.raises(ValueError, match=r"binary_crossentropy: weight has shape \(3,\), expected \(2,\)"):
        K.binary_crossentropy(np.zeros((2, 1), np.float32), np.zeros((2, 1), np.float32), np.zeros((), np.float32),
                              weight=np.ones(3, np.float32))
