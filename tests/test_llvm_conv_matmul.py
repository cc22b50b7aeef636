"""Generated conv2d / dense / matmul kernels of the LLVM backend vs float64 NumPy references.

Every kernel of this file is built into ONE module and JIT-compiled once per session (compiling is the
slow part); each test then calls its kernel through ctypes on fresh random data, at batch 1 and 5.
"""
from __future__ import annotations

import ctypes
import itertools

import numpy as np
import pytest
from llvmlite import ir

from backends.llvm import jit
from backends.llvm.kernels.conv import (build_conv2d, build_conv2d_grad_filter, build_conv2d_grad_input,
                                        conv_geometry)
from backends.llvm.kernels.builder import scratch_need
from backends.llvm.kernels.matmul import TilePlan, build_dense, build_matmul, plan_tile

TARGET = jit.host_target()
ACTS = ("linear", "relu", "sigmoid", "tanh")
VALID = ((0, 0), (0, 0))

# (in_hwc, kernel_hw, filters, stride, padding, dilation): strides 1-2, valid / same / asymmetric
# padding, dilation 1-2, C in {1, 3, 32}, F in {6, 16, 32, 64}, kernels 3 and 5.
CONVS = [
    ((8, 8, 1), (3, 3), 6, (1, 1), VALID, (1, 1)),
    ((9, 7, 3), (5, 5), 16, (2, 2), ((2, 2), (2, 2)), (1, 1)),
    ((10, 9, 32), (3, 3), 32, (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((7, 8, 3), (3, 3), 64, (2, 1), ((0, 1), (1, 0)), (1, 2)),
    ((6, 6, 32), (5, 5), 6, (1, 1), ((2, 2), (2, 2)), (1, 1)),
    ((11, 10, 1), (5, 5), 32, (2, 2), VALID, (2, 2)),
    ((5, 5, 32), (3, 3), 16, (2, 2), ((1, 0), (0, 1)), (1, 1)),
    ((9, 9, 3), (3, 3), 64, (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((13, 13, 32), (3, 3), 64, (1, 1), VALID, (1, 1)),              # mnist_cnn conv2 (benchmarked)
    ((40, 40, 32), (3, 3), 16, (2, 2), ((1, 1), (1, 1)), (1, 1)),   # padded image > stack scratch limit
]
# forward variants: every activation with and without bias, spread over the geometries
CONV_FWD = [(i, act, bias) for i, (act, bias) in
            zip(itertools.cycle(range(len(CONVS))), itertools.product(ACTS, (True, False)))]
CONV_FWD += [(i, "relu", True) for i in range(len(CONV_FWD), len(CONVS))]
# forced tile shapes / loop order on one geometry: the generator must be right for any plan
CONV_PLANS = [(TilePlan(1, 1), "cols"), (TilePlan(4, 3), "rows"), (TilePlan(2, 5), "cols"),
              (TilePlan(8, 1), "rows"), (TilePlan(3, 2), "cols")]

DENSE = [(13, 5, act, bias) for act in ACTS for bias in (True, False)] + [(64, 37, "relu", True),
                                                                          (1600, 10, "linear", True)]
# (a_shape, b_shape, transpose_a, transpose_b); None = runtime batch n
MATMULS = [
    ((None, 13), (13, 5), False, False),
    ((None, 13), (5, 13), False, True),
    ((13, None), (13, 5), True, False),
    ((13, None), (5, 13), True, True),
    ((None, 7), (None, 5), True, False),      # x^T @ dy: the reduction dim is the batch
    ((None, 7), (5, None), True, True),
    ((7, 13), (13, 5), False, False),         # fully static
    ((None, 37), (29, 37), False, True),      # dy @ w^T with several column blocks + tails
    ((None, 29), (None, 45), True, False),
]


def _conv_name(kind, i, *extra):
    return "_".join([kind, str(i)] + [str(e).replace(" ", "") for e in extra])


def _build_all():
    module = ir.Module(name="test_llvm_conv_matmul")
    for i, act, bias in CONV_FWD:
        hwc, k, f, s, p, d = CONVS[i]
        build_conv2d(module, _conv_name("fwd", i, act, bias), in_hwc=hwc, kernel_hw=k, filters=f, stride=s,
                     padding=p, dilation=d, has_bias=bias, activation=act, target=TARGET)
    for i, (hwc, k, f, s, p, d) in enumerate(CONVS):
        build_conv2d_grad_input(module, _conv_name("gi", i), in_hwc=hwc, kernel_hw=k, filters=f, stride=s,
                                padding=p, dilation=d, target=TARGET)
        build_conv2d_grad_filter(module, _conv_name("gf", i), in_hwc=hwc, kernel_hw=k, filters=f, stride=s,
                                 padding=p, dilation=d, target=TARGET)
    hwc, k, f, s, p, d = CONVS[2]
    build_conv2d_grad_input(module, "gi_masked", in_hwc=hwc, kernel_hw=k, filters=f, stride=s, padding=p,
                            dilation=d, target=TARGET, output_mask=True)
    for j, (plan, order) in enumerate(CONV_PLANS):
        build_conv2d(module, f"fwd_plan_{j}", in_hwc=hwc, kernel_hw=k, filters=f, stride=s, padding=p,
                     dilation=d, has_bias=True, activation="relu", target=TARGET, plan=plan, loop_order=order)
        build_conv2d_grad_input(module, f"gi_plan_{j}", in_hwc=hwc, kernel_hw=k, filters=f, stride=s,
                                padding=p, dilation=d, target=TARGET, plan=plan)
        build_conv2d_grad_filter(module, f"gf_plan_{j}", in_hwc=hwc, kernel_hw=k, filters=f, stride=s,
                                 padding=p, dilation=d, target=TARGET, plan=plan)
    for j, (kin, units, act, bias) in enumerate(DENSE):
        build_dense(module, f"dense_{j}", in_features=kin, units=units, has_bias=bias, activation=act,
                    target=TARGET)
    build_dense(module, "dense_masked", in_features=13, units=11, has_bias=True, activation="linear",
                target=TARGET, output_mask=True)
    for j, (a, b, ta, tb) in enumerate(MATMULS):
        build_matmul(module, f"matmul_{j}", a_shape=a, b_shape=b, transpose_a=ta, transpose_b=tb,
                     target=TARGET)
    build_matmul(module, "matmul_masked", a_shape=(None, 13), b_shape=(9, 13), transpose_b=True,
                 target=TARGET, output_mask=True)
    return module


_SESSION = {}


@pytest.fixture(scope="session")
def kernels():
    """name -> ctypes-callable(*arrays, n); one JIT module for the whole file, kept alive."""
    if "jit" not in _SESSION:
        module = _build_all()
        _SESSION["module"] = module
        _SESSION["jit"] = jit.JitModule(str(module))
    engine, module = _SESSION["jit"], _SESSION["module"]

    def get(name):
        addr = engine.address(name)
        need = scratch_need(module.get_global(name))
        cache = {}

        def call(*arrays, n):
            key = len(arrays) + 1          # + the scratch pointer every GEMM-family kernel takes
            if key not in cache:
                cache[key] = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * key), ctypes.c_int64)(addr)
            scratch = aligned_scratch(need.bytes(n))
            cache[key](*[None if a is None else a.ctypes.data for a in arrays], scratch.ctypes.data, n)
        return call
    return get


def aligned_scratch(nbytes):
    """A 64-byte aligned buffer of nbytes filled with NaN bit patterns (stale scratch must not matter)."""
    raw = np.full(nbytes // 4 + 32, np.nan, np.float32)
    off = (-raw.ctypes.data) % 64 // 4
    return raw[off:]


# ------------------------------------------------------------------------------------------------
# float64 references (independent of the kernels: direct loops over taps)
# ------------------------------------------------------------------------------------------------

def _tap_slices(kh_i, kw_i, s, d, oh, ow):
    return (slice(kh_i * d[0], kh_i * d[0] + s[0] * (oh - 1) + 1, s[0]),
            slice(kw_i * d[1], kw_i * d[1] + s[1] * (ow - 1) + 1, s[1]))


def ref_conv(x, w, b, s, p, d, act):
    n = x.shape[0]
    kh, kw, c, f = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), p[0], p[1], (0, 0)))
    g = conv_geometry(x.shape[1:], (kh, kw), f, s, p, d)
    out = np.zeros((n, g.oh, g.ow, f))
    for i in range(kh):
        for j in range(kw):
            rs, cs = _tap_slices(i, j, s, d, g.oh, g.ow)
            out += np.einsum("nhwc,cf->nhwf", xp[:, rs, cs, :], w[i, j].astype(np.float64))
    if b is not None:
        out += b
    return ref_act(out, act)


def ref_act(z, act):
    if act == "relu":
        return np.maximum(z, 0)
    if act == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if act == "tanh":
        return np.tanh(z)
    return z


def ref_conv_grad_input(dy, w, x_shape, s, p, d):
    kh, kw, c, f = w.shape
    n, h, wd, _ = x_shape
    oh, ow = dy.shape[1:3]
    dxp = np.zeros((n, h + sum(p[0]), wd + sum(p[1]), c))
    for i in range(kh):
        for j in range(kw):
            rs, cs = _tap_slices(i, j, s, d, oh, ow)
            dxp[:, rs, cs, :] += np.einsum("nhwf,cf->nhwc", dy.astype(np.float64), w[i, j].astype(np.float64))
    return dxp[:, p[0][0]:p[0][0] + h, p[1][0]:p[1][0] + wd, :]


def ref_conv_grad_filter(x, dy, w_shape, s, p, d):
    kh, kw, c, f = w_shape
    xp = np.pad(x.astype(np.float64), ((0, 0), p[0], p[1], (0, 0)))
    oh, ow = dy.shape[1:3]
    out = np.zeros(w_shape)
    for i in range(kh):
        for j in range(kw):
            rs, cs = _tap_slices(i, j, s, d, oh, ow)
            out[i, j] = np.einsum("nhwc,nhwf->cf", xp[:, rs, cs, :], dy.astype(np.float64))
    return out


def assert_close(got, want, rtol=1e-4):
    """Within rtol of the reference, relative to the reference's scale (sums can cancel to ~0)."""
    assert got.shape == want.shape
    assert np.all(np.isfinite(got)), "kernel produced non-finite values"
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def rand(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("i,act,bias", CONV_FWD)
def test_conv2d_forward(kernels, i, act, bias, n):
    hwc, k, f, s, p, d = CONVS[i]
    rng = np.random.default_rng(i * 10 + n)
    x, w, b = rand(rng, (n,) + hwc), rand(rng, k + (hwc[2], f)) * 0.3, rand(rng, (f,))
    g = conv_geometry(hwc, k, f, s, p, d)
    out = np.full((n, g.oh, g.ow, f), np.nan, np.float32)
    kernels(_conv_name("fwd", i, act, bias))(x, w, b if bias else None, None, out, n=n)
    assert_close(out, ref_conv(x, w, b if bias else None, s, p, d, act))


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("i", range(len(CONVS)))
def test_conv2d_grad_input(kernels, i, n):
    hwc, k, f, s, p, d = CONVS[i]
    rng = np.random.default_rng(100 + i * 10 + n)
    g = conv_geometry(hwc, k, f, s, p, d)
    dy, w = rand(rng, (n, g.oh, g.ow, f)), rand(rng, k + (hwc[2], f))
    out = np.full((n,) + hwc, np.nan, np.float32)
    kernels(_conv_name("gi", i))(dy, w, out, n=n)
    assert_close(out, ref_conv_grad_input(dy, w, out.shape, s, p, d))


@pytest.mark.parametrize("n", [0, 1, 5])
@pytest.mark.parametrize("i", range(len(CONVS)))
def test_conv2d_grad_filter(kernels, i, n):
    hwc, k, f, s, p, d = CONVS[i]
    rng = np.random.default_rng(200 + i * 10 + n)
    g = conv_geometry(hwc, k, f, s, p, d)
    x, dy = rand(rng, (n,) + hwc), rand(rng, (n, g.oh, g.ow, f))
    out = np.full(k + (hwc[2], f), np.nan, np.float32)
    kernels(_conv_name("gf", i))(x, dy, out, n=n)
    assert_close(out, ref_conv_grad_filter(x, dy, out.shape, s, p, d))


@pytest.mark.parametrize("j", range(len(CONV_PLANS)))
def test_conv2d_any_tile_plan(kernels, j):
    hwc, k, f, s, p, d = CONVS[2]
    n = 3
    rng = np.random.default_rng(300 + j)
    g = conv_geometry(hwc, k, f, s, p, d)
    x, w, b = rand(rng, (n,) + hwc), rand(rng, k + (hwc[2], f)), rand(rng, (f,))
    dy = rand(rng, (n, g.oh, g.ow, f))
    out = np.full((n, g.oh, g.ow, f), np.nan, np.float32)
    kernels(f"fwd_plan_{j}")(x, w, b, None, out, n=n)
    assert_close(out, ref_conv(x, w, b, s, p, d, "relu"))
    dx = np.full(x.shape, np.nan, np.float32)
    kernels(f"gi_plan_{j}")(dy, w, dx, n=n)
    assert_close(dx, ref_conv_grad_input(dy, w, x.shape, s, p, d))
    dw = np.full(w.shape, np.nan, np.float32)
    kernels(f"gf_plan_{j}")(x, dy, dw, n=n)
    assert_close(dw, ref_conv_grad_filter(x, dy, w.shape, s, p, d))


def test_conv2d_grad_input_fused_relu_mask(kernels):
    hwc, k, f, s, p, d = CONVS[2]
    n = 2
    rng = np.random.default_rng(7)
    g = conv_geometry(hwc, k, f, s, p, d)
    dy, w, y = rand(rng, (n, g.oh, g.ow, f)), rand(rng, k + (hwc[2], f)), rand(rng, (n,) + hwc)
    out = np.full(y.shape, np.nan, np.float32)
    kernels("gi_masked")(dy, w, y, out, n=n)
    assert_close(out, ref_conv_grad_input(dy, w, y.shape, s, p, d) * (y > 0))


def test_conv2d_batch_zero_writes_nothing(kernels):
    hwc, k, f, s, p, d = CONVS[0]
    sentinel = np.full((1, 6, 6, f), 7.0, np.float32)
    kernels(_conv_name("fwd", 0, "linear", True))(np.zeros((1,) + hwc, np.float32),
                                                  np.zeros(k + (hwc[2], f), np.float32),
                                                  np.zeros(f, np.float32), None, sentinel, n=0)
    assert np.all(sentinel == 7.0)


# ------------------------------------------------------------------------------------------------
# dense / matmul
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5, 7])
@pytest.mark.parametrize("j", range(len(DENSE)))
def test_dense(kernels, j, n):
    kin, units, act, bias = DENSE[j]
    rng = np.random.default_rng(400 + j * 10 + n)
    x, w, b = rand(rng, (n, kin)), rand(rng, (kin, units)) * 0.3, rand(rng, (units,))
    out = np.full((n, units), np.nan, np.float32)
    kernels(f"dense_{j}")(x, w, b if bias else None, out, n=n)
    z = x.astype(np.float64) @ w + (b if bias else 0)
    assert_close(out, ref_act(z, act))


def test_dense_activation_extremes(kernels):
    """sigmoid/tanh saturate cleanly (no overflow NaN/inf) and stay accurate near 0."""
    j_sig = DENSE.index((13, 5, "sigmoid", False))
    j_tanh = DENSE.index((13, 5, "tanh", False))
    x = np.zeros((4, 13), np.float32)
    x[:, 0] = [-200.0, -1e-6, 3e-4, 95.0]
    w = np.zeros((13, 5), np.float32)
    w[0] = [1.0, 0.5, -1.0, 2.0, 1e-3]
    z = x.astype(np.float64) @ w
    for j, act in ((j_sig, "sigmoid"), (j_tanh, "tanh")):
        out = np.full((4, 5), np.nan, np.float32)
        kernels(f"dense_{j}")(x, w, None, out, n=4)
        want = ref_act(z, act)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-30)


def test_dense_fused_relu_mask(kernels):
    rng = np.random.default_rng(9)
    n = 6
    x, w, b, y = rand(rng, (n, 13)), rand(rng, (13, 11)), rand(rng, (11,)), rand(rng, (n, 11))
    out = np.full((n, 11), np.nan, np.float32)
    kernels("dense_masked")(x, w, b, y, out, n=n)
    assert_close(out, (x.astype(np.float64) @ w + b) * (y > 0))


@pytest.mark.parametrize("n", [1, 5, 7])
@pytest.mark.parametrize("j", range(len(MATMULS)))
def test_matmul(kernels, j, n):
    a_shape, b_shape, ta, tb = MATMULS[j]
    rng = np.random.default_rng(500 + j * 10 + n)
    a = rand(rng, tuple(n if d is None else d for d in a_shape))
    b = rand(rng, tuple(n if d is None else d for d in b_shape))
    want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b)
    out = np.full(want.shape, np.nan, np.float32)
    kernels(f"matmul_{j}")(a, b, out, n=n)
    assert_close(out, want)


def test_matmul_batch_reduction_of_zero_rows_gives_zeros(kernels):
    j = MATMULS.index(((None, 7), (None, 5), True, False))
    out = np.full((7, 5), np.nan, np.float32)
    kernels(f"matmul_{j}")(np.zeros((1, 7), np.float32), np.zeros((1, 5), np.float32), out, n=0)
    assert np.all(out == 0.0)


def test_matmul_fused_relu_mask(kernels):
    rng = np.random.default_rng(11)
    n = 5
    a, b, y = rand(rng, (n, 13)), rand(rng, (9, 13)), rand(rng, (n, 9))
    out = np.full((n, 9), np.nan, np.float32)
    kernels("matmul_masked")(a, b, y, out, n=n)
    assert_close(out, (a.astype(np.float64) @ b.T) * (y > 0))


# ------------------------------------------------------------------------------------------------
# generated code and argument checking
# ------------------------------------------------------------------------------------------------

def test_generated_code_is_vectorized_for_the_host():
    module = ir.Module()
    build_conv2d(module, "conv", in_hwc=(13, 13, 32), kernel_hw=(3, 3), filters=64, has_bias=True,
                 activation="relu", target=TARGET)
    assert f'"prefer-vector-width"="{TARGET.vector_bits}"' in str(module)
    asm = jit.JitModule(str(module)).asm
    reg = {512: "%zmm", 256: "%ymm", 128: "%xmm"}[TARGET.vector_bits]
    assert asm.count(reg) > 100
    assert "vfmadd" in asm or TARGET.vector_bits == 128
    # the register tile stays in registers: no vector spills to the stack
    assert "(%rsp)" not in "\n".join(l for l in asm.splitlines() if reg in l)


def test_planner_respects_register_budget():
    for rows, cols, k in [(121, 64, 288), (676, 32, 9), (None, 10, 1600), (9, 6, 100)]:
        p = plan_tile(rows, cols, TARGET, k)
        regs = 32 if TARGET.vector_bits >= 512 else 16
        assert p.mr * p.nv + p.nv + 1 <= regs
        assert rows is None or p.mr <= rows


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_hwc=(8, 8), kernel_hw=(3, 3), filters=4), "in_hwc"),
    (dict(in_hwc=(8, 8, 1), kernel_hw=(3, 0), filters=4), "kernel_hw"),
    (dict(in_hwc=(8, 8, 1), kernel_hw=(3, 3), filters=0), "filters"),
    (dict(in_hwc=(8, 8, 1), kernel_hw=(3, 3), filters=4, stride=(0, 1)), "stride"),
    (dict(in_hwc=(8, 8, 1), kernel_hw=(3, 3), filters=4, padding=((1, -1), (0, 0))), "padding"),
    (dict(in_hwc=(8, 8, 1), kernel_hw=(3, 3), filters=4, dilation=(1,)), "dilation"),
    (dict(in_hwc=(2, 8, 1), kernel_hw=(3, 3), filters=4), "empty"),
    (dict(in_hwc=(8, 8, 1), kernel_hw=(3, 3), filters=4, activation="gelu"), "activation"),
])
def test_conv2d_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_conv2d(ir.Module(), "k", target=TARGET, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(a_shape=(None, 3), b_shape=(4, 5)), "reduction"),
    (dict(a_shape=(None, None), b_shape=(4, 5)), "a_shape"),
    (dict(a_shape=(3, 4), b_shape=(4, None)), "columns"),
    (dict(a_shape=(3, 4, 1), b_shape=(4, 5)), "a_shape"),
    (dict(a_shape=(3, 0), b_shape=(0, 5)), "a_shape"),
])
def test_matmul_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_matmul(ir.Module(), "k", target=TARGET, **kwargs)


def test_dense_rejects_bad_arguments():
    with pytest.raises(ValueError, match="units"):
        build_dense(ir.Module(), "k", in_features=3, units=0, has_bias=False, target=TARGET)
    with pytest.raises(ValueError, match="activation"):
        build_dense(ir.Module(), "k", in_features=3, units=2, has_bias=False, activation="elu", target=TARGET)
    m = ir.Module()
    build_dense(m, "k", in_features=3, units=2, has_bias=False, target=TARGET)
    with pytest.raises(ValueError, match="already defined"):
        build_dense(m, "k", in_features=3, units=2, has_bias=False, target=TARGET)


@pytest.mark.parametrize("bits", [128, 512])
def test_other_vector_widths_compute_the_same(bits):
    """The generator adapts to 4 / 16 float lanes (SSE / AVX-512 hosts). LLVM legalizes wider vectors
    on this host, so the lane-count-generic code (masks, tails, planner) is checked for correctness
    here even without such a CPU."""
    target = jit.HostTarget(TARGET.triple, TARGET.cpu, TARGET.features, bits)
    assert target.vector_lanes == bits // 32
    hwc, k, f, s, p, d = (7, 6, 3), (3, 3), 21, (1, 2), ((1, 1), (0, 2)), (1, 1)
    module = ir.Module()
    build_conv2d(module, "fwd", in_hwc=hwc, kernel_hw=k, filters=f, stride=s, padding=p, dilation=d,
                 has_bias=True, activation="sigmoid", target=target)
    build_conv2d_grad_input(module, "gi", in_hwc=hwc, kernel_hw=k, filters=f, stride=s, padding=p,
                            dilation=d, target=target)
    build_conv2d_grad_filter(module, "gf", in_hwc=hwc, kernel_hw=k, filters=f, stride=s, padding=p,
                             dilation=d, target=target)
    build_matmul(module, "mm", a_shape=(None, 19), b_shape=(37, 19), transpose_b=True, target=target)
    engine = jit.JitModule(str(module))
    def call(name, nptr):
        fn = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * (nptr + 1)), ctypes.c_int64)(engine.address(name))
        need = scratch_need(module.get_global(name))
        def run(*args):
            scratch = aligned_scratch(need.bytes(args[-1]))      # alive until the call returns
            fn(*args[:-1], scratch.ctypes.data, args[-1])
        return run
    rng = np.random.default_rng(bits)
    n = 3
    g = conv_geometry(hwc, k, f, s, p, d)
    x, w, b = rand(rng, (n,) + hwc), rand(rng, k + (hwc[2], f)), rand(rng, (f,))
    dy = rand(rng, (n, g.oh, g.ow, f))
    y = np.full(dy.shape, np.nan, np.float32)
    call("fwd", 5)(x.ctypes.data, w.ctypes.data, b.ctypes.data, None, y.ctypes.data, n)
    assert_close(y, ref_conv(x, w, b, s, p, d, "sigmoid"))
    dx = np.full(x.shape, np.nan, np.float32)
    call("gi", 3)(dy.ctypes.data, w.ctypes.data, dx.ctypes.data, n)
    assert_close(dx, ref_conv_grad_input(dy, w, x.shape, s, p, d))
    dw = np.full(w.shape, np.nan, np.float32)
    call("gf", 3)(x.ctypes.data, dy.ctypes.data, dw.ctypes.data, n)
    assert_close(dw, ref_conv_grad_filter(x, dy, w.shape, s, p, d))
    a, bm = rand(rng, (n, 19)), rand(rng, (37, 19))
    out = np.full((n, 37), np.nan, np.float32)
    call("mm", 2)(a.ctypes.data, bm.ctypes.data, out.ctypes.data, n)
    assert_close(out, a.astype(np.float64) @ bm.T)
