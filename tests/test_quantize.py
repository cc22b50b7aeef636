"""int8 quantization (issue 15, first slice): the quantize / dequantize / conv2d_q / dense_q ops and int8
max_pool2d on both backends against naive integer loops written from ir/ops/quant.py's definitions
(Python ints, Python's round-half-even `round`; every `run` also asserts LLVM == NumPy bit for bit), the IR
text / JSON / .gcnn round trips, the LLVM backend's refusal of int8 values in float kernels, and mnist_cnn
after gc.quantize (accuracy, both backends identical)."""
import dataclasses
import importlib.util
import math
import os
from unittest import mock

import numpy as np
import pytest

import graphcnn as gc
from backends.llvm import jit
from backends.llvm.kernels.quant import vnni_intrinsic
from graphcnn.compiler import BackendFallbackWarning
from graphcnn.quantize import QuantizedRuntime
from ir.ops import emit
from ir.passes.quantize import ValueRange, activation_params, quantize_weights, range_from_values
from ir.serialize import graph_from_json, graph_to_json
from ir.text import parse_graph, print_graph
from ir.types import IRError

RANGES = {"u8": (0, 255), "i8": (-128, 127)}
NP = {"u8": np.uint8, "i8": np.int8}


# -- naive references (scalar loops) -------------------------------------------------------------------

def ref_round(v) -> int:
    return round(float(v))              # Python rounds half to even, like the ops' rint


def ref_quantize(x, scale, zp, dtype):
    lo, hi = RANGES[dtype]
    out = np.empty(x.shape, NP[dtype])
    for i, v in np.ndenumerate(x):
        r = np.float32(v) / np.float32(scale)          # one float32 division
        if math.isnan(r):
            q = zp
        elif math.isinf(r):
            q = hi if r > 0 else lo
        else:
            q = ref_round(r) + zp
        out[i] = min(hi, max(lo, q))
    return out


def ref_requant(acc, x_scale, w_scale_c, y_scale, zp, lo, hi, residual=None):
    """residual: (r - r_zero_point, r_scale) of a conv2d_q with a residual operand."""
    acc = (acc + 2 ** 31) % 2 ** 32 - 2 ** 31                     # int32 wraparound
    m = np.float32(float(x_scale) * float(w_scale_c) / float(y_scale))   # Python floats are float64
    t = np.float32(np.float32(acc) * m)
    if residual is not None:
        mr = np.float32(float(residual[1]) / float(y_scale))
        t = np.float32(t + np.float32(np.float32(residual[0]) * mr))
    return min(hi, max(lo, ref_round(t) + zp))


def ref_conv2d_q(x, w, b, stride, pads, dil, xs, xzp, ws, ys, yzp, dtype, y_min=None, y_max=None, resid=None,
                 r_scale=None, r_zp=0):
    lo, hi = RANGES[dtype]
    lo = lo if y_min is None else y_min
    hi = hi if y_max is None else y_max
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    (pt, pb), (pl, pr) = pads
    oh = (h + pt + pb - (kh - 1) * dil[0] - 1) // stride[0] + 1
    ow = (wd + pl + pr - (kw - 1) * dil[1] - 1) // stride[1] + 1
    out = np.empty((n, oh, ow, f), NP[dtype])
    for s in range(n):
        for i in range(oh):
            for j in range(ow):
                for o in range(f):
                    acc = 0 if b is None else int(b[o])
                    for p in range(kh):
                        for q in range(kw):
                            r, col = i * stride[0] + p * dil[0] - pt, j * stride[1] + q * dil[1] - pl
                            if 0 <= r < h and 0 <= col < wd:       # padding cells are x_zero_point
                                for k in range(c):
                                    acc += (int(x[s, r, col, k]) - xzp) * int(w[p, q, k, o])
                    res = None if resid is None else (int(resid[s, i, j, o]) - r_zp, r_scale)
                    out[s, i, j, o] = ref_requant(acc, xs, ws[o], ys, yzp, lo, hi, res)
    return out


def ref_dense_q(x, w, b, xs, xzp, ws, ys, yzp, dtype):
    lo, hi = RANGES[dtype]
    out = np.empty((x.shape[0], w.shape[1]), NP[dtype])
    for s in range(x.shape[0]):
        for o in range(w.shape[1]):
            acc = (0 if b is None else int(b[o])) + sum((int(x[s, k]) - xzp) * int(w[k, o]) for k in range(x.shape[1]))
            out[s, o] = ref_requant(acc, xs, ws[o], ys, yzp, lo, hi)
    return out


def portable_target():
    """This host's target without VNNI: the int8 kernels' portable integer path, tested on every host."""
    host = jit.host_target()
    return dataclasses.replace(host, features=",".join(filter(None, [host.features, "-avx512vnni,-avxvnni"])))


def compile_llvm(g, params, target, frozen_params=False):
    with mock.patch("backends.llvm.executable.host_target", lambda: target):
        fn = gc.compile(g, backend="llvm", params=params, frozen_params=frozen_params)
    assert fn.backend == "llvm"
    return fn


def run(g, **feeds):
    """The graph's outputs on the NumPy backend, after checking that the LLVM backend gives the same bits
    and dtypes both with this host's target (VNNI when it has it) and with the portable integer path,
    each with the weights packed per call and pre-packed once (frozen_params)
    (gc.compile falling back to NumPy is an error under this suite, see conftest.py)."""
    params = feeds.pop("params", None)
    want = gc.compile(g, backend="numpy", params=params)(**feeds)
    for target in (jit.host_target(), portable_target()):
        for frozen in (False, True):
            fn = compile_llvm(g, params, target, frozen)
            got = fn(**feeds)
            for a, b in zip(*((o,) if not isinstance(o, tuple) else o for o in (got, want))):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b, err_msg=f"LLVM on {target.describe()}, frozen={frozen}")
    return want


# -- quantize / dequantize ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,zp", [("u8", 0), ("u8", 131), ("i8", 0), ("i8", -7)])
def test_quantize_matches_naive_rounding_and_saturation(dtype, zp):
    scale = 0.25          # a power of two: k.5 * scale divides exactly, so half-way cases are real ties
    halves = (np.arange(-40, 40) + 0.5) * scale
    rng = np.random.default_rng(1)
    x = np.concatenate([halves, rng.normal(0, 30, 97), [-1e30, 1e30, np.inf, -np.inf, np.nan, 0.0, -0.0],
                        (np.array([-129, -128.5, -127.5, 126.5, 127.5, 254.5, 255.5, 256]) - zp) * scale]
                       ).astype(np.float32).reshape(1, -1)
    g = gc.Graph("q")
    xv = g.input("x", (None, x.shape[1]))
    g.output(emit("quantize", xv, scale=scale, zero_point=zp, dtype=dtype))
    got = run(g, x=x)
    want = ref_quantize(x, scale, zp, dtype)
    np.testing.assert_array_equal(got, want)
    lo, hi = RANGES[dtype]
    assert got.min() == lo and got.max() == hi                      # saturates at both ends
    assert set(np.unique(got[0, :80].astype(int) - zp)) <= set(range(-40, 41, 2)) | {lo - zp, hi - zp}   # ties to even


def test_quantize_with_an_inexact_scale_matches_naive():
    x = np.random.default_rng(2).uniform(-3, 3, (3, 11)).astype(np.float32)
    g = gc.Graph("q")
    xv = g.input("x", (None, 11))
    g.output(emit("quantize", xv, scale=0.0137, zero_point=128, dtype="u8"))
    np.testing.assert_array_equal(run(g, x=x), ref_quantize(x, 0.0137, 128, "u8"))


@pytest.mark.parametrize("dtype,zp", [("u8", 3), ("i8", -128)])
def test_dequantize_is_one_float32_multiply(dtype, zp):
    lo, hi = RANGES[dtype]
    q = np.arange(lo, hi + 1).astype(NP[dtype]).reshape(1, -1)
    g = gc.Graph("dq")
    xv = g.input("x", (None, q.shape[1]), dtype)
    g.output(emit("dequantize", xv, scale=0.1, zero_point=zp))
    want = np.array([[np.float32(int(v) - zp) * np.float32(0.1) for v in q[0]]], np.float32)
    np.testing.assert_array_equal(run(g, x=q), want)


# -- conv2d_q / dense_q --------------------------------------------------------------------------------

CONV_CASES = [   # x shape, kernel (kh, kw, f), stride, padding, dilation, x dtype, y dtype
    ((1, 1, 1, 1), (1, 1, 1), 1, "valid", 1, "u8", "u8"),
    ((2, 7, 5, 3), (3, 3, 4), 1, "same", 1, "u8", "u8"),
    ((1, 11, 13, 2), (5, 3, 7), (2, 3), ((2, 1), (0, 2)), 1, "i8", "u8"),
    ((3, 9, 7, 1), (3, 2, 5), 1, ((1, 2), (1, 0)), (2, 3), "u8", "i8"),
    ((1, 5, 5, 7), (5, 5, 1), 1, "valid", 1, "i8", "i8"),          # kernel = input
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"x{c[0]}k{c[1]}s{c[2]}")
def test_conv2d_q_matches_naive_integer_loops(case):
    xshape, (kh, kw, f), stride, padding, dil, xdt, ydt = case
    rng = np.random.default_rng(sum(xshape) + f)
    lo, hi = RANGES[xdt]
    x = rng.integers(lo, hi + 1, xshape).astype(NP[xdt])
    w = rng.integers(-128, 128, (kh, kw, xshape[3], f)).astype(np.int8)
    b = rng.integers(-5000, 5000, f).astype(np.int32)
    xzp = 17 if xdt == "u8" else -3
    ws = tuple(float(v) for v in rng.uniform(0.001, 0.02, f).astype(np.float32))
    g = gc.Graph("cq")
    xv = g.input("x", (None,) + xshape[1:], xdt)
    wv, bv = g.param("w", w.shape, "i8"), g.param("b", b.shape, "i32")
    y = emit("conv2d_q", xv, wv, bv, stride=stride, padding=padding, dilation=dil, x_scale=0.05,
             x_zero_point=xzp, w_scale=ws, y_scale=0.3, y_zero_point=5 if ydt == "u8" else -2, dtype=ydt)
    g.output(y)
    node = g.nodes[-1]
    got = run(g, x=x, params={"w": w, "b": b})
    want = ref_conv2d_q(x, w, b, node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"], 0.05,
                        xzp, ws, 0.3, node.attrs["y_zero_point"], ydt)
    np.testing.assert_array_equal(got, want)
    assert want.size < 8 or len(np.unique(want)) > 3      # the case exercises more than saturation


def test_conv2d_q_half_way_rounding_saturation_and_clamp():
    # m = 1 * 0.5 / 1 = 0.5 exactly: every odd accumulator is a tie, rounded to even
    x = np.arange(-60, 60, dtype=np.int8).reshape(1, 4, 30, 1)
    w = np.array([1, 3], np.int8).reshape(1, 1, 1, 2)
    g = gc.Graph("cq")
    xv = g.input("x", (None, 4, 30, 1), "i8")
    wv = g.param("w", w.shape, "i8")
    g.output(emit("conv2d_q", xv, wv, x_scale=1.0, w_scale=(0.5, 0.5), y_scale=1.0, dtype="i8",
                  y_min=-20, y_max=100))
    got = run(g, x=x, params={"w": w})
    want = ref_conv2d_q(x, w, None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1.0, 0, (0.5, 0.5), 1.0, 0, "i8", -20, 100)
    np.testing.assert_array_equal(got, want)
    acc = x[0, :, :, 0].astype(int)
    np.testing.assert_array_equal(got[0, :, :, 0], np.clip([[round(a / 2) for a in row] for row in acc], -20, 100))
    # 3 * 59 / 2 = 88.5 ties to even (88); the other channel is clamped to [-20, 100]
    assert got[..., 1].min() == -20 and got[..., 1].max() == 88 and (got[..., 0] == 30).any()


@pytest.mark.parametrize("xdt,ydt", [("u8", "u8"), ("i8", "u8"), ("u8", "i8")])
def test_dense_q_matches_naive_integer_loops(xdt, ydt):
    rng = np.random.default_rng(7)
    lo, hi = RANGES[xdt]
    x = rng.integers(lo, hi + 1, (5, 13)).astype(NP[xdt])
    w = rng.integers(-127, 128, (13, 7)).astype(np.int8)
    b = rng.integers(-3000, 3000, 7).astype(np.int32)
    ws = tuple(float(v) for v in rng.uniform(0.002, 0.01, 7).astype(np.float32))
    xzp, yzp = (100, 7) if xdt == "u8" else (5, 7)
    yzp = yzp if ydt == "u8" else -9
    g = gc.Graph("dq")
    xv = g.input("x", (None, 13), xdt)
    g.output(emit("dense_q", xv, g.param("w", w.shape, "i8"), g.param("b", b.shape, "i32"), x_scale=0.04,
                  x_zero_point=xzp, w_scale=ws, y_scale=0.02, y_zero_point=yzp, dtype=ydt))
    got = run(g, x=x, params={"w": w, "b": b})
    np.testing.assert_array_equal(got, ref_dense_q(x, w, b, 0.04, xzp, ws, 0.02, yzp, ydt))
    lo, hi = RANGES[ydt]
    assert got.min() == lo and got.max() == hi             # saturates at both ends on these operands


def test_int32_bias_wraps_around_like_int32():
    x = np.full((1, 1), 10, np.uint8)
    w = np.full((1, 1), 1, np.int8)
    b = np.array([2 ** 31 - 5], np.int32)                  # + 10 wraps to -2**31 + 5
    g = gc.Graph("wrap")
    xv = g.input("x", (None, 1), "u8")
    g.output(emit("dense_q", xv, g.param("w", (1, 1), "i8"), g.param("b", (1,), "i32"), x_scale=1.0,
                  w_scale=(2.0 ** -24,), y_scale=1.0, y_zero_point=0, dtype="i8"))
    got = run(g, x=x, params={"w": w, "b": b})
    assert got[0, 0] == ref_dense_q(x, w, b, 1.0, 0, (2.0 ** -24,), 1.0, 0, "i8")[0, 0] == -128


@pytest.mark.parametrize("dtype", ["u8", "i8"])
def test_max_pool2d_on_int8_keeps_the_dtype_and_padding_never_wins(dtype):
    lo, hi = RANGES[dtype]
    x = np.random.default_rng(3).integers(lo, hi + 1, (2, 5, 7, 3)).astype(NP[dtype])
    x[0, 0, 0, 0] = lo                                       # a corner window of only the minimum
    g = gc.Graph("pool")
    xv = g.input("x", (None, 5, 7, 3), dtype)
    y = emit("max_pool2d", xv, pool=(2, 3), stride=(2, 2), padding=((1, 0), (1, 1)))
    assert y.dtype == dtype
    g.output(y)
    got = run(g, x=x)
    xp = np.pad(x.astype(int), ((0, 0), (1, 0), (1, 1), (0, 0)), constant_values=-10 ** 6)
    want = np.array([[[[xp[n, 2 * i:2 * i + 2, 2 * j:2 * j + 3, c].max() for c in range(3)]
                       for j in range(y.shape[2])] for i in range(y.shape[1])] for n in range(2)])
    np.testing.assert_array_equal(got, want)


def test_op_checks_name_the_op_and_the_argument():
    g = gc.Graph("bad")
    x = g.input("x", (None, 4))
    xq = g.input("xq", (None, 4), "u8")
    w = g.param("w", (4, 3), "i8")
    wf = g.param("wf", (4, 3))
    for call, match in [
        (lambda: emit("quantize", x, scale=0.0), "quantize: scale must be a positive finite"),
        (lambda: emit("quantize", x, scale=float("nan")), "quantize: scale"),
        (lambda: emit("quantize", x, scale=0.1, zero_point=300), r"zero_point must be an int in \[0, 255\]"),
        (lambda: emit("quantize", x, scale=0.1, dtype="i4"), "dtype must be one of u8, i8"),
        (lambda: emit("quantize", xq, scale=0.1), "quantize: x must be f32"),
        (lambda: emit("dequantize", x, scale=0.1), "dequantize: x's dtype must be one of u8, i8"),
        (lambda: emit("dense_q", xq, wf, x_scale=1, w_scale=(1, 1, 1), y_scale=1), "dense_q: w must be i8"),
        (lambda: emit("dense_q", xq, w, x_scale=1, w_scale=(1, 1), y_scale=1), "one scale per output channel"),
        (lambda: emit("dense_q", xq, w, x_scale=1, w_scale=(1, 1, 1), y_scale=1, y_min=9, y_max=3),
         "y_min 9 is larger than y_max 3"),
        (lambda: emit("dense_q", xq, w, g.param("b", (3,)), x_scale=1, w_scale=(1, 1, 1), y_scale=1),
         "dense_q: bias must be i32"),
    ]:
        with pytest.raises(IRError, match=match):
            call()


def test_reduction_that_could_overflow_int32_is_refused():
    g = gc.Graph("big")
    x = g.input("x", (None, 70000), "u8")
    with pytest.raises(IRError, match="may overflow the int32 accumulator"):
        emit("dense_q", x, g.param("w", (70000, 1), "i8"), x_scale=1, w_scale=(1,), y_scale=1)


# -- IR forms -------------------------------------------------------------------------------------------

def _quantized_graph():
    g = gc.Graph("qnet")
    x = g.input("x", (None, 6, 6, 2))
    w = g.param("w", (3, 3, 2, 4), "i8")
    b = g.param("b", (4,), "i32")
    zp = g.const("offsets", np.array([-3, 0, 5, 127], np.int8))
    q = emit("quantize", x, scale=0.02, zero_point=3)
    y = emit("conv2d_q", q, w, b, x_scale=0.02, x_zero_point=3, w_scale=(0.1, 0.2, 0.3, 0.4), y_scale=0.07,
             y_zero_point=11, padding="same", y_min=11)
    p = emit("flatten", emit("max_pool2d", y, pool=2))
    g.output(emit("dequantize", p, scale=0.07, zero_point=11), zp)
    return g


def test_int_types_round_trip_through_text_and_json():
    g = _quantized_graph()
    text = print_graph(g)
    assert "u8[?,6,6,4] = conv2d_q" in text and "param %w: i8[3,3,2,4]" in text and "i32[4]" in text
    assert parse_graph(text) == g
    back = graph_from_json(graph_to_json(g), consts={"offsets": g.consts["offsets"]})
    assert back == g and back.consts["offsets"].dtype == np.int8


def test_quantized_runtime_survives_gcnn_save_and_load(tmp_path, mnist_quantized):
    _, q, (xs, _) = mnist_quantized
    path = os.fspath(tmp_path / "q.gcnn")
    q.save(path)
    loaded = gc.load(path, backend=q.backend)
    assert {p.name: p.dtype for p in loaded.graph.params} == {p.name: p.dtype for p in q.graph.params}
    np.testing.assert_array_equal(loaded.predict(xs[:64]), q.predict(xs[:64]))


@pytest.mark.parametrize("xdt", ["u8", "i8"])
def test_vnni_is_used_exactly_when_the_target_has_it(xdt):
    g = gc.Graph("dq")
    x = g.input("x", (None, 13), xdt)
    g.output(emit("dense_q", x, g.param("w", (13, 7), "i8"), x_scale=0.04, w_scale=(0.01,) * 7, y_scale=0.02))
    for target in (jit.host_target(), portable_target()):
        asm = compile_llvm(g, None, target).asm
        assert ("vpdpbusd" in asm) == (vnni_intrinsic(target) is not None), target.describe()
    assert vnni_intrinsic(portable_target()) is None


def test_grouped_reduction_needs_a_contiguous_innermost_run():
    from backends.llvm.kernels.conv import _tap_loops, conv_geometry
    from backends.llvm.kernels.quant import grouped_reduction
    geometry = lambda c, dil: conv_geometry((9, 7, c), (3, 2), 5, (1, 1), ((0, 0), (0, 0)), dil)
    red = grouped_reduction(_tap_loops(geometry(3, (1, 1)), 1), 4)       # (kh) around runs of kw * c = 6
    assert (red.run, red.groups, red.group_rows, [c for c, _, _ in red.outer]) == (6, 2, 6, [3])
    assert grouped_reduction(_tap_loops(geometry(1, (2, 3)), 1), 2) is None   # taps 3 bytes apart: one k at a time
    assert grouped_reduction(_tap_loops(geometry(2, (2, 3)), 1), 2).run == 2  # runs of c


@pytest.mark.parametrize("dtype", ["u8", "i8"])
@pytest.mark.parametrize("shape", [(3, 1, 1, 1), (3, 1, 2, 5), (2, 3, 5, 7), (1, 2, 2, 37), (2, 7, 1, 16), (5, 4, 4, 33)])
def test_global_avg_pool2d_on_int8_rounds_half_to_even_like_naive(dtype, shape):
    """The mean of the bytes, rint(f32(sum) / f32(H*W)) half to even, in the input's dtype: checked
    against exact rational arithmetic (fractions), with halves forced in."""
    from fractions import Fraction
    lo, hi = RANGES[dtype]
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(lo, hi + 1, shape).astype(NP[dtype])
    x[0, ..., 0] = hi                                         # the extremes stay representable
    if shape[1] * shape[2] == 2:
        x[-1, 0, 0, :], x[-1, -1, -1, :] = 3, 4              # sum 7 over 2 pixels: 3.5 -> 4
    g = gc.Graph("gap")
    y = emit("global_avg_pool2d", g.input("x", (None,) + shape[1:], dtype))
    assert y.dtype == dtype and y.shape == (None, shape[3])
    g.output(y)
    got = run(g, x=x)

    def naive(values):
        m = Fraction(int(values.astype(np.int64).sum()), values.size)
        f, r = divmod(m, 1)
        return int(f) + (1 if r > Fraction(1, 2) or (r == Fraction(1, 2) and f % 2) else 0)
    want = np.array([[naive(x[n, :, :, c]) for c in range(shape[3])] for n in range(shape[0])])
    np.testing.assert_array_equal(got.astype(np.int64), want)


@pytest.mark.parametrize("dtype", ["u8", "i8"])
@pytest.mark.parametrize("shape", [(3, 1, 1, 1), (2, 3, 5, 7), (1, 2, 2, 67), (2, 7, 1, 16)])
def test_global_max_pool2d_on_int8_keeps_the_dtype(dtype, shape):
    lo, hi = RANGES[dtype]
    x = np.random.default_rng(sum(shape) + 1).integers(lo, hi + 1, shape).astype(NP[dtype])
    x[-1] = lo                                                # a sample of only the minimum
    g = gc.Graph("gmp")
    y = emit("global_max_pool2d", g.input("x", (None,) + shape[1:], dtype))
    assert y.dtype == dtype
    g.output(y)
    got = run(g, x=x)
    want = np.array([[max(int(v) for v in x[n, :, :, c].ravel()) for c in range(shape[3])] for n in range(shape[0])])
    np.testing.assert_array_equal(got.astype(np.int64), want)


@pytest.mark.parametrize("pool", ["GlobalAveragePooling2D", "GlobalMaxPooling2D"])
def test_quantized_global_pools_keep_the_scale_and_export_to_onnx(tmp_path, pool):
    """conv2d_q -> global pool stays u8 (no dequantize before the pool), and ONNX Runtime runs the export
    (DequantizeLinear, the pool, QuantizeLinear with the conv's output scale) to the same probabilities."""
    L = gc.layers
    m = gc.Sequential([L.Input((6, 6, 2)), L.Conv2D(5, 3, activation="relu"), getattr(L, pool)(), L.Dense(3)])
    m.build()
    x = np.random.default_rng(5).random((32, 6, 6, 2), np.float32)
    q = gc.quantize(m, x)
    ops = [n.op for n in q.graph.nodes]
    op = "global_avg_pool2d" if "Average" in pool else "global_max_pool2d"
    assert ops[:4] == ["quantize", "conv2d_q", op, "dense_q"], ops
    gap = q.graph.nodes[2]
    assert gap.outputs[0].dtype == "u8"
    want, got = m.predict(x), q.predict(x)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max() + 0.01
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime as ort
    from graphcnn.onnx import export
    export(q.graph, str(tmp_path / "gap.onnx"), weights=q.weights)
    s = ort.InferenceSession(str(tmp_path / "gap.onnx"), providers=["CPUExecutionProvider"])
    theirs = s.run(None, {s.get_inputs()[0].name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    np.testing.assert_allclose(theirs, got, atol=1e-5)


def test_llvm_backend_refuses_int8_values_in_float_kernels_instead_of_misreading_them():
    g = gc.Graph("cat")
    x = g.input("x", (None, 4, 4, 1), "u8")
    g.output(emit("concat", x, x, axis=3))
    with pytest.raises(BackendFallbackWarning, match="no u8 lowering for op 'concat'"):
        gc.compile(g, backend="llvm")


def test_quantized_graph_runs_natively_and_matches_numpy():
    g = _quantized_graph()
    rng = np.random.default_rng(4)
    params = {"w": rng.integers(-3, 4, (3, 3, 2, 4)).astype(np.int8),
              "b": rng.integers(-200, 200, 4).astype(np.int32)}
    x = rng.uniform(-0.1, 0.6, (9, 6, 6, 2)).astype(np.float32)
    fn = gc.compile(g, backend="llvm", params=params)
    assert fn.backend == "llvm"
    y, offsets = run(g, x=x, params=params)
    assert offsets.dtype == np.int8 and len(np.unique(y)) > 5


# -- LLVM int8 kernels vs NumPy: awkward shapes, batches crossing tile sizes ------------------------------

LLVM_CONV_CASES = [   # x shape, (kh, kw, f), stride, padding, dilation, x dtype, y dtype, x zero point
    ((1, 1, 1, 1), (1, 1, 1), 1, "valid", 1, "u8", "u8", 0),
    ((13, 1, 1, 1), (1, 1, 31), 1, "valid", 1, "u8", "i8", 255),         # 1x1 image, prime filters
    ((3, 7, 11, 5), (3, 3, 17), 1, "same", 1, "u8", "u8", 131),          # padding holds the zero point
    ((2, 13, 7, 3), (2, 5, 9), (3, 2), ((1, 1), (4, 0)), 1, "i8", "u8", -77),
    ((5, 11, 11, 2), (3, 3, 23), 1, ((2, 2), (2, 2)), (2, 2), "i8", "i8", 127),
    ((1, 29, 3, 1), (7, 1, 8), (2, 1), ((3, 3), (0, 0)), 1, "u8", "u8", 1),
]


@pytest.mark.parametrize("case", LLVM_CONV_CASES, ids=lambda c: f"x{c[0]}k{c[1]}zp{c[7]}")
def test_llvm_conv2d_q_is_bit_identical_to_numpy_and_naive(case):
    xshape, (kh, kw, f), stride, padding, dil, xdt, ydt, xzp = case
    rng = np.random.default_rng(sum(xshape) * 7 + f)
    lo, hi = RANGES[xdt]
    x = rng.integers(lo, hi + 1, xshape).astype(NP[xdt])
    w = rng.integers(-128, 128, (kh, kw, xshape[3], f)).astype(np.int8)
    b = rng.integers(-20000, 20000, f).astype(np.int32)
    ws = tuple(float(v) for v in rng.uniform(0.0005, 0.01, f).astype(np.float32))
    yzp = 3 if ydt == "u8" else -4
    g = gc.Graph("cq")
    xv = g.input("x", (None,) + xshape[1:], xdt)
    g.output(emit("conv2d_q", xv, g.param("w", w.shape, "i8"), g.param("b", b.shape, "i32"), stride=stride,
                  padding=padding, dilation=dil, x_scale=0.03, x_zero_point=xzp, w_scale=ws, y_scale=0.2,
                  y_zero_point=yzp, dtype=ydt))
    a = g.nodes[-1].attrs
    got = run(g, x=x, params={"w": w, "b": b})
    want = ref_conv2d_q(x, w, b, a["stride"], a["padding"], a["dilation"], 0.03, xzp, ws, 0.2, yzp, ydt)
    np.testing.assert_array_equal(got, want)
    assert want.size < 40 or len(np.unique(want)) > 5


@pytest.mark.parametrize("n,k,m,xdt", [(1, 1, 1, "u8"), (17, 3, 29, "i8"), (9, 61, 5, "u8"), (32, 200, 37, "i8")])
def test_llvm_dense_q_is_bit_identical_to_numpy_and_naive(n, k, m, xdt):
    rng = np.random.default_rng(n * 1000 + k + m)
    lo, hi = RANGES[xdt]
    x = rng.integers(lo, hi + 1, (n, k)).astype(NP[xdt])
    w = rng.integers(-128, 128, (k, m)).astype(np.int8)
    b = rng.integers(-9000, 9000, m).astype(np.int32)
    ws = tuple(float(v) for v in rng.uniform(0.0002, 0.004, m).astype(np.float32))
    xzp = 200 if xdt == "u8" else -100
    g = gc.Graph("dq")
    xv = g.input("x", (None, k), xdt)
    g.output(emit("dense_q", xv, g.param("w", w.shape, "i8"), g.param("b", b.shape, "i32"), x_scale=0.05,
                  x_zero_point=xzp, w_scale=ws, y_scale=0.01, y_zero_point=-1, dtype="i8"))
    got = run(g, x=x, params={"w": w, "b": b})
    np.testing.assert_array_equal(got, ref_dense_q(x, w, b, 0.05, xzp, ws, 0.01, -1, "i8"))


def test_llvm_dense_q_without_bias_and_with_a_clamp():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (6, 10)).astype(np.uint8)
    w = rng.integers(-128, 128, (10, 9)).astype(np.int8)
    g = gc.Graph("dq")
    xv = g.input("x", (None, 10), "u8")
    g.output(emit("dense_q", xv, g.param("w", w.shape, "i8"), x_scale=0.02, x_zero_point=9, w_scale=(0.01,) * 9,
                  y_scale=0.05, y_zero_point=40, dtype="u8", y_min=40, y_max=200))
    got = run(g, x=x, params={"w": w})
    want = np.clip(ref_dense_q(x, w, None, 0.02, 9, (0.01,) * 9, 0.05, 40, "u8"), 40, 200)
    np.testing.assert_array_equal(got, want)
    assert got.min() == 40 and got.max() == 200


@pytest.mark.parametrize("dtype,zp", [("u8", 255), ("i8", 127), ("i8", -128)])
def test_llvm_quantize_dequantize_on_odd_lengths(dtype, zp):
    rng = np.random.default_rng(5)
    for n, width in [(1, 1), (3, 37), (7, 131)]:
        x = np.concatenate([(np.arange(width) - width // 2 + 0.5) * 0.5, rng.normal(0, 60, width),
                            [np.nan, np.inf, -np.inf][:width]])[:width]
        x = np.tile(x, (n, 1)).astype(np.float32) * rng.choice([1, -1], (n, 1)).astype(np.float32)
        g = gc.Graph("qdq")
        xv = g.input("x", (None, width))
        q = emit("quantize", xv, scale=0.5, zero_point=zp, dtype=dtype)
        g.output(emit("dequantize", q, scale=0.5, zero_point=zp), q)
        r, got = run(g, x=x)
        np.testing.assert_array_equal(got, ref_quantize(x, 0.5, zp, dtype))
        np.testing.assert_array_equal(r, (got.astype(np.float32) - np.float32(zp)) * np.float32(0.5))


# -- the pass and gc.quantize ----------------------------------------------------------------------------

def test_calibration_ranges_and_parameters():
    vals = [np.arange(1001, dtype=np.float32) / 1000 - 0.2]
    r = range_from_values(vals)
    assert (r.lo, r.hi) == (float(vals[0][0]), float(vals[0][-1]))
    r = range_from_values(vals + [np.array([50.0])], "percentile", 99.0)
    assert r.hi < 1.0 and r.lo < -0.18
    qp = activation_params(ValueRange(-0.2, 0.8))
    assert qp.zero_point == 51 and qp.scale == pytest.approx(1 / 255)
    assert activation_params(ValueRange(0.5, 2.0)).zero_point == 0              # 0 stays representable
    w = np.array([[0.5, -2.0], [-0.25, 1.0]], np.float32)
    wq, s = quantize_weights(w)
    np.testing.assert_array_equal(wq, [[127, -127], [-64, 64]])
    np.testing.assert_allclose(s, [0.5 / 127, 2.0 / 127])


@pytest.fixture(scope="module")
def mnist_quantized():
    """examples/mnist_cnn.py trained for 1 epoch on 4,000 bundled images, quantized with 500 of them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("mnist_cnn_example", os.path.join(root, "examples", "mnist_cnn.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.model
    (xt, yt), (xs, ys) = gc.datasets.mnist.load_data()
    xt, xs = xt.astype(np.float32) / 255, xs.astype(np.float32) / 255
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], backend="llvm")
    model.fit(xt[:4000], yt[:4000], epochs=1, batch_size=32, seed=0, verbose=0)
    return model, gc.quantize(model, xt[4000:4500]), (xs, ys)


def test_mnist_cnn_int8_is_bit_identical_on_both_backends(mnist_quantized):
    _, q, (xs, _) = mnist_quantized
    assert q.backend == "llvm"
    # every int8 value up to the logits, and the dequantized logits (one float32 multiply), bit for bit;
    # the float softmax after them is each backend's own exp (a few ulp apart), so it is only close
    head = q.graph.rebuild(q.graph.nodes, outputs=[n.outputs[0] for n in q.graph.nodes if n.op != "softmax"])
    x4 = xs[..., None]
    outs = [gc.compile(head, backend="numpy", params=q.weights)(x4)]
    outs += [compile_llvm(head, q.weights, t)(x4) for t in (jit.host_target(), portable_target())]
    for want, *got in zip(*outs):
        for g in got:
            assert g.dtype == want.dtype
            np.testing.assert_array_equal(g, want)
    int8_logits = outs[0][[n.op for n in head.nodes].index("dense_q")]
    assert int8_logits.dtype == np.uint8 and len(np.unique(int8_logits)) > 20
    probs = [QuantizedRuntime(q.graph, q.weights, q.meta, b).predict(xs) for b in ("numpy", "llvm")]
    np.testing.assert_allclose(probs[1], probs[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(probs[1].argmax(1), probs[0].argmax(1))


def test_mnist_cnn_int8_accuracy_within_one_point_of_fp32(mnist_quantized):
    model, q, (xs, ys) = mnist_quantized
    ops = [n.op for n in q.graph.nodes]
    assert ops == ["quantize", "conv2d_q", "max_pool2d", "conv2d_q", "max_pool2d", "flatten", "dense_q",
                   "dequantize", "softmax"]
    acc_fp32 = float((model.predict(xs).argmax(1) == ys).mean())
    acc_int8 = float((q.predict(xs).argmax(1) == ys).mean())
    print(f"mnist_cnn on the bundled test split ({len(ys)} images): fp32 {acc_fp32:.4f}, int8 {acc_int8:.4f}")
    assert acc_fp32 > 0.9                    # the fp32 model learned something, so the comparison means something
    assert acc_fp32 - acc_int8 <= 0.01


def test_resnet8_block_tails_quantize_to_conv2d_q_with_the_residual(tmp_path):
    """resnet8's block tails are conv2d with a residual operand after fusion: they become conv2d_q with the
    (u8) residual added in the requantization, so every conv runs in int8 and the skip value is kept."""
    import runpy
    from pathlib import Path
    from ir.passes import run_pipeline
    ns = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "resnet8.py"))
    m = ns["build_model"]((12, 12, 1))
    m.build()
    opt = run_pipeline(m.inference_graph(), "inference").graph
    convs = [n for n in opt.nodes if n.op == "conv2d"]
    residual = [n for n in convs if len(n.inputs) == 4]
    assert residual
    x = np.random.default_rng(0).random((16, 12, 12, 1), np.float32)
    q = gc.quantize(m, x)
    ops = [n.op for n in q.graph.nodes]
    assert "conv2d" not in ops and ops.count("conv2d_q") == len(convs)
    assert sum(1 for n in q.graph.nodes if n.op == "conv2d_q" and len(n.inputs) == 4) == len(residual)
    want = m.predict(x)
    got = q.predict(x)
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.abs(got - want).max() < 0.1          # close to fp32, not garbage
    # the residual is per sample like x: the graph splits across threads, to the same bits
    assert q.executable.split_blockers == []
    one, two = (gc.compile(q.graph, backend="llvm", params=q.weights, threads=t) for t in (1, 2))
    np.testing.assert_array_equal(one(x), two(x))
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime as ort
    from graphcnn.onnx import export
    export(q.graph, str(tmp_path / "r.onnx"), weights=q.weights)
    s = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    theirs = s.run(None, {s.get_inputs()[0].name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    np.testing.assert_allclose(theirs, got, atol=0.02)


@pytest.mark.parametrize("max_value", [6.0, None])
def test_a_fused_clip_becomes_the_quantized_output_clamp(max_value):
    """ReLU(max_value=6) fuses into the conv as clip(0, 6): conv2d_q clamps at the quantized bounds (the
    zero point and q(6)); an unbounded side clamps at the dtype's end."""
    L = gc.layers
    m = gc.Sequential([L.Input((7, 7, 2)), L.Conv2D(4, 3), L.ReLU(max_value=max_value), L.Flatten(), L.Dense(3)])
    m.build()
    w = m.get_weights()
    w["conv2d/kernel"] = w["conv2d/kernel"] * 8            # outputs well past 6, so the clamp matters
    m.set_weights(w)
    x = np.random.default_rng(2).random((64, 7, 7, 2), np.float32)
    q = gc.quantize(m, x, method="minmax")
    conv = next(n for n in q.graph.nodes if n.op == "conv2d_q")
    a = conv.attrs
    top = 255 if max_value is None else min(255, round(max_value / a["y_scale"]) + a["y_zero_point"])
    assert (a["y_min"], a["y_max"]) == (a["y_zero_point"], top)
    if max_value is not None:
        assert a["y_scale"] * (a["y_max"] - a["y_zero_point"]) == pytest.approx(6.0, abs=a["y_scale"])
    want, got = m.predict(x), q.predict(x)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max() + 0.01


def test_batch_norm_folded_convs_are_quantized_with_the_folded_weights():
    """fold_params evaluates fold_batch_norm's weight expressions, so a Conv2D + BatchNormalization is one
    conv2d_q whose float weights are exactly w * gamma / sqrt(var + eps), bias beta - mean * that scale."""
    from ir.passes.quantize import prepare_for_quantization
    L = gc.layers
    m = gc.Sequential([L.Input((9, 9, 2)), L.Conv2D(6, 3, use_bias=False), L.BatchNormalization(),
                       L.Activation("relu"), L.Conv2D(5, 3), L.BatchNormalization(), L.Flatten(), L.Dense(3)])
    m.build()
    rng = np.random.default_rng(3)
    w = m.get_weights()
    bn = sorted({k.split("/")[0] for k in w if "moving_mean" in k})
    for name in bn:
        c = w[f"{name}/gamma"].shape[0]
        w[f"{name}/gamma"] = rng.uniform(0.5, 2, c).astype(np.float32)
        w[f"{name}/beta"] = rng.uniform(-0.5, 0.5, c).astype(np.float32)
        w[f"{name}/moving_mean"] = rng.uniform(-0.3, 0.3, c).astype(np.float32)
        w[f"{name}/moving_variance"] = rng.uniform(0.2, 3, c).astype(np.float32)
    m.set_weights(w)
    g, fw = prepare_for_quantization(m.inference_graph(), m.get_weights())
    convs = [n for n in g.nodes if n.op == "conv2d"]
    assert len(convs) == 2 and all(v.kind == "param" for n in convs for v in n.inputs[1:])
    first = convs[0]
    scale = w[f"{bn[0]}/gamma"] / np.sqrt(w[f"{bn[0]}/moving_variance"] + np.float32(1e-3))
    np.testing.assert_allclose(fw[first.inputs[1].name], w["conv2d/kernel"] * scale, rtol=1e-6)
    np.testing.assert_allclose(fw[first.inputs[2].name], w[f"{bn[0]}/beta"] - w[f"{bn[0]}/moving_mean"] * scale,
                               rtol=1e-5, atol=1e-6)
    x = rng.uniform(0, 1, (64, 9, 9, 2)).astype(np.float32)
    q = gc.quantize(m, x)
    ops = [n.op for n in q.graph.nodes]
    assert ops.count("conv2d_q") == 2 and "conv2d" not in ops and "batch_norm" not in ops
    want, got = m.predict(x), q.predict(x)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.parametrize("case", LLVM_CONV_CASES[:5], ids=lambda c: f"x{c[0]}k{c[1]}zp{c[7]}")
@pytest.mark.parametrize("rdt,rzp", [("u8", 17), ("i8", -128)])
def test_llvm_conv2d_q_with_a_residual_is_bit_identical_to_numpy_and_naive(case, rdt, rzp):
    xshape, (kh, kw, f), stride, padding, dil, xdt, ydt, xzp = case
    rng = np.random.default_rng(sum(xshape) * 3 + f + abs(rzp))
    lo, hi = RANGES[xdt]
    x = rng.integers(lo, hi + 1, xshape).astype(NP[xdt])
    w = rng.integers(-128, 128, (kh, kw, xshape[3], f)).astype(np.int8)
    b = rng.integers(-20000, 20000, f).astype(np.int32)
    ws = tuple(float(v) for v in rng.uniform(0.0005, 0.01, f).astype(np.float32))
    yzp = 3 if ydt == "u8" else -4
    g = gc.Graph("cqr")
    xv = g.input("x", (None,) + xshape[1:], xdt)
    wv, bv = g.param("w", w.shape, "i8"), g.param("b", b.shape, "i32")
    probe = emit("conv2d_q", xv, wv, bv, stride=stride, padding=padding, dilation=dil, x_scale=0.03,
                 x_zero_point=xzp, w_scale=ws, y_scale=0.2, y_zero_point=yzp, dtype=ydt)
    rv = g.input("r", (None,) + tuple(probe.shape[1:]), rdt)
    g.output(emit("conv2d_q", xv, wv, bv, rv, stride=stride, padding=padding, dilation=dil, x_scale=0.03,
                  x_zero_point=xzp, w_scale=ws, y_scale=0.2, y_zero_point=yzp, dtype=ydt, r_scale=0.37,
                  r_zero_point=rzp, y_min=yzp if ydt == "u8" else None))
    g = g.rebuild([n for n in g.nodes if n.outputs[0] is not probe])
    r = rng.integers(*RANGES[rdt], (xshape[0],) + tuple(probe.shape[1:]), endpoint=True).astype(NP[rdt])
    a = g.nodes[-1].attrs
    got = run(g, x=x, r=r, params={"w": w, "b": b})
    want = ref_conv2d_q(x, w, b, a["stride"], a["padding"], a["dilation"], 0.03, xzp, ws, 0.2, yzp, ydt,
                        y_min=a["y_min"], resid=r, r_scale=0.37, r_zp=rzp)
    np.testing.assert_array_equal(got, want)
    assert want.size < 40 or len(np.unique(want)) > 5


def test_conv2d_q_residual_attributes_are_checked():
    g = gc.Graph("cqr")
    x = g.input("x", (None, 4, 4, 2), "u8")
    w, b = g.param("w", (3, 3, 2, 3), "i8"), g.param("b", (3,), "i32")
    common = dict(x_scale=0.1, w_scale=(0.1,) * 3, y_scale=0.1)
    with pytest.raises(IRError, match="without a residual"):
        emit("conv2d_q", x, w, b, r_scale=0.5, **common)
    with pytest.raises(IRError, match="needs r_scale"):
        emit("conv2d_q", x, w, b, g.input("r", (None, 2, 2, 3), "u8"), **common)
    with pytest.raises(IRError, match="residual must have the output's shape"):
        emit("conv2d_q", x, w, b, g.input("r2", (None, 4, 4, 3), "u8"), r_scale=0.5, **common)
    with pytest.raises(IRError, match="residual's dtype"):
        emit("conv2d_q", x, w, b, g.input("r3", (None, 2, 2, 3)), r_scale=0.5, **common)
