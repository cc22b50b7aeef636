"""LLVM builder core and memory-bound kernels (pool, elementwise, loss, optimizer) vs independent references:
naive float64 loop kernels written here, closed forms, and the contract's dropout hash re-implemented here.
The NumPy backend's kernels serve as a second reference where they exist.

Every kernel of this file is registered at import time and built into ONE module that is JIT-compiled once
per session (compiling is the slow part); tests then call kernels through ctypes at batch 1 and 5.
"""
from __future__ import annotations

import ctypes
import itertools
import math
import mmap

import numpy as np
import pytest
from llvmlite import ir

from backends.llvm import jit
from backends.llvm.kernels import elementwise as E
from backends.llvm.kernels import loss as L
from backends.llvm.kernels import optimizer as O
from backends.llvm.kernels import pool as P
from backends.llvm.kernels.builder import KernelBuilder

try:
    from backends.numpy import kernels as NK
except ImportError:  # pragma: no cover - the NumPy kernels are a second reference only
    NK = None

TARGET = jit.host_target()
BATCHES = (1, 5)

# ------------------------------------------------------------------------------------------------------
# one module for the whole file

_KERNELS: dict[str, tuple] = {}        # name -> (builder, kwargs)


def kernel(name: str, builder, **kwargs) -> str:
    _KERNELS[name] = (builder, kwargs)
    return name


def _build_math_probes(module):
    """Scalar and vector probes of the builder's math: out[i] = f(x[i]) for f in exp/log/sigmoid/tanh."""
    for fname in ("exp", "log", "sigmoid", "tanh"):
        for vector in (False, True):
            kb = KernelBuilder(module, f"probe_{fname}_{'v' if vector else 's'}", 2, TARGET)
            x, out = kb.args
            if vector:
                with kb.for_range(kb.n, step=kb.lanes) as lp:     # n must be a multiple of lanes
                    kb.store_vec(getattr(kb, fname)(kb.load_vec(x, lp.index)), out, lp.index)
            else:
                with kb.for_range(kb.n) as lp:
                    kb.store(getattr(kb, fname)(kb.load(x, lp.index)), out, lp.index)
            kb.finish()
    # loop-carried sums: out[0] = sum_{i<n} x[i]; out[1] = sum over a constant 0-trip loop (stays 7)
    kb = KernelBuilder(module, "probe_loops", 2, TARGET)
    x, out = kb.args
    with kb.for_range(kb.n, unroll=False, vectorize=False) as lp:
        acc = lp.carry(kb.const(0.0))
        lp.next(acc, kb.b.fadd(acc, kb.load(x, lp.index)))
    kb.store(lp.result(acc), out, 0)
    with kb.for_range(0) as lz:
        acc0 = lz.carry(kb.const(7.0))
        lz.next(acc0, kb.b.fadd(acc0, kb.const(1.0)))
    kb.store(lz.result(acc0), out, 1)
    # nested carried loops with runtime start: out[2] = sum_{i<n} sum_{j in [i, n)} 1
    with kb.for_range(kb.n) as li:
        outer = li.carry(kb.const(0.0))
        with kb.for_range(kb.n, start=li.index, unroll=4) as lj:
            inner = lj.carry(outer)
            lj.next(inner, kb.b.fadd(inner, kb.const(1.0)))
        li.next(outer, lj.result(inner))
    kb.store(li.result(outer), out, 2)
    kb.finish()


_JIT = {}


@pytest.fixture(scope="module")
def jm():
    if "module" not in _JIT:
        module = ir.Module(name="test_llvm_kernels")
        _build_math_probes(module)
        for name, (builder, kwargs) in _KERNELS.items():
            builder(module, name, target=TARGET, **kwargs)
        _JIT["module"] = jit.JitModule(str(module))
    return _JIT["module"]


def call(jm, name, *arrays, n, ints=()):
    """Call kernel `name` with float32 arrays (or None = null pointer), extra i64 ints, then n."""
    for a in arrays:
        assert a is None or (a.dtype == np.float32 and a.flags.c_contiguous)
    proto = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * len(arrays)), *([ctypes.c_int64] * (len(ints) + 1)))
    fn = proto(jm.address(name))
    fn(*[None if a is None else a.ctypes.data for a in arrays], *ints, n)


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def assert_close(got, want, rtol, atol=0.0):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------------
# builder core

def _probe(jm, fname, x, vector):
    x = f32(x)
    out = np.empty_like(x)
    call(jm, f"probe_{fname}_{'v' if vector else 's'}", x, out, n=x.size)
    return out


def _probe_inputs(lanes):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 4096), rng.normal(0, 20, 4096), np.linspace(-100, 100, 4001),
                        [0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.62, 0.63, -0.624, 88.0, -87.0, 200.0, -200.0]])
    return f32(x[: len(x) - len(x) % lanes])


@pytest.mark.parametrize("vector", [False, True])
def test_builder_sigmoid_tanh_accuracy_and_no_overflow(jm, vector):
    x = _probe_inputs(TARGET.vector_lanes)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        sig = 1.0 / (1.0 + np.exp(-x64))
    got = _probe(jm, "sigmoid", x, vector)
    assert np.all(np.isfinite(got)) and np.all((got >= 0) & (got <= 1))
    big = sig > 1e-30                 # below that the float32 result is (near) denormal: compare absolutely
    assert_close(got[big], sig[big], rtol=1e-6)
    assert np.max(np.abs(got[~big] - sig[~big])) < 1e-30
    got = _probe(jm, "tanh", x, vector)
    assert_close(got, np.tanh(x64), rtol=1e-6, atol=1e-37)
    assert np.signbit(got[x == 0]).tolist() == np.signbit(x[x == 0]).tolist()


@pytest.mark.parametrize("vector", [False, True])
def test_builder_exp_log(jm, vector):
    x = _probe_inputs(TARGET.vector_lanes)
    x64 = x.astype(np.float64)
    got = _probe(jm, "exp", x, vector)
    ok = np.abs(x64) < 87
    assert_close(got[ok], np.exp(x64[ok]), rtol=1e-6)
    assert np.all(got[x64 > 88.5] == np.inf) and np.all(got[x64 < -88] == 0.0)
    pos = f32(np.abs(x) + 1e-20)
    assert_close(_probe(jm, "log", pos, vector), np.log(pos.astype(np.float64)), rtol=1e-6, atol=1e-7)
    lanes = TARGET.vector_lanes
    special = f32(([0.0, -1.0, np.inf, np.nan, 1.0, 2.0, 1e-7, 1 - 1e-7] * lanes)[:lanes * 2])
    got = _probe(jm, "log", special, vector)[:8]
    assert got[0] == -np.inf and np.isnan(got[1]) and got[2] == np.inf and np.isnan(got[3])
    assert got[4] == 0.0
    assert_close(got[5:], np.log(special[5:8].astype(np.float64)), rtol=1e-6)


@pytest.mark.parametrize("n", [0, 1, 5, 37])
def test_builder_loops_with_carried_values(jm, n):
    x = f32(np.arange(1, n + 2))
    out = np.zeros(3, np.float32)
    call(jm, "probe_loops", x, out, n=n)
    assert out.tolist() == [float(n * (n + 1) // 2), 7.0, float(n * (n + 1) // 2)]


def test_builder_function_attributes():
    module = ir.Module()
    kb = KernelBuilder(module, "k", 2, TARGET)
    kb.finish()
    text = str(module)
    assert f'"prefer-vector-width"="{TARGET.vector_bits}"' in text and "nounwind" in text
    assert "define void @\"k\"(ptr %\"a0\", ptr %\"a1\", i64 %\"n\")" in text
    with pytest.raises(ValueError, match="already defined"):
        KernelBuilder(module, "k", 1, TARGET)
    with pytest.raises(ValueError, match="activation"):
        KernelBuilder(ir.Module(), "k2", 0, TARGET).activation("gelu", kb.const(1.0))


# ------------------------------------------------------------------------------------------------------
# pooling: naive float64 references

def ref_windows(h, w, pool, stride, pads):
    """For every output (oh, ow): the list of in-image taps (i, j) in row-major window order."""
    (pt, pb), (pl, pr) = pads
    oh = (h + pt + pb - pool[0]) // stride[0] + 1
    ow = (w + pl + pr - pool[1]) // stride[1] + 1
    wins = {}
    for a in range(oh):
        for c in range(ow):
            wins[a, c] = [(a * stride[0] - pt + di, c * stride[1] - pl + dj)
                          for di in range(pool[0]) for dj in range(pool[1])
                          if 0 <= a * stride[0] - pt + di < h and 0 <= c * stride[1] - pl + dj < w]
    return oh, ow, wins


def ref_max_pool(x, pool, stride, pads):
    n, h, w, c = x.shape
    oh, ow, wins = ref_windows(h, w, pool, stride, pads)
    out = np.empty((n, oh, ow, c))
    for (a, b), taps in wins.items():
        out[:, a, b] = np.max([x[:, i, j] for i, j in taps], axis=0)
    return out


def ref_max_pool_grad(x, dy, pool, stride, pads):
    n, h, w, c = x.shape
    _, _, wins = ref_windows(h, w, pool, stride, pads)
    dx = np.zeros(x.shape)
    for (a, b), taps in wins.items():
        for s in range(n):
            for ch in range(c):
                vals = [x[s, i, j, ch] for i, j in taps]
                i, j = taps[int(np.argmax(vals))]           # argmax: the first maximum
                dx[s, i, j, ch] += dy[s, a, b, ch]
    return dx


def ref_avg_pool(x, pool, stride, pads, include_pad):
    n, h, w, c = x.shape
    oh, ow, wins = ref_windows(h, w, pool, stride, pads)
    out = np.empty((n, oh, ow, c))
    for (a, b), taps in wins.items():
        div = pool[0] * pool[1] if include_pad else len(taps)
        out[:, a, b] = np.sum([x[:, i, j].astype(np.float64) for i, j in taps], axis=0) / div
    return out


def ref_avg_pool_grad(dy, in_hwc, pool, stride, pads, include_pad):
    h, w, c = in_hwc
    n = dy.shape[0]
    _, _, wins = ref_windows(h, w, pool, stride, pads)
    dx = np.zeros((n, h, w, c))
    for (a, b), taps in wins.items():
        div = pool[0] * pool[1] if include_pad else len(taps)
        for i, j in taps:
            dx[:, i, j] += dy[:, a, b] / div
    return dx


VALID = ((0, 0), (0, 0))
ASYM = ((1, 0), (0, 1))
# (pool, stride, padding, channels): pool 2-3, stride 1-2, valid / explicit asymmetric padding; channels
# 3 (partial vector), 13 (vector + tail), 40 (a full block of 4 vectors + a block with one vector)
POOLS = [((p, p), (s, s), pad, c) for (p, s, pad), c in
         zip(itertools.product((2, 3), (1, 2), (VALID, ASYM)), itertools.cycle((3, 13, 40)))]
POOLS += [((3, 2), (2, 1), ((2, 0), (1, 1)), 8), ((2, 2), (2, 2), ((1, 1), (1, 1)), 1),
          ((2, 2), (2, 2), ((0, 1), (0, 0)), 5)]          # windows tile the image: grads skip zeroing
POOL_HWC = (7, 6)

for _i, (_pool, _stride, _pad, _c) in enumerate(POOLS):
    _kw = {"in_hwc": POOL_HWC + (_c,), "pool": _pool, "stride": _stride, "padding": _pad}
    kernel(f"maxpool{_i}", P.build_max_pool2d, **_kw)
    kernel(f"maxpool_grad{_i}", P.build_max_pool2d_grad, **_kw)
    for _inc in (False, True):
        kernel(f"avgpool{_i}_{_inc}", P.build_avg_pool2d, count_include_pad=_inc, **_kw)
        kernel(f"avgpool_grad{_i}_{_inc}", P.build_avg_pool2d_grad, count_include_pad=_inc, **_kw)


def _pool_out_hw(pool, stride, pad):
    oh, ow, _ = ref_windows(*POOL_HWC, pool, stride, pad)
    return oh, ow


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("case", range(len(POOLS)))
def test_max_pool2d_and_grad(jm, case, n):
    pool, stride, pad, c = POOLS[case]
    rng = np.random.default_rng(case)
    # small integers: many ties, so the first-maximum rule is exercised
    x = f32(rng.integers(-4, 5, (n,) + POOL_HWC + (c,)))
    oh, ow = _pool_out_hw(pool, stride, pad)
    out = np.full((n, oh, ow, c), np.nan, np.float32)
    call(jm, f"maxpool{case}", x, out, n=n)
    np.testing.assert_array_equal(out, ref_max_pool(x, pool, stride, pad))
    dy = f32(rng.normal(size=out.shape))
    dx = np.full_like(x, np.nan)
    call(jm, f"maxpool_grad{case}", x, dy, dx, n=n)
    assert_close(dx, ref_max_pool_grad(x, dy, pool, stride, pad), rtol=1e-4, atol=1e-6)
    if NK is not None:
        want = np.empty_like(x)
        NK.max_pool2d_grad(x, dy, want, pool, stride, pad)
        assert_close(dx, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("include_pad", [False, True])
@pytest.mark.parametrize("case", range(len(POOLS)))
def test_avg_pool2d_and_grad(jm, case, include_pad, n):
    pool, stride, pad, c = POOLS[case]
    rng = np.random.default_rng(100 + case)
    x = f32(rng.normal(size=(n,) + POOL_HWC + (c,)))
    oh, ow = _pool_out_hw(pool, stride, pad)
    out = np.full((n, oh, ow, c), np.nan, np.float32)
    call(jm, f"avgpool{case}_{include_pad}", x, out, n=n)
    assert_close(out, ref_avg_pool(x, pool, stride, pad, include_pad), rtol=1e-5, atol=1e-6)
    dy = f32(rng.normal(size=out.shape))
    dx = np.full_like(x, np.nan)
    call(jm, f"avgpool_grad{case}_{include_pad}", dy, dx, n=n)
    assert_close(dx, ref_avg_pool_grad(dy, POOL_HWC + (c,), pool, stride, pad, include_pad), rtol=1e-4, atol=1e-6)


GAP_SHAPES = [(5, 4, 37), (3, 3, 8), (1, 1, 3)]
for _i, _s in enumerate(GAP_SHAPES):
    kernel(f"gap{_i}", P.build_global_avg_pool2d, in_hwc=_s)
    kernel(f"gap_grad{_i}", P.build_global_avg_pool2d_grad, in_hwc=_s)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("case", range(len(GAP_SHAPES)))
def test_global_avg_pool2d_and_grad(jm, case, n):
    h, w, c = GAP_SHAPES[case]
    rng = np.random.default_rng(case)
    x = f32(rng.normal(size=(n, h, w, c)))
    out = np.empty((n, c), np.float32)
    call(jm, f"gap{case}", x, out, n=n)
    assert_close(out, x.astype(np.float64).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    dx = np.empty_like(x)
    call(jm, f"gap_grad{case}", out, dx, n=n)
    assert_close(dx, np.broadcast_to(out[:, None, None, :] / (h * w), x.shape), rtol=1e-5)


def test_pool_rejects_bad_arguments():
    m = ir.Module()
    with pytest.raises(ValueError, match="padding"):
        P.build_max_pool2d(m, "a", in_hwc=(4, 4, 1), pool=2, stride=2, padding=((2, 0), (0, 0)), target=TARGET)
    with pytest.raises(ValueError, match="stride"):
        P.build_avg_pool2d(m, "b", in_hwc=(4, 4, 1), pool=2, stride=0, padding=VALID, target=TARGET)
    with pytest.raises(ValueError, match="in_hwc"):
        P.build_max_pool2d(m, "c", in_hwc=(4, 4), pool=2, stride=2, padding=VALID, target=TARGET)
    with pytest.raises(ValueError, match="larger"):
        P.build_max_pool2d(m, "d", in_hwc=(2, 2, 1), pool=3, stride=1, padding=VALID, target=TARGET)


# ------------------------------------------------------------------------------------------------------
# elementwise maps

UNARY_SHAPE = (None, 3, 37)          # 111 per sample: vector strips plus a tail
for _op in ("relu", "sigmoid", "tanh"):
    kernel(_op, E.build_activation, kind=_op, shape=UNARY_SHAPE)
    kernel(f"{_op}_grad", E.build_activation_grad, kind=_op, shape=UNARY_SHAPE)
kernel("neg", E.build_neg, shape=UNARY_SHAPE)
kernel("scale", E.build_scale, shape=UNARY_SHAPE, factor=-0.37)
kernel("relu_static", E.build_activation, kind="relu", shape=(4, 5))

UNARY_REF = {
    "relu": lambda x: np.maximum(x, 0),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "tanh": np.tanh,
    "neg": np.negative,
    "scale": lambda x: x * np.float32(-0.37),
}
GRAD_REF = {
    "relu": lambda y, dy: dy * (y > 0),
    "sigmoid": lambda y, dy: dy * y * (1 - y),
    "tanh": lambda y, dy: dy * (1 - y * y),
}


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("op", list(UNARY_REF))
def test_unary(jm, op, n):
    rng = np.random.default_rng(3)
    x = f32(rng.normal(0, 4, (n,) + UNARY_SHAPE[1:]))
    out = np.full_like(x, np.nan)
    call(jm, op, x, out, n=n)
    assert_close(out, UNARY_REF[op](x.astype(np.float64)), rtol=1e-5, atol=1e-30)
    # in place: out is x
    y = x.copy()
    call(jm, op, y, y, n=n)
    np.testing.assert_array_equal(y, out)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("op", list(GRAD_REF))
def test_unary_grad(jm, op, n):
    rng = np.random.default_rng(4)
    y = f32(UNARY_REF[op](rng.normal(0, 2, (n,) + UNARY_SHAPE[1:])))
    dy = f32(rng.normal(size=y.shape))
    out = np.full_like(y, np.nan)
    call(jm, f"{op}_grad", y, dy, out, n=n)
    assert_close(out, GRAD_REF[op](y.astype(np.float64), dy.astype(np.float64)), rtol=1e-4, atol=1e-7)
    call(jm, f"{op}_grad", y, dy, dy, n=n)                  # in place on dy
    np.testing.assert_array_equal(dy, out)


def test_static_shape_ignores_n(jm):
    x = f32(np.arange(-10, 10).reshape(4, 5))
    out = np.empty_like(x)
    call(jm, "relu_static", x, out, n=123)
    np.testing.assert_array_equal(out, np.maximum(x, 0))


# (a_shape, b_shape): bias-like, scalar, batch-dynamic on either side, both dynamic, fully static
BINARY_CASES = [
    ((None, 3, 10), (10,)),
    ((), (None, 4)),
    ((None, 9), ()),
    ((1, 3, 1), (None, 1, 10)),
    ((None, 1, 10), (3, 1)),
    ((None, 6, 17), (None, 6, 17)),
    ((None, 6, 1), (None, 1, 17)),
    ((4, 5), (5,)),
    ((None, 1), (1, 21)),
]
for _i, (_a, _b) in enumerate(BINARY_CASES):
    for _op in ("add", "sub", "mul"):
        kernel(f"{_op}{_i}", getattr(E, f"build_{_op}"), a_shape=_a, b_shape=_b)


def _concrete(shape, n):
    return tuple(n if d is None else d for d in shape)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("op", ["add", "sub", "mul"])
@pytest.mark.parametrize("case", range(len(BINARY_CASES)))
def test_binary_broadcasting(jm, case, op, n):
    a_shape, b_shape = BINARY_CASES[case]
    rng = np.random.default_rng(case)
    a = f32(rng.normal(size=_concrete(a_shape, n)))
    b = f32(rng.normal(size=_concrete(b_shape, n)))
    want = {"add": np.add, "sub": np.subtract, "mul": np.multiply}[op](a, b)
    out = np.full(want.shape, np.nan, np.float32)
    call(jm, f"{op}{case}", a, b, out, n=n)
    np.testing.assert_array_equal(out, want)            # one float32 op per element: exact


def test_binary_in_place(jm):
    n = 5
    a = f32(np.random.default_rng(0).normal(size=(n, 6, 17)))
    b = f32(np.random.default_rng(1).normal(size=(n, 6, 17)))
    want = a + b
    call(jm, "add5", a, b, a, n=n)
    np.testing.assert_array_equal(a, want)


def test_binary_rejects_bad_shapes():
    m = ir.Module()
    with pytest.raises(ValueError, match="do not broadcast"):
        E.build_add(m, "a", a_shape=(None, 3), b_shape=(4,), target=TARGET)
    with pytest.raises(ValueError, match="do not broadcast"):
        E.build_add(m, "b", a_shape=(None, 3), b_shape=(2, 3), target=TARGET)
    with pytest.raises(ValueError, match="axis 1"):
        E.build_mul(m, "c", a_shape=(3, None), b_shape=(3, 1), target=TARGET)
    with pytest.raises(ValueError, match="op must be"):
        E.build_binary(m, "d", op="pow", a_shape=(3,), b_shape=(3,), target=TARGET)


BIAS_SHAPES = [(None, 6, 6, 13), (None, 10), (None, 3, 32)]
for _i, _s in enumerate(BIAS_SHAPES):
    kernel(f"bias_add{_i}", E.build_bias_add, shape=_s)
    kernel(f"bias_add_grad{_i}", E.build_bias_add_grad, shape=_s)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("case", range(len(BIAS_SHAPES)))
def test_bias_add_and_grad(jm, case, n):
    shape = _concrete(BIAS_SHAPES[case], n)
    rng = np.random.default_rng(case)
    x = f32(rng.normal(size=shape))
    b = f32(rng.normal(size=shape[-1:]))
    out = np.empty_like(x)
    call(jm, f"bias_add{case}", x, b, out, n=n)
    np.testing.assert_array_equal(out, x + b)
    g = np.full(shape[-1:], np.nan, np.float32)
    call(jm, f"bias_add_grad{case}", x, g, n=n)
    assert_close(g, x.astype(np.float64).reshape(-1, shape[-1]).sum(0), rtol=1e-5, atol=1e-5)


# (x_shape, out_shape): reduce the batch, keep it, reduce inner / middle / leading axes, identity
SUM_TO_CASES = [
    ((None, 3, 10), (3, 1)),
    ((None, 3, 10), (None, 1, 10)),
    ((None, 3, 10), (10,)),
    ((None, 3, 10), (None, 3, 1)),
    ((None, 3, 10), ()),
    ((None, 4, 5, 6), (4, 1, 6)),
    ((None, 7), (None, 7)),
    ((2, 3, 37), (2, 1, 37)),
]
for _i, (_x, _o) in enumerate(SUM_TO_CASES):
    kernel(f"sum_to{_i}", E.build_sum_to, x_shape=_x, out_shape=_o)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("case", range(len(SUM_TO_CASES)))
def test_sum_to(jm, case, n):
    x_shape, out_shape = (_concrete(s, n) for s in SUM_TO_CASES[case])
    x = f32(np.random.default_rng(case).normal(size=x_shape))
    lead = len(x_shape) - len(out_shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, (o, d) in enumerate(zip(out_shape, x_shape[lead:]))
                                      if o == 1 and d != 1)
    want = x.astype(np.float64).sum(axis=axes, keepdims=True).reshape(out_shape)
    out = np.full(out_shape, np.nan, np.float32)
    call(jm, f"sum_to{case}", x, out, n=n)
    assert_close(out, want, rtol=1e-5, atol=1e-5)


kernel("copy", E.build_copy, shape=(None, 3, 7))
TRANSPOSES = [((None, 3, 4, 5), (0, 3, 1, 2)), ((None, 3, 4, 5), (0, 2, 1, 3)), ((3, 4), (1, 0)),
              ((2, 3, 4), (2, 0, 1))]
for _i, (_s, _p) in enumerate(TRANSPOSES):
    kernel(f"transpose{_i}", E.build_transpose, in_shape=_s, perm=_p)


@pytest.mark.parametrize("n", BATCHES)
def test_copy(jm, n):
    x = f32(np.random.default_rng(0).normal(size=(n, 3, 7)))
    out = np.empty_like(x)
    call(jm, "copy", x, out, n=n)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("case", range(len(TRANSPOSES)))
def test_transpose(jm, case, n):
    shape, perm = TRANSPOSES[case]
    x = f32(np.random.default_rng(case).normal(size=_concrete(shape, n)))
    want = np.ascontiguousarray(x.transpose(perm))
    out = np.empty_like(want)
    call(jm, f"transpose{case}", x, out, n=n)
    np.testing.assert_array_equal(out, want)


def test_transpose_rejects_bad_perm():
    with pytest.raises(ValueError, match="permutation"):
        E.build_transpose(ir.Module(), "t", in_shape=(None, 3), perm=(0, 0), target=TARGET)
    with pytest.raises(ValueError, match="batch"):
        E.build_transpose(ir.Module(), "t", in_shape=(None, 3), perm=(1, 0), target=TARGET)


# ------------------------------------------------------------------------------------------------------
# softmax family

SOFTMAX_CASES = [((None, 10), -1), ((None, 3, 19), 1), ((None, 3, 19), -1), ((4, 33), 1)]
for _i, (_s, _ax) in enumerate(SOFTMAX_CASES):
    for _op in ("softmax", "log_softmax", "softmax_grad", "log_softmax_grad"):
        kernel(f"{_op}{_i}", getattr(E, f"build_{_op}"), shape=_s, axis=_ax)


def ref_softmax(x, axis):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("case", range(len(SOFTMAX_CASES)))
def test_softmax_family(jm, case, n):
    shape, axis = SOFTMAX_CASES[case]
    rng = np.random.default_rng(case)
    x = f32(rng.normal(0, 5, _concrete(shape, n)))
    x.flat[0] = 80.0                     # large logits must not overflow
    sm = ref_softmax(x, axis)
    out = np.full_like(x, np.nan)
    call(jm, f"softmax{case}", x, out, n=n)
    assert_close(out, sm, rtol=1e-5, atol=1e-9)
    lsm = np.log(sm)
    call(jm, f"log_softmax{case}", x, out, n=n)
    assert_close(out, lsm, rtol=1e-5, atol=1e-5)
    dy = f32(rng.normal(size=x.shape))
    y = f32(sm)
    want = sm * (dy - np.sum(dy * sm, axis=axis, keepdims=True))
    call(jm, f"softmax_grad{case}", y, dy, out, n=n)
    assert_close(out, want, rtol=1e-4, atol=1e-6)
    y = f32(lsm)
    want = dy - sm * np.sum(dy, axis=axis, keepdims=True)
    call(jm, f"log_softmax_grad{case}", y, dy, out, n=n)
    assert_close(out, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# dropout: masks bit-identical to the contract's hash

def ref_mix32(h):
    """mix32 of the contract on uint64 arrays holding uint32 values (independent of the NumPy backend)."""
    m = np.uint64(0xFFFFFFFF)
    h = h & m
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x7FEB352D)) & m
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x846CA68B)) & m
    h ^= h >> np.uint64(16)
    return h


def ref_keep(size, rate, seed, step, base=0):
    key = ref_mix32(np.array([(seed * 0x9E3779B9 + step) & 0xFFFFFFFF], np.uint64))[0]
    idx = (np.arange(base, base + size, dtype=np.uint64) & np.uint64(0xFFFFFFFF)) ^ key
    return ref_mix32(idx) >= np.uint64(math.floor(rate * 2 ** 32))


DROPOUT_CASES = [(0.5, 0), (0.3, 5), (0.9, 12345), (0.1, 2 ** 32 - 1), (0.0, 3)]
DROP_SHAPE = (None, 1009)            # 101 samples -> 101,909 elements (> 1e5)
for _i, (_r, _s) in enumerate(DROPOUT_CASES):
    kernel(f"dropout{_i}", E.build_dropout, shape=DROP_SHAPE, rate=_r, seed=_s)
    kernel(f"dropout_grad{_i}", E.build_dropout_grad, shape=DROP_SHAPE, rate=_r, seed=_s)
kernel("dropout_base", E.build_dropout, shape=DROP_SHAPE, rate=0.5, seed=7, index_base=True)
kernel("dropout_nostep", E.build_dropout, shape=(None, 3, 11), rate=0.25, seed=9, has_step=False)


@pytest.mark.parametrize("step", [0, 1, 977, 2 ** 20 + 3])
@pytest.mark.parametrize("case", range(len(DROPOUT_CASES)))
def test_dropout_mask_exact(jm, case, step):
    rate, seed = DROPOUT_CASES[case]
    n = 101
    x = f32(np.random.default_rng(case).normal(size=(n, DROP_SHAPE[1])) + 3.0)   # no zeros in x
    st = np.array(step, np.float32)
    keep = ref_keep(x.size, rate, seed, step).reshape(x.shape)
    out = np.full_like(x, np.nan)
    call(jm, f"dropout{case}", x, st, out, n=n)
    np.testing.assert_array_equal(out != 0, keep)
    want = (x * keep) / np.float32(1 - rate)
    np.testing.assert_array_equal(out, want)
    if NK is not None:
        np.testing.assert_array_equal(NK.dropout_mask(x.shape, rate, seed, step), keep)
        ref = np.empty_like(x)
        NK.dropout(x, ref, rate, seed, step)
        np.testing.assert_array_equal(out, ref)
    grad = np.full_like(x, np.nan)
    call(jm, f"dropout_grad{case}", x, st, grad, n=n)
    np.testing.assert_array_equal(grad, want)
    if rate:
        assert abs((~keep).mean() - rate) < 0.01


def test_dropout_index_base_and_no_step(jm):
    n, first = 101, 37
    x = f32(np.random.default_rng(0).normal(size=(n, DROP_SHAPE[1])) + 3.0)
    st = np.array(11, np.float32)
    whole = np.empty_like(x)
    call(jm, "dropout_base", x, st, whole, n=n, ints=(0,))
    np.testing.assert_array_equal(whole != 0, ref_keep(x.size, 0.5, 7, 11).reshape(x.shape))
    part = np.empty_like(x[first:])
    call(jm, "dropout_base", f32(x[first:]), st, part, n=n - first, ints=(first * DROP_SHAPE[1],))
    np.testing.assert_array_equal(part, whole[first:])
    x = f32(np.random.default_rng(1).normal(size=(5, 3, 11)) + 3.0)
    out = np.empty_like(x)
    call(jm, "dropout_nostep", x, out, n=5)
    np.testing.assert_array_equal(out != 0, ref_keep(x.size, 0.25, 9, 0).reshape(x.shape))


def test_dropout_rejects_bad_rate():
    with pytest.raises(ValueError, match="rate"):
        E.build_dropout(ir.Module(), "d", shape=(None, 3), rate=1.0, seed=0, target=TARGET)


# ------------------------------------------------------------------------------------------------------
# losses: closed forms in float64

K = 10
for _fl in (False, True):
    kernel(f"scce{_fl}", L.build_sparse_categorical_crossentropy, num_classes=K, from_logits=_fl)
    kernel(f"scce_grad{_fl}", L.build_sparse_categorical_crossentropy_grad, num_classes=K, from_logits=_fl)
    kernel(f"cce{_fl}", L.build_categorical_crossentropy, num_classes=K, from_logits=_fl)
    kernel(f"cce_grad{_fl}", L.build_categorical_crossentropy_grad, num_classes=K, from_logits=_fl)
kernel("scce_k3", L.build_sparse_categorical_crossentropy, num_classes=3, from_logits=True)
kernel("mse", L.build_mse, shape=(None, 3, 7))
kernel("mse_grad", L.build_mse_grad, shape=(None, 3, 7))

EPS = np.float64(np.float32(1e-7))
ONE_M_EPS = np.float64(np.float32(1 - 1e-7))


def _loss_inputs(n, from_logits, rng):
    if from_logits:
        p = f32(rng.normal(0, 3, (n, K)))
    else:
        p = f32(ref_softmax(rng.normal(0, 3, (n, K)), -1))
        p[0, :3] = [0.0, 1.0, 1e-9]            # exercise the clip (and its zero gradient)
    labels = rng.integers(0, K, n)
    return p, labels


def ref_scce(p, labels, from_logits):
    p = p.astype(np.float64)
    rows = np.arange(len(p))
    if from_logits:
        m = p.max(1)
        lse = np.log(np.exp(p - m[:, None]).sum(1)) + m
        per = lse - p[rows, labels]
        grad = ref_softmax(p, -1)
        grad[rows, labels] -= 1
    else:
        q = np.clip(p, EPS, ONE_M_EPS)
        per = np.log(q.sum(1)) - np.log(q[rows, labels])
        grad = np.repeat(1 / q.sum(1, keepdims=True), p.shape[1], 1)
        grad[rows, labels] -= 1 / q[rows, labels]
        grad *= (p > EPS) & (p < ONE_M_EPS)
    return per.mean(), grad / len(p)


def ref_cce(p, y, from_logits):
    p, y = p.astype(np.float64), y.astype(np.float64)
    if from_logits:
        log_q = np.log(ref_softmax(p, -1))
        grad = ref_softmax(p, -1) * y.sum(1, keepdims=True) - y
    else:
        q = np.clip(p, EPS, ONE_M_EPS)
        log_q = np.log(q) - np.log(q.sum(1, keepdims=True))
        grad = (y.sum(1, keepdims=True) / q.sum(1, keepdims=True) - y / q) * ((p > EPS) & (p < ONE_M_EPS))
    return -(y * log_q).sum(1).mean(), grad / len(p)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("from_logits", [False, True])
def test_sparse_categorical_crossentropy(jm, from_logits, n):
    rng = np.random.default_rng(n)
    p, labels = _loss_inputs(n, from_logits, rng)
    lab = f32(labels)                                   # labels travel as float32
    want_loss, want_grad = ref_scce(p, labels, from_logits)
    out = np.full((), np.nan, np.float32)
    call(jm, f"scce{from_logits}", p, lab, out, n=n)
    assert_close(out, want_loss, rtol=1e-5)
    dloss = np.array(0.75, np.float32)
    grad = np.full_like(p, np.nan)
    call(jm, f"scce_grad{from_logits}", p, lab, dloss, grad, n=n)
    assert_close(grad, want_grad * 0.75, rtol=1e-4, atol=1e-7)
    if NK is not None:
        ref = np.empty((), np.float32)
        NK.sparse_categorical_crossentropy(p, labels, ref, from_logits=from_logits)
        assert_close(out, ref, rtol=1e-5)


def test_sparse_crossentropy_closed_form(jm):
    # uniform logits over 3 classes: every row's loss is log(3)
    p = np.zeros((4, 3), np.float32)
    out = np.empty((), np.float32)
    call(jm, "scce_k3", p, f32([0, 1, 2, 1]), out, n=4)
    assert_close(out, math.log(3), rtol=1e-6)


def _guarded(nfloats):
    """A float32 array of nfloats placed between two PROT_NONE pages: any read outside it segfaults."""
    page = mmap.PAGESIZE
    assert nfloats * 4 <= page
    buf = mmap.mmap(-1, 3 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    # the array ends exactly where the upper guard page begins
    arr = np.frombuffer(buf, np.float32, count=nfloats, offset=2 * page - nfloats * 4)
    assert libc.mprotect(base, page, 0) == 0 and libc.mprotect(base + 2 * page, page, 0) == 0

    def release():
        libc.mprotect(base, 3 * page, mmap.PROT_READ | mmap.PROT_WRITE)
    return arr, release


@pytest.mark.parametrize("from_logits", [False, True])
def test_sparse_crossentropy_bad_labels_stay_in_bounds(jm, from_logits):
    n = 4
    p, release = _guarded(n * K)
    try:
        p[:] = f32(np.random.default_rng(0).uniform(0.01, 1, n * K))
        labels = f32([-1e9, 1e9, np.nan, K])           # the caller's error: must not read outside p
        out = np.empty((), np.float32)
        call(jm, f"scce{from_logits}", p, labels, out, n=n)
        grad = np.empty((n, K), np.float32)
        call(jm, f"scce_grad{from_logits}", p, labels, np.array(1, np.float32), grad, n=n)
        assert np.isfinite(out) and np.all(np.isfinite(grad))
    finally:
        release()


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("from_logits", [False, True])
def test_categorical_crossentropy(jm, from_logits, n):
    rng = np.random.default_rng(10 + n)
    p, labels = _loss_inputs(n, from_logits, rng)
    y = f32(np.eye(K)[labels] * 0.8 + rng.uniform(0, 0.04, (n, K)))      # soft targets
    want_loss, want_grad = ref_cce(p, y, from_logits)
    out = np.full((), np.nan, np.float32)
    call(jm, f"cce{from_logits}", p, y, out, n=n)
    assert_close(out, want_loss, rtol=1e-5)
    grad = np.full_like(p, np.nan)
    call(jm, f"cce_grad{from_logits}", p, y, np.array(2.0, np.float32), grad, n=n)
    assert_close(grad, want_grad * 2.0, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("n", BATCHES)
def test_mse(jm, n):
    rng = np.random.default_rng(n)
    p = f32(rng.normal(size=(n, 3, 7)))
    y = f32(rng.normal(size=(n, 3, 7)))
    out = np.full((), np.nan, np.float32)
    call(jm, "mse", p, y, out, n=n)
    d = p.astype(np.float64) - y
    assert_close(out, np.mean(d * d), rtol=1e-5)
    grad = np.full_like(p, np.nan)
    call(jm, "mse_grad", p, y, np.array(3.0, np.float32), grad, n=n)
    assert_close(grad, 2 * d / d.size * 3.0, rtol=1e-4)


def test_loss_gradients_match_finite_differences(jm):
    """The closed-form references above are themselves checked against central differences (float64)."""
    rng = np.random.default_rng(0)
    for from_logits in (False, True):
        p, labels = _loss_inputs(3, from_logits, rng)
        p = np.clip(p, 1e-3, 0.9) if not from_logits else p
        y = np.eye(K)[labels] * 0.9 + 0.01
        losses = (lambda q, lab=labels, fl=from_logits: ref_scce(q, lab, fl),
                  lambda q, yt=y, fl=from_logits: ref_cce(q, yt, fl))
        for loss_fn in losses:
            _, grad = loss_fn(p)
            fd = np.zeros_like(grad)
            h = 1e-6
            for idx in np.ndindex(p.shape):
                hi, lo = p.astype(np.float64), p.astype(np.float64)
                hi[idx] += h
                lo[idx] -= h
                fd[idx] = (loss_fn(hi)[0] - loss_fn(lo)[0]) / (2 * h)
            assert_close(grad, fd, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------------
# optimizers

SIZE = 1003                                          # vector strips plus a tail
kernel("sgd_plain", O.build_sgd_update, size=SIZE)
kernel("sgd_momentum", O.build_sgd_update, size=SIZE, momentum=0.9)
kernel("sgd_nesterov", O.build_sgd_update, size=SIZE, momentum=0.9, nesterov=True)
kernel("adam", O.build_adam_update, size=SIZE)
kernel("adam_custom", O.build_adam_update, size=SIZE, beta_1=0.8, beta_2=0.99, epsilon=1e-4)


def _state(seed):
    rng = np.random.default_rng(seed)
    return [f32(rng.normal(size=SIZE)) for _ in range(3)]


@pytest.mark.parametrize("variant", ["plain", "momentum", "nesterov"])
def test_sgd_update(jm, variant):
    w, g, vel = _state(1)
    w64, g64, v64 = (a.astype(np.float64) for a in (w, g, vel))
    if variant == "plain":
        call(jm, "sgd_plain", w, g, np.array(0.1, np.float32), n=0)
        assert_close(w, w64 - 0.1 * g64, rtol=1e-5, atol=1e-7)
        return
    call(jm, f"sgd_{variant}", w, g, np.array(0.05, np.float32), vel, n=0)
    v_new = 0.9 * v64 - 0.05 * g64
    w_new = w64 + (0.9 * v_new - 0.05 * g64 if variant == "nesterov" else v_new)
    assert_close(vel, v_new, rtol=1e-5, atol=1e-6)
    assert_close(w, w_new, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 7, 1000])
@pytest.mark.parametrize("name,lr,b1,b2,eps", [("adam", 1e-3, 0.9, 0.999, 1e-7),
                                               ("adam_custom", 0.01, 0.8, 0.99, 1e-4)])
def test_adam_update(jm, name, lr, b1, b2, eps, t):
    w, g, m = _state(t)
    v = f32(np.abs(_state(t + 1)[0]))
    w64, g64, m64, v64 = (a.astype(np.float64) for a in (w, g, m, v))
    if NK is not None:
        nw, nm, nv = w.copy(), m.copy(), v.copy()
        NK.adam_update(nw, g, np.float32(lr), np.float32(t), nm, nv, b1, b2, eps)
    call(jm, name, w, g, np.array(lr, np.float32), np.array(t, np.float32), m, v, n=0)
    m_new = m64 + (g64 - m64) * (1 - b1)
    v_new = v64 + (g64 * g64 - v64) * (1 - b2)
    alpha = float(np.float32(lr)) * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    w_new = w64 - alpha * m_new / (np.sqrt(v_new) + eps)
    assert_close(m, m_new, rtol=1e-5, atol=1e-7)
    assert_close(v, v_new, rtol=1e-5, atol=1e-7)
    assert_close(w, w_new, rtol=1e-5, atol=1e-7)
    if NK is not None:
        assert_close(w, nw, rtol=1e-6, atol=1e-8)


def test_optimizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"sgd_update: unknown setting\(s\) \['lr'\]"):
        O.build_sgd_update(ir.Module(), "s", size=3, lr=0.1, target=TARGET)   # lr is an operand now
    with pytest.raises(ValueError, match=r"beta_1 must be in \[0.0, 1.0\)"):
        O.build_adam_update(ir.Module(), "a", size=3, beta_1=1.0, target=TARGET)
    with pytest.raises(ValueError, match="size"):
        O.build_adam_update(ir.Module(), "a", size=-1, target=TARGET)


# ------------------------------------------------------------------------------------------------------
# the generated code is vectorized

def test_hot_loops_use_vector_registers(jm):
    text = jm.optimized_ir
    vec = f"<{TARGET.vector_lanes} x float>"
    for name in ("relu", "sigmoid", "add0", "maxpool4", "avgpool_grad4_False", "softmax0", "adam", "dropout1",
                 "sum_to2"):
        start = text.index(f'@{name}(') if f'@{name}(' in text else text.index(f'@"{name}"(')
        body = text[start:text.index("\n}", start)]
        assert vec in body, f"{name} has no {vec} operations"


# ------------------------------------------------------------------------------------------------------
# targets: the vector width follows the target, on any host (code for other CPUs is emitted, never run)

X86 = TARGET.triple.startswith("x86_64")


def _emit_for(target) -> tuple[str, str]:
    """(optimized IR, assembly) of a few kernels of odd sizes built for `target`."""
    module = ir.Module(name="width_probe")
    E.build_softmax(module, "softmax10", shape=(None, 10), axis=-1, target=target)
    E.build_activation(module, "relu3", kind="relu", shape=(None, 3), target=target)
    P.build_max_pool2d(module, "maxpool", in_hwc=(5, 5, 3), pool=2, stride=2, padding=VALID, target=target)
    from backends.llvm.kernels.matmul import build_dense
    build_dense(module, "dense", in_features=7, units=10, has_bias=True, activation="sigmoid", target=target)
    tm = jit.target_machine(3, reloc="pic", jit=False, target=target)
    opt = jit.optimize(str(module), 3, tm)
    return str(opt), tm.emit_assembly(opt)


def _function_body(text: str, name: str) -> str:
    start = text.index(f"@{name}(")
    return text[start:text.index("\n}", start)]


@pytest.mark.skipif(not X86, reason="x86-64 CPU names")
@pytest.mark.parametrize("cpu,bits", [("x86-64-v3", 256), ("x86-64-v4", 512), ("x86-64", 128)])
def test_kernels_for_another_cpu_use_its_vector_width(cpu, bits):
    target = jit.make_target(cpu)
    assert target.vector_bits == bits
    text, asm = _emit_for(target)
    lanes = bits // 32
    for name in ("softmax10", "relu3", "maxpool", "dense"):
        body = _function_body(text, name)
        # rows narrower than a register (10 or 3 floats) are one masked vector, not scalar code
        assert f"<{lanes} x float>" in body, f"{name} has no <{lanes} x float> operations for {cpu}"
        for wider in (8, 16):
            if wider > lanes:
                assert f"<{wider} x float>" not in body, f"{name} uses {wider}-float vectors on {cpu}"
    regs = {128: "xmm", 256: "ymm", 512: "zmm"}
    assert regs[bits] in asm
    for b, reg in regs.items():
        if b > bits:
            assert f"%{reg}" not in asm, f"{cpu} code uses {reg} registers"


@pytest.mark.skipif(not X86, reason="x86-64 CPU names")
def test_target_overrides_from_the_environment(monkeypatch):
    fresh = jit.host_target.__wrapped__        # host_target() itself is cached for the process
    monkeypatch.delenv(jit.CPU_ENV, raising=False)
    monkeypatch.delenv(jit.FEATURES_ENV, raising=False)
    host = fresh()
    monkeypatch.setenv(jit.CPU_ENV, "x86-64-v2")
    assert fresh().cpu == "x86-64-v2" and fresh().vector_bits == 128
    monkeypatch.delenv(jit.CPU_ENV)
    monkeypatch.setenv(jit.FEATURES_ENV, "-avx2,-avx")
    assert fresh().vector_bits == 128 and fresh().cpu == host.cpu
    for bad, match in [("avx2", "comma-separated"), ("+nosuchfeature", "not a recognized"),
                       ("+x;rm -rf /", "comma-separated")]:
        monkeypatch.setenv(jit.FEATURES_ENV, bad)
        with pytest.raises(jit.TargetError, match=match):
            fresh()
    monkeypatch.delenv(jit.FEATURES_ENV)
    monkeypatch.setenv(jit.CPU_ENV, "no-such-cpu")
    with pytest.raises(jit.TargetError, match="not a recognized processor"):
        fresh()
    if host.vector_bits < 512:      # asking for more than the host has is refused, not a SIGILL later
        monkeypatch.setenv(jit.CPU_ENV, "x86-64-v4")
        with pytest.raises(jit.TargetError, match="wider than this host"):
            fresh()
