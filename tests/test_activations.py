"""The activation table (ir/ops/activations.py): every entry is an op with a gradient op, both backends
implement it, parametric activations fuse into conv2d/dense and round-trip through text and JSON, and
fused vs unfused results are bit-identical on random data with NaN and inf (on each backend), against an
independent float64 reference written here.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import graphcnn as gc
import ir
from graphcnn import ops
from ir.ops import REGISTRY, activations
from ir.types import IRError

BACKENDS = ("llvm", "numpy")
INFERENCE = ["verify", "drop_dropout", "fold_constants", "cse", "fuse_bias_activation", "dce", "plan_memory"]
UNFUSED = [p for p in INFERENCE if p != "fuse_bias_activation"]

# (name, params) cases: every table entry, parametric ones with defaults and with explicit values
CASES = [("relu", {}), ("sigmoid", {}), ("tanh", {}), ("leaky_relu", {}), ("leaky_relu", {"alpha": 0.05}),
         ("leaky_relu", {"alpha": 0.0}), ("clip", {"min_value": 0.0, "max_value": 6.0}),
         ("clip", {"max_value": 0.5}), ("clip", {"min_value": -1.25}), ("clip", {})]


def ref_forward(name, x, p):
    """Independent float64 definitions."""
    x = x.astype(np.float64)
    if name == "relu":
        return np.where(np.isnan(x), x, np.maximum(x, 0))
    if name == "sigmoid":
        with np.errstate(over="ignore"):
            return 1 / (1 + np.exp(-x))
    if name == "tanh":
        return np.tanh(x)
    if name == "leaky_relu":
        return np.where(x > 0, x, p.get("alpha", 0.3) * x)
    if name == "clip":
        lo, hi = p.get("min_value"), p.get("max_value")
        y = x if lo is None else np.where(np.isnan(x), x, np.maximum(x, lo))
        return y if hi is None else np.where(np.isnan(y), y, np.minimum(y, hi))
    raise AssertionError(name)


def ref_slope(name, y, p):
    """d activation / dx as a function of the output y (float64)."""
    if name == "relu":
        return (y > 0).astype(np.float64)
    if name == "sigmoid":
        return y * (1 - y)
    if name == "tanh":
        return 1 - y * y
    if name == "leaky_relu":
        return np.where(y > 0, 1.0, p.get("alpha", 0.3))
    if name == "clip":
        lo, hi = p.get("min_value"), p.get("max_value")
        inside = np.ones(y.shape, bool)
        if lo is not None:
            inside &= y > lo
        if hi is not None:
            inside &= y < hi
        return inside.astype(np.float64)
    raise AssertionError(name)


def special_data(rng, shape):
    """Normal data with NaN, +-inf, +-0, huge and tiny values sprinkled in."""
    x = rng.normal(0, 3, shape).astype(np.float32)
    flat = x.reshape(-1)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 1e-30, 6.0, 0.5, -1.25],
                        np.float32)
    idx = rng.choice(flat.size, size=min(flat.size, 3 * specials.size), replace=False)
    flat[idx] = np.resize(specials, idx.size)
    return x


def same_bits(a, b, what):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, what
    # equal values, equal NaN positions (NaN payloads may differ); -0.0 vs 0.0 would show as a bit difference
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(nan_a, nan_b, err_msg=f"{what}: NaN positions differ")
    np.testing.assert_array_equal(a.view(np.uint32)[~nan_a], b.view(np.uint32)[~nan_b], err_msg=what)


def close_to_ref(got, want, what):
    got = np.asarray(got, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN positions")
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=3e-6, atol=1e-6, err_msg=what)


# ------------------------------------------------------------------------------------------------------
# the table is the one list

def test_every_table_entry_is_an_op_with_a_gradient_in_both_backends():
    from backends.llvm.lowering import LOWERINGS
    from backends.numpy import kernels as K
    from graphcnn.layers import ACTIVATIONS as LAYER_ACTIVATIONS
    from ir.passes.fuse_bias_activation import FUSABLE_ACTIVATIONS
    for name, spec in activations.TABLE.items():
        assert name in LAYER_ACTIVATIONS
        if name == "linear":
            continue
        assert name in REGISTRY and spec.grad_op in REGISTRY
        assert REGISTRY[name].attrs == dict(spec.params) == REGISTRY[spec.grad_op].attrs
        assert name in LOWERINGS and spec.grad_op in LOWERINGS
        assert callable(getattr(K, name)) and callable(getattr(K, spec.grad_op))
        assert name in FUSABLE_ACTIVATIONS


def test_parameters_are_validated_with_clear_errors():
    g = gc.Graph("bad")
    x = g.input("x", (None, 3))
    with pytest.raises(IRError, match="alpha.*>= 0"):
        ops.leaky_relu(x, alpha=-0.1)
    with pytest.raises(IRError, match="finite"):
        ops.leaky_relu(x, alpha=float("nan"))
    with pytest.raises(IRError, match="min_value.*larger than max_value"):
        ops.clip(x, min_value=2, max_value=1)
    with pytest.raises(IRError, match="finite number or None"):
        ops.clip(x, max_value=float("inf"))
    with pytest.raises(IRError, match="finite"):
        ops.clip(x, min_value="0")
    w = g.input("w", (3, 2))
    with pytest.raises(IRError, match="unknown activation 'elu'"):
        gc.ops.dense(x, w).graph.add_node("dense", [x, w], {"activation": "elu"})
    with pytest.raises(IRError, match="has no parameter"):
        g.add_node("dense", [x, w], {"activation": "relu", "activation_params": {"alpha": 1.0}})
    with pytest.raises(IRError, match="leaky_relu alpha"):
        g.add_node("dense", [x, w], {"activation": "leaky_relu", "activation_params": (("alpha", -1.0),)})


# ------------------------------------------------------------------------------------------------------
# standalone ops: forward and gradient vs the float64 reference, NaN positions included

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_standalone_activation_and_gradient(case, backend):
    name, p = CASES[case]
    g = gc.Graph(f"act{case}")
    x = g.input("x", (None, 37))
    dy = g.input("dy", (None, 37))
    y = ops.relu(x) if name == "relu" else getattr(ops, name)(x, **p) if p or name in ("leaky_relu", "clip") \
        else getattr(ops, name)(x)
    grad_op = activations.TABLE[name].grad_op
    dx = ir.ops.emit(grad_op, y, dy, **p)
    g.output(y, dx)
    rng = np.random.default_rng(case)
    for n in (1, 4):
        xv, dyv = special_data(rng, (n, 37)), special_data(rng, (n, 37))
        y_got, dx_got = gc.compile(g, backend=backend)(x=xv, dy=dyv)
        y_ref = ref_forward(name, xv, p)
        if name in ("sigmoid", "tanh"):      # transcendental: a few ulp
            np.testing.assert_array_equal(np.isnan(y_got), np.isnan(y_ref))
            ok = ~np.isnan(y_ref)
            np.testing.assert_allclose(y_got[ok], y_ref[ok], rtol=1e-6, atol=1e-7)
        else:
            close_to_ref(y_got, y_ref, f"{name}{p} forward")
        y32 = np.asarray(y_got, np.float32).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            dx_ref = dyv.astype(np.float64) * ref_slope(name, y32, p)
            # the float32 slope (1 - y*y, y*(1 - y)) rounds once or twice: an error of ~1 ulp of 1 times |dy|
            slack = 1.2e-7 * np.abs(dyv.astype(np.float64))
        dx_got = np.asarray(dx_got, np.float64)
        np.testing.assert_array_equal(np.isnan(dx_got), np.isnan(dx_ref), err_msg=f"{name}{p} gradient NaNs")
        ok = np.isfinite(dx_ref)
        np.testing.assert_array_equal(dx_got[~ok & ~np.isnan(dx_ref)], dx_ref[~ok & ~np.isnan(dx_ref)])
        assert np.all(np.abs(dx_got[ok] - dx_ref[ok]) <= 1e-6 * np.abs(dx_ref[ok]) + slack[ok] + 1e-30), \
            f"{name}{p} gradient"


# ------------------------------------------------------------------------------------------------------
# fusion: parametric activations fuse, round-trip, and give the same bits as unfused code

def _fusable_graph(kind, name, p):
    g = gc.Graph(f"fuse_{kind}_{name}")
    if kind == "conv":
        x = g.input("x", (None, 6, 5, 3))
        w = g.input("w", (3, 2, 3, 19))
        b = g.input("b", (19,))
        z = ops.conv2d(x, w, b, padding=((1, 0), (0, 1)))
    else:
        x = g.input("x", (None, 13))
        w = g.input("w", (13, 21))
        b = g.input("b", (21,))
        z = ops.dense(x, w, b)
    g.output(getattr(ops, name)(x=z, **p) if p else getattr(ops, name)(z))
    return g


def test_parametric_activation_fuses_and_round_trips_text_and_json():
    g = _fusable_graph("dense", "leaky_relu", {"alpha": 0.125})
    fused = gc.compile(g, backend="numpy").pipeline.graph
    (node,) = fused.nodes
    assert node.op == "dense" and node.attrs["activation"] == "leaky_relu"
    assert node.attrs["activation_params"] == (("alpha", 0.125),)
    assert ir.parse_graph(ir.print_graph(fused)) == fused
    assert ir.graph_from_json(json.loads(json.dumps(ir.graph_to_json(fused)))) == fused
    g6 = _fusable_graph("conv", "clip", {"min_value": 0.0, "max_value": 6.0})
    (node,) = gc.compile(g6, backend="numpy").pipeline.graph.nodes
    assert node.op == "conv2d" and node.attrs["activation_params"] == (("min_value", 0.0), ("max_value", 6.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "dense"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_and_unfused_are_bit_identical(case, kind, backend):
    name, p = CASES[case]
    g = _fusable_graph(kind, name, p)
    fused = gc.compile(g, backend=backend, passes=INFERENCE)
    unfused = gc.compile(g, backend=backend, passes=UNFUSED)
    assert len(fused.pipeline.graph.nodes) == 1 and len(unfused.pipeline.graph.nodes) == 3
    rng = np.random.default_rng(100 + case)
    shapes = {v.name: v.type.shape for v in g.inputs}
    for n in (1, 3):
        feeds = {k: rng.normal(0, 4, tuple(n if d is None else d for d in s)).astype(np.float32)
                 for k, s in shapes.items()}
        # specials reach the activation through the bias (whole output channels: NaN, +-inf, +-0, huge,
        # the clip bounds) and, with n = 3, through a NaN / inf input element of sample 1
        feeds["b"] = special_data(rng, feeds["b"].shape)
        if n == 3:
            feeds["x"].reshape(n, -1)[1, :2] = (np.nan, np.inf)
        a, b = fused(**feeds), unfused(**feeds)
        assert np.isnan(a).any() and np.isfinite(a).any()
        same_bits(a, b, f"{backend} {kind}+{name}{p} fused vs unfused, n={n}")


@pytest.mark.parametrize("case", [1, 4, 6])
def test_fused_gradients_match_the_float64_reference(case):
    """Training through a fused dense + activation: d/dx, d/dw against float64 loops here."""
    name, p = CASES[case]
    g = gc.Graph(f"train_{name}")
    x = g.input("x", (None, 5))
    w = g.input("w", (5, 7))
    b = g.input("b", (7,))
    y = getattr(ops, name)(ops.dense(x, w, b), **p) if name != "sigmoid" else ops.sigmoid(ops.dense(x, w, b))
    t = g.input("t", (None, 7))
    g.output(ops.mse(y, t))
    gg = gc.grad(g, wrt=["x", "w"])
    rng = np.random.default_rng(case)
    feeds = {"x": rng.normal(0, 2, (4, 5)).astype(np.float32), "w": rng.normal(0, 1, (5, 7)).astype(np.float32),
             "b": rng.normal(0, 1, 7).astype(np.float32), "t": rng.normal(0, 1, (4, 7)).astype(np.float32)}
    x64, w64, b64, t64 = (feeds[k].astype(np.float64) for k in "xwbt")
    y64 = ref_forward(name, x64 @ w64 + b64, p)
    dz = 2 * (y64 - t64) / y64.size * ref_slope(name, y64, p)
    for backend in BACKENDS:
        _, dx, dw = gc.compile(gg, backend=backend)(**feeds)
        np.testing.assert_allclose(dx, dz @ w64.T, rtol=1e-4, atol=1e-6, err_msg=backend)
        np.testing.assert_allclose(dw, x64.T @ dz, rtol=1e-4, atol=1e-6, err_msg=backend)
