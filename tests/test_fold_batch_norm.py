"""fold_batch_norm: conv/depthwise/dense (+ bias) -> batch_norm becomes one node with folded weights,
equal to the unfolded graph within 1e-5, and the activation after it still fuses into the conv."""
import numpy as np
import pytest

import graphcnn as gc
import ir
from ir.ops import emit
from ir.passes import run_pipeline

BACKENDS = ("numpy", "llvm")


def _bn_params(g, prefix, c):
    return [g.param(f"{prefix}.{k}", (c,)) for k in ("gamma", "beta", "mean", "var")]


def _params(g, rng):
    out = {}
    for p in g.params:
        a = rng.standard_normal(p.shape).astype(np.float32)
        out[p.name] = np.abs(a) + 0.2 if p.name.endswith(".var") else a
    return out


def _conv_bn_relu_net():
    g = ir.Graph("net")
    x = g.input("x", (None, 9, 9, 3))
    y = gc.ops.conv2d(x, g.param("w1", (3, 3, 3, 8)), padding="same")             # no bias (use_bias=False)
    y = gc.ops.relu(gc.ops.batch_norm(y, *_bn_params(g, "bn1", 8)))
    y = gc.ops.conv2d(y, g.param("w2", (3, 3, 8, 6)), g.param("b2", (6,)), stride=2)   # conv + bias_add
    y = gc.ops.relu(gc.ops.batch_norm(y, *_bn_params(g, "bn2", 6)))
    y = gc.ops.depthwise_conv2d(y, g.param("dw", (3, 3, 6, 2)), padding="same")
    y = gc.ops.batch_norm(y, *_bn_params(g, "bn3", 12))                             # a graph output, no act
    z = gc.ops.dense(gc.ops.flatten(y), g.param("wd", (4 * 4 * 12, 5)))
    z = gc.ops.tanh(gc.ops.batch_norm(z, *_bn_params(g, "bn4", 5)))
    g.output(y, z)
    return g


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_relu_folds_fuses_and_matches_unfolded(backend):
    g = _conv_bn_relu_net()
    rng = np.random.default_rng(0)
    params = _params(g, rng)
    folded = gc.compile(g, backend=backend, params=params)
    plain = gc.compile(g, backend=backend, params=params, passes=["verify"])
    opt = folded.pipeline.graph
    ops = [n.op for n in opt.nodes]
    assert "batch_norm" not in ops
    acts = {n.op: n.attrs["activation"] for n in opt.nodes if n.op in ("conv2d", "dense")}
    convs = [n for n in opt.nodes if n.op == "conv2d"]
    assert [c.attrs["activation"] for c in convs] == ["relu", "relu"] and len(convs[0].inputs) == 3
    assert acts["dense"] == "tanh"
    assert ops.count("relu") == 0 and ops.count("tanh") == 0 and ops.count("bias_add") == 0
    for batch in (1, 4):
        x = rng.standard_normal((batch, 9, 9, 3)).astype(np.float32)
        for a, b in zip(folded(x=x), plain(x=x)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


def test_fold_keeps_batch_norm_when_the_conv_result_is_needed():
    g = ir.Graph("shared")
    x = g.input("x", (None, 5, 5, 2))
    y = gc.ops.conv2d(x, g.param("w", (1, 1, 2, 3)))
    g.output(gc.ops.batch_norm(y, *_bn_params(g, "bn", 3)), y)         # y itself is an output
    h = ir.Graph("act")
    xh = h.input("x", (None, 5, 5, 2))
    yh = emit("conv2d", xh, h.param("w", (1, 1, 2, 3)), activation="relu")   # already activated
    h.output(gc.ops.batch_norm(yh, *_bn_params(h, "bn", 3)))
    for graph in (g, h):
        out = run_pipeline(graph, ["verify", "fold_batch_norm"]).graph
        assert [n.op for n in out.nodes].count("batch_norm") == 1


def test_constant_weights_fold_at_compile_time():
    g = ir.Graph("c")
    x = g.input("x", (None, 4, 4, 2))
    rng = np.random.default_rng(1)
    w = g.const("w", rng.standard_normal((3, 3, 2, 4)).astype(np.float32))
    stats = [g.const(k, np.abs(rng.standard_normal(4)).astype(np.float32) + 0.1) for k in ("g", "b", "m", "v")]
    g.output(gc.ops.relu(gc.ops.batch_norm(gc.ops.conv2d(x, w), *stats)))
    out = run_pipeline(g, "inference").graph
    assert [n.op for n in out.nodes] == ["conv2d"] and out.nodes[0].attrs["activation"] == "relu"
    xs = rng.standard_normal((2, 4, 4, 2)).astype(np.float32)
    got = gc.compile(g, backend="numpy")(x=xs)
    want = gc.compile(g, backend="numpy", passes=["verify"])(x=xs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
