"""conv2d + max_pool2d fused into conv2d_max_pool (ir/passes/fuse_conv_pool.py, the LLVM conv kernel's
pooled epilogue): when the pass fires and when it must not, the fused kernel bit-identical to the unfused
conv and pool kernels (NaN, inf, 1s and primes, every activation, residuals, threads, batch 1), both
against the float64 reference, and what it saves (the inference arena)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import graphcnn as gc
import reference_ops as R
from graphcnn import layers
from ir.graph import Graph
from ir.ops import emit
from ir.passes import PIPELINES, run_pipeline
from ir.types import IRError
from op_cases import FAMILIES

UNFUSED = [p for p in PIPELINES["inference"] if p != "fuse_conv_pool"]
U = 2.0 ** -24
SETTINGS = dict(deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _conv_pool_graph(cfg, pool, stride=None, pool_padding="valid", residual=False, extra_use=False):
    g = Graph("conv_pool")
    x = g.input("x", (None, cfg["h"], cfg["w"], cfg["c"]))
    w = g.param("w", cfg["k"] + (cfg["c"], cfg["f"]))
    y = emit("conv2d", x, w, stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dil"])
    if cfg["bias"] or residual:
        y = emit("bias_add", y, g.param("b", (cfg["f"],)))
    if residual:
        y = emit("add", y, g.input("r", y.shape))
    act = cfg["activation"]
    if act != "linear":
        y = emit(act, y, **cfg.get("activation_params", {}))
    p = emit("max_pool2d", y, pool=pool, stride=stride, padding=pool_padding)
    g.output(p)
    if extra_use:
        g.output(emit("relu", y))
    return g


def _ops(exe):
    return [n.op for part in exe._parts for n in part.graph.nodes] if hasattr(exe, "_parts") else \
        [n.op for n in exe.graph.nodes]


def _feeds(g, rng, n, special=True):
    feeds = {}
    for v in g.inputs:
        a = rng.standard_normal((n,) + tuple(v.shape[1:])).astype(np.float32)
        if special and v.name == "x" and a.size >= 4:
            flat = a.reshape(-1)
            flat[rng.integers(0, flat.size, 3)] = [np.nan, np.inf, -np.inf]
        feeds[v.name] = a
    return feeds


def _weights(g, rng):
    return {p.name: rng.standard_normal(p.shape).astype(np.float32) * np.float32(0.5) for p in g.params}


# -- the pass -----------------------------------------------------------------------------------------

def test_mnist_cnn_fuses_both_conv_pool_pairs_and_its_arena_shrinks():
    from graphcnn.cli import load_model_source
    m = load_model_source("examples/mnist_cnn.py")
    g = m.inference_graph()
    fused, unfused = run_pipeline(g).graph, run_pipeline(g, UNFUSED).graph
    assert [n.op for n in fused.nodes].count("conv2d_max_pool") == 2
    assert "conv2d" not in [n.op for n in fused.nodes] and "max_pool2d" not in [n.op for n in fused.nodes]
    # the conv outputs (26x26x32 and 11x11x64 floats per image) are gone from the plan
    assert fused.memory_plan.arena_bytes(1) == 4 * (13 * 13 * 32 + 5 * 5 * 64)
    assert fused.memory_plan.arena_bytes(1) < 0.3 * unfused.memory_plan.arena_bytes(1)


def test_training_graphs_are_not_fused():
    m = gc.Sequential([layers.Input((8, 8, 2)), layers.Conv2D(3, 3, activation="relu"), layers.MaxPool2D(2),
                       layers.Flatten(), layers.Dense(2)])
    m.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", backend="llvm")
    tg = m.training_graph()
    assert tg.updates and "max_pool2d" in [n.op for n in tg.nodes]
    for pipeline in ("inference", "training"):
        assert "conv2d_max_pool" not in [n.op for n in run_pipeline(tg, pipeline).graph.nodes]
    assert "conv2d_max_pool" in [n.op for n in run_pipeline(m.inference_graph()).graph.nodes]


BASE = dict(h=9, w=8, c=3, f=5, k=(3, 3), stride=(1, 1), dil=(1, 1), padding="valid", bias=True,
            activation="relu")


@pytest.mark.parametrize("why, pool, stride, pool_padding, extra_use", [
    ("overlapping windows", 3, 2, "valid", False),
    ("stride larger than the window", 2, 3, "valid", False),
    ("padded pool", 2, None, "same", False),
    ("window of 9 pixels", 3, None, "valid", False),
    ("the conv output is also a graph output", 2, None, "valid", True),
])
def test_pass_leaves_what_it_cannot_fuse(why, pool, stride, pool_padding, extra_use):
    g = _conv_pool_graph(BASE, pool, stride, pool_padding, extra_use=extra_use)
    ops = [n.op for n in run_pipeline(g).graph.nodes]
    assert "conv2d_max_pool" not in ops and "max_pool2d" in ops, why


def test_op_refuses_bad_attributes():
    g = Graph("bad")
    x = g.input("x", (None, 5, 5, 2))
    w = g.param("w", (3, 3, 2, 4))
    with pytest.raises(IRError, match="pool window .* larger than the conv output"):
        emit("conv2d_max_pool", x, w, pool=4)
    with pytest.raises(IRError, match="groups must be 1"):
        emit("conv2d_max_pool", x, g.param("wg", (3, 3, 1, 4)), pool=2, groups=2)
    with pytest.raises(IRError, match="missing required attribute 'pool'"):
        emit("conv2d_max_pool", x, w)
    y = emit("conv2d_max_pool", x, w, pool=(1, 3))
    assert y.shape == (None, 3, 1, 4)


# -- the kernel: bit-identical to the unfused kernels, close to the float64 reference ------------------

def _check(cfg, pool, rng, residual=False, batches=(1, 3)):
    g = _conv_pool_graph(cfg, pool, residual=residual)
    params = _weights(g, rng)
    fused = gc.compile(g, "llvm", params)
    assert "conv2d_max_pool" in _ops(fused), "the pass did not fuse"
    unfused = gc.compile(g, "llvm", params, passes=UNFUSED)
    numpy_fused = gc.compile(g, "numpy", params)
    for n in batches:
        feeds = _feeds(g, rng, n)
        a = fused(**feeds)
        b = unfused(**feeds)
        assert a.tobytes() == b.tobytes(), f"fused and unfused LLVM results differ for {cfg}, pool {pool}"
        c = numpy_fused(**feeds)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(c))
        # float64 reference: conv, bias, residual, activation, pool
        fam = FAMILIES["conv2d"]
        ref_cfg = dict(cfg, bias=cfg["bias"] or residual)
        args = {"x": feeds["x"].astype(np.float64), "w": params["w"].astype(np.float64)}
        if ref_cfg["bias"]:
            args["b"] = params["b"].astype(np.float64)
        z = R.conv2d(args["x"], args["w"], args.get("b"), cfg["stride"], fam._pads(cfg), cfg["dil"])
        if residual:
            z = z + feeds["r"]
        y = R.activation(cfg["activation"], z, **cfg.get("activation_params", {}))
        ph, pw = (pool, pool) if isinstance(pool, int) else pool
        ref = R.max_pool2d(y, (ph, pw), (ph, pw), ((0, 0), (0, 0)))
        fin = np.isfinite(ref)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(ref))
        np.testing.assert_array_equal(a[np.isinf(ref)], ref[np.isinf(ref)])
        length = cfg["k"][0] * cfg["k"][1] * cfg["c"] + 2
        scale = np.abs(args["x"][np.isfinite(args["x"])]).max() * np.abs(args["w"]).sum(axis=(0, 1, 2)).max() + 2
        bound = 4 * (length + 4) * U * scale
        assert np.abs(a[fin] - ref[fin]).max(initial=0) <= bound
        np.testing.assert_allclose(c[fin], ref[fin], rtol=0, atol=bound)


@pytest.mark.parametrize("cfg, pool", [
    (dict(BASE, h=28, w=28, c=1, f=32), 2),                                  # mnist_cnn's stem
    (dict(BASE, h=13, w=13, c=32, f=64), 2),                                 # its second conv (odd: 11 -> 5)
    (dict(BASE, h=1, w=7, c=1, f=1, k=(1, 3)), (1, 2)),                       # 1s
    (dict(BASE, h=7, w=5, c=3, f=17, padding="same", activation="leaky_relu",
          activation_params={"alpha": 0.1}), 2),                              # primes, a masked tail
    (dict(BASE, h=11, w=9, c=2, f=33, stride=(2, 1), dil=(1, 2), bias=False, activation="linear"), (2, 1)),
    (dict(BASE, h=6, w=6, c=5, f=7, activation="tanh"), (1, 1)),
    (dict(BASE, h=8, w=10, c=2, f=16, activation="sigmoid", padding=((1, 0), (2, 1))), (1, 3)),
])
def test_fused_kernel_matches_unfused_and_reference(cfg, pool):
    _check(cfg, pool, np.random.default_rng(1))


@pytest.mark.parametrize("activation", ["relu", "linear", "clip"])
def test_fused_residual_block(activation):
    params = {"min_value": 0.0, "max_value": 0.5} if activation == "clip" else {}
    cfg = dict(BASE, h=8, w=8, c=4, f=4, padding="same", activation=activation, activation_params=params)
    _check(cfg, 2, np.random.default_rng(2), residual=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_and_batch_one_agree(monkeypatch, threads):
    """The runtime's batch split and the batch-1 team (row tiles of the fused kernel claimed by the
    threads) give the single-thread bits."""
    monkeypatch.setenv("GRAPHCNN_THREADS", "1")
    rng = np.random.default_rng(3)
    g = _conv_pool_graph(dict(BASE, h=28, w=28, c=8, f=32), 2)
    params = _weights(g, rng)
    one = gc.compile(g, "llvm", params)
    monkeypatch.setenv("GRAPHCNN_THREADS", str(threads))
    many = gc.compile(g, "llvm", params)
    for n in (1, 2, 37):
        feeds = _feeds(g, rng, n)
        assert many(**feeds).tobytes() == one(**feeds).tobytes()


@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_random_conv_pool_configurations(data):
    fam = FAMILIES["conv2d"]
    cfg = data.draw(st.composite(lambda draw: fam.draw(draw))())
    ext = fam._pads(cfg)
    oh = (cfg["h"] + ext[0][0] + ext[0][1] - ((cfg["k"][0] - 1) * cfg["dil"][0] + 1)) // cfg["stride"][0] + 1
    ow = (cfg["w"] + ext[1][0] + ext[1][1] - ((cfg["k"][1] - 1) * cfg["dil"][1] + 1)) // cfg["stride"][1] + 1
    pool = (data.draw(st.integers(1, min(2, oh))), data.draw(st.integers(1, min(2, ow))))
    _check(cfg, pool, np.random.default_rng(data.draw(st.integers(0, 2 ** 31))), batches=(1, 2))
