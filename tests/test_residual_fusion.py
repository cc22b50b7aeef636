"""conv2d + bias + residual add + activation fused into one node (the ResNet block's tail): the pass
finds the pattern only where it is safe, and fused and unfused code agree bit for bit on both backends,
NaN and inf included, forward and in a training step."""
from __future__ import annotations

import numpy as np
import pytest

import graphcnn as gc
import ir
from ir.ops import emit
from ir.passes import PIPELINES, run_pipeline
from ir.text import parse_graph, print_graph
from ir.types import IRError

UNFUSED = [p for p in PIPELINES["inference"] if p != "fuse_bias_activation"]
BACKENDS = ["numpy", "llvm"]


def block(c=3, f=3, hw=(5, 7), activation="relu", skip_first=True, stride=1):
    """x -> conv(w1, b1) -> relu -> conv(w2, b2) -> add(skip) -> activation, skip = x (or a 1x1 projection)."""
    g = ir.Graph("res_block")
    x = g.input("x", (None,) + hw + (c,))
    w1, b1 = g.param("w1", (3, 3, c, f)), g.param("b1", (f,))
    w2, b2 = g.param("w2", (3, 3, f, f)), g.param("b2", (f,))
    y = emit("relu", emit("bias_add", emit("conv2d", x, w1, stride=stride, padding="same"), b1))
    z = emit("bias_add", emit("conv2d", y, w2, padding="same"), b2)
    skip = x
    if stride != 1 or c != f:
        skip = emit("conv2d", x, g.param("wp", (1, 1, c, f)), stride=stride, padding="same")
    s = emit("add", skip, z) if skip_first else emit("add", z, skip)
    out = s if activation == "linear" else emit(activation, s, **({"alpha": 0.1} if activation == "leaky_relu" else {}))
    g.output(out)
    return g


def params_for(g, rng):
    return {p.name: (rng.standard_normal(p.shape) * 0.5).astype(np.float32) for p in g.params}


def residual_nodes(g):
    return [n for n in g.nodes if n.op == "conv2d" and len(n.inputs) == 4]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "linear", "sigmoid", "leaky_relu"])
@pytest.mark.parametrize("skip_first", [True, False])
def test_fused_residual_equals_unfused_bit_for_bit(backend, activation, skip_first):
    g = block(activation=activation, skip_first=skip_first)
    rng = np.random.default_rng(0)
    params = params_for(g, rng)
    fused = gc.compile(g, backend=backend, params=params, passes="inference")
    unfused = gc.compile(g, backend=backend, params=params, passes=UNFUSED)
    assert len(residual_nodes(fused.graph)) == 1 and not any(n.op == "add" for n in fused.graph.nodes)
    for n in (1, 2, 7):
        x = rng.standard_normal((n, 5, 7, 3)).astype(np.float32)
        flat = x.reshape(-1)
        flat[rng.random(flat.size) < 0.1] = np.nan
        flat[rng.random(flat.size) < 0.05] = np.inf
        flat[rng.random(flat.size) < 0.05] = -np.inf
        a, b = fused(x=x), unfused(x=x)
        assert np.array_equal(a, b, equal_nan=True), f"{backend} {activation} n={n}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_residual_matches_a_float64_reference(backend):
    g = block()
    rng = np.random.default_rng(1)
    params = params_for(g, rng)
    x = rng.standard_normal((3, 5, 7, 3)).astype(np.float32)
    got = gc.compile(g, backend=backend, params=params)(x=x)

    def conv_same(a, w, b):                          # naive float64 3x3 'same' correlation
        n, h, wd, _ = a.shape
        p = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros((n, h, wd, w.shape[3]))
        for i in range(3):
            for j in range(3):
                out += np.einsum("nhwc,cf->nhwf", p[:, i:i + h, j:j + wd], w[i, j])
        return out + b
    P = {k: v.astype(np.float64) for k, v in params.items()}
    y = np.maximum(conv_same(x.astype(np.float64), P["w1"], P["b1"]), 0)
    want = np.maximum(conv_same(y, P["w2"], P["b2"]) + x, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_projection_shortcut_fuses_into_the_second_conv(backend):
    g = block(c=2, f=5, stride=2)
    rng = np.random.default_rng(2)
    params = params_for(g, rng)
    fused = gc.compile(g, backend=backend, params=params)
    unfused = gc.compile(g, backend=backend, params=params, passes=UNFUSED)
    assert len(residual_nodes(fused.graph)) == 1
    x = rng.standard_normal((4, 5, 7, 2)).astype(np.float32)
    assert np.array_equal(fused(x=x), unfused(x=x))


def test_not_fused_where_the_sum_or_the_conv_result_is_needed():
    g = block()
    add = next(n for n in g.nodes if n.op == "add")
    conv_out = next(v for v in add.inputs if v.producer is not None and v.producer.op == "bias_add")
    g.output(conv_out)                                    # the conv + bias result is also a result
    assert residual_nodes(run_pipeline(g, "inference").graph) == []
    g = block()
    add = next(n for n in g.nodes if n.op == "add")
    g.output(add.outputs[0])            # the sum is a result: conv+bias+add fuse, the relu stays apart
    opt = run_pipeline(g, "inference").graph
    assert len(residual_nodes(opt)) == 1 and residual_nodes(opt)[0].attrs["activation"] == "linear"
    assert any(n.op == "relu" for n in opt.nodes)
    g2 = ir.Graph("broadcast")
    x = g2.input("x", (None, 4, 4, 2))
    z = emit("conv2d", x, g2.param("w", (1, 1, 2, 2)), g2.param("b", (2,)))
    g2.output(emit("relu", emit("add", z, g2.param("c", (2,)))))     # a broadcast add is not a residual
    assert residual_nodes(run_pipeline(g2, "inference").graph) == []
    g3 = ir.Graph("twice")
    x = g3.input("x", (None, 4, 4, 2))
    z = emit("conv2d", x, g3.param("w", (1, 1, 2, 2)), g3.param("b", (2,)))
    g3.output(emit("relu", emit("add", z, z)))                        # add(y, y): no skip value
    assert residual_nodes(run_pipeline(g3, "inference").graph) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_with_residual_fusion_equals_without(backend):
    from ir.training import make_training_graph
    fwd = block()
    g = ir.Graph("train_block")
    # a loss on the block output: mse against a target
    g = fwd
    out = g.outputs[0]
    t = g.input("t", out.shape)
    loss = emit("mse", emit("flatten", out), emit("flatten", t))
    g.output(loss)
    tg = make_training_graph(g, loss.name, "sgd", {"lr": 0.05})
    rng = np.random.default_rng(3)
    params = params_for(fwd, rng)
    # each executable its own copies: compile keeps float32 arrays as given, and a step updates them
    train_fused = gc.compile(tg, backend=backend, params={k: v.copy() for k, v in params.items()},
                             passes="training")
    train_plain = gc.compile(tg, backend=backend, params={k: v.copy() for k, v in params.items()},
                             passes=[p for p in PIPELINES["training"] if p != "fuse_bias_activation"])
    assert len(residual_nodes(train_fused.graph)) == 1
    for step in range(3):
        x = rng.standard_normal((4, 5, 7, 3)).astype(np.float32)
        tt = rng.standard_normal((4, 5, 7, 3)).astype(np.float32)
        feeds = {k: v for k, v in {"x": x, "t": tt}.items() if k in [n for n, _ in train_fused.inputs]}
        ra, rb = train_fused(**feeds), train_plain(**feeds)
        for a, b in zip(ra if isinstance(ra, tuple) else (ra,), rb if isinstance(rb, tuple) else (rb,)):
            assert np.array_equal(a, b), f"{backend} step {step}"
    for k in train_fused.state:
        assert np.array_equal(train_fused.state[k], train_plain.state[k]), k


def test_residual_operand_is_checked_and_round_trips():
    g = ir.Graph("r")
    x = g.input("x", (None, 4, 4, 2))
    w, b = g.param("w", (3, 3, 2, 3)), g.param("b", (3,))
    with pytest.raises(IRError, match="residual must have the output's type"):
        emit("conv2d", x, w, b, g.input("r", (None, 4, 4, 3)))      # valid padding: output 2x2
    r = g.input("r2", (None, 2, 2, 3))
    y = emit("conv2d", x, w, b, r, activation="relu")
    g.output(y)
    text = print_graph(g)
    assert print_graph(parse_graph(text)) == text
    gw = ir.Graph("g")
    x = gw.input("x", (None, 4, 4, 4))
    with pytest.raises(IRError, match="needs groups=1"):
        emit("conv2d", x, gw.param("w", (1, 1, 2, 4)), gw.param("b", (4,)), gw.input("r", (None, 4, 4, 4)), groups=2)


def test_resnet8_inference_graph_fuses_every_block_tail():
    import runpy
    from pathlib import Path
    ns = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "resnet8.py"))
    m = ns["build_model"]((28, 28, 1))
    m.build()
    opt = run_pipeline(m.inference_graph(), "inference").graph
    # (the adds left compute folded BN biases from params; no add of two activations remains)
    assert len(residual_nodes(opt)) == 3
    assert not any(n.op == "add" and all(v.type.batched for v in n.inputs) for n in opt.nodes)
    x = np.random.default_rng(4).standard_normal((2, 28, 28, 1)).astype(np.float32)
    a = gc.compile(m.inference_graph(), backend="llvm", params=m.weights)(x=x)
    b = gc.compile(m.inference_graph(), backend="numpy", params=m.weights, passes=UNFUSED)(x=x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
