"""Size-1 and edge geometries through the whole compiler, forward and every gradient, on both backends,
against naive float64 loops written here (independent of both backends).

Regression tests for issue 9: the LLVM GEMM family dropped every count-1 reduction loop and returned 0
for dense with one input feature, matmul with inner dimension 1, a 1x1 conv on one channel and the
backward matmul of a Dense(1) head. Every case runs at batch 1 and 3; the loss is mse(y, t), so
d loss / d y = 2 (y - t) / y.size and the reference backward is a naive loop too.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import graphcnn as gc
from graphcnn import ops

BACKENDS = ("llvm", "numpy")
BATCHES = (1, 3)


# ------------------------------------------------------------------------------------------------------
# naive float64 references

def ref_conv(x, w, stride, pads, dil):
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    (pt, pb), (pl, pr) = pads
    oh = (h + pt + pb - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + pl + pr - dil[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, oh, ow, f))
    for b, i, j, a, e in itertools.product(range(n), range(oh), range(ow), range(kh), range(kw)):
        r, s = i * stride[0] - pt + a * dil[0], j * stride[1] - pl + e * dil[1]
        if 0 <= r < h and 0 <= s < wd:
            y[b, i, j] += x[b, r, s] @ w[a, e]
    return y


def ref_conv_grads(x, w, dy, stride, pads, dil):
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    (pt, _), (pl, _) = pads
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    for b, i, j, a, e in itertools.product(range(n), range(dy.shape[1]), range(dy.shape[2]), range(kh), range(kw)):
        r, s = i * stride[0] - pt + a * dil[0], j * stride[1] - pl + e * dil[1]
        if 0 <= r < h and 0 <= s < wd:
            dx[b, r, s] += w[a, e] @ dy[b, i, j]
            dw[a, e] += np.outer(x[b, r, s], dy[b, i, j])
    return dx, dw


def pool_windows(h, wd, pool, stride, pads):
    """{(i, j): [(r, s), ...]} the real cells of each output window."""
    (pt, pb), (pl, pr) = pads
    oh = (h + pt + pb - pool[0]) // stride[0] + 1
    ow = (wd + pl + pr - pool[1]) // stride[1] + 1
    return {(i, j): [(r, s) for r in range(i * stride[0] - pt, i * stride[0] - pt + pool[0])
                     for s in range(j * stride[1] - pl, j * stride[1] - pl + pool[1]) if 0 <= r < h and 0 <= s < wd]
            for i in range(oh) for j in range(ow)}, (oh, ow)


def ref_pool(kind, x, dy_fn, pool, stride, pads):
    """(y, dx) for max or avg pooling (avg divides by the real cells; max routes to the first maximum)."""
    n, h, wd, c = x.shape
    wins, (oh, ow) = pool_windows(h, wd, pool, stride, pads)
    y = np.zeros((n, oh, ow, c))
    for (i, j), cells in wins.items():
        vals = np.stack([x[:, r, s] for r, s in cells])          # (cells, n, c)
        y[:, i, j] = vals.max(0) if kind == "max" else vals.mean(0)
    dy = dy_fn(y)
    dx = np.zeros(x.shape)
    for (i, j), cells in wins.items():
        if kind == "avg":
            for r, s in cells:
                dx[:, r, s] += dy[:, i, j] / len(cells)
            continue
        vals = np.stack([x[:, r, s] for r, s in cells])
        first = vals.argmax(0)                                   # the first maximum, per (sample, channel)
        for k, (r, s) in enumerate(cells):
            dx[:, r, s] += dy[:, i, j] * (first == k)
    return y, dx


def mse_grad(y, t):
    return 2.0 * (y - t) / y.size


# ------------------------------------------------------------------------------------------------------
# compile + run helpers

def run(g, backend, feeds):
    return gc.compile(g, backend=backend)(**feeds)


def close(got, want, what):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-6, err_msg=what)


def f32(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------------
# conv2d: (in_hwc, kernel_hw, filters, stride, padding, dilation)

CONVS = [
    ((4, 5, 1), (1, 1), 3, (1, 1), ((0, 0), (0, 0)), (1, 1)),     # 1x1 conv on a 1-channel image: k = 1
    ((1, 1, 1), (1, 1), 1, (1, 1), ((0, 0), (0, 0)), (1, 1)),     # everything 1
    ((3, 4, 2), (3, 4), 5, (1, 1), ((0, 0), (0, 0)), (1, 1)),     # kernel = image: one output pixel
    ((2, 2, 1), (2, 2), 1, (1, 1), ((0, 0), (0, 0)), (1, 1)),     # kernel = image, C = F = 1
    ((5, 5, 3), (3, 3), 1, (1, 1), ((0, 0), (0, 0)), (1, 1)),     # one filter
    ((7, 7, 2), (2, 2), 3, (3, 3), ((0, 0), (0, 0)), (1, 1)),     # stride > kernel: cells never read
    ((9, 9, 1), (2, 2), 2, (1, 1), ((0, 0), (0, 0)), (7, 7)),     # large dilation (extent 8)
    ((4, 3, 2), (3, 2), 4, (1, 2), ((2, 0), (0, 1)), (1, 1)),     # explicit asymmetric padding
    ((1, 1, 3), (3, 3), 2, (1, 1), ((1, 1), (1, 1)), (1, 1)),     # 1x1 image, padded to the kernel
    ((1, 7, 1), (1, 3), 1, (1, 2), ((0, 0), (1, 1)), (1, 2)),     # height 1, stride + dilation on width
    ((5, 1, 2), (5, 1), 1, (2, 1), ((0, 0), (0, 0)), (1, 1)),     # width 1, kernel = image height
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_conv2d_edge_geometry_forward_and_gradients(case, backend):
    hwc, k, f, stride, pads, dil = CONVS[case]
    g = gc.Graph(f"conv_edge{case}")
    x = g.input("x", (None,) + hwc)
    w = g.input("w", k + (hwc[2], f))
    b = g.input("b", (f,))
    y = ops.conv2d(x, w, b, stride=stride, padding=pads, dilation=dil)
    t = g.input("t", y.type.shape)
    g.output(y, ops.mse(y, t))
    gg = gc.grad(g, wrt=["x", "w", "b"])
    rng = np.random.default_rng(case)
    for n in BATCHES:
        feeds = {"x": f32(rng, (n,) + hwc), "w": f32(rng, k + (hwc[2], f)), "b": f32(rng, (f,))}
        x64, w64, b64 = (feeds[v].astype(np.float64) for v in "xwb")
        y_ref = ref_conv(x64, w64, stride, pads, dil) + b64
        feeds["t"] = f32(rng, y_ref.shape)
        y_got, loss, dx, dw, db = run(gg, backend, feeds)
        close(y_got, y_ref, f"conv {CONVS[case]} forward, n={n}")
        dy = mse_grad(y_ref, feeds["t"].astype(np.float64))
        close(loss, np.mean((y_ref - feeds["t"]) ** 2), "loss")
        dx_ref, dw_ref = ref_conv_grads(x64, w64, dy, stride, pads, dil)
        close(dx, dx_ref, f"conv {CONVS[case]} d/dx, n={n}")
        close(dw, dw_ref, f"conv {CONVS[case]} d/dw, n={n}")
        close(db, dy.sum((0, 1, 2)), f"conv {CONVS[case]} d/db, n={n}")


# ------------------------------------------------------------------------------------------------------
# dense / matmul with size-1 dimensions

DENSE = [(1, 4), (1, 1), (5, 1), (1, 17)]       # (in_features, units)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fan_in,units", DENSE)
def test_dense_size1_forward_and_gradients(fan_in, units, backend):
    g = gc.Graph(f"dense_{fan_in}_{units}")
    x = g.input("x", (None, fan_in))
    w = g.input("w", (fan_in, units))
    b = g.input("b", (units,))
    y = ops.dense(x, w, b)
    t = g.input("t", (None, units))
    g.output(y, ops.mse(y, t))
    gg = gc.grad(g, wrt=["x", "w", "b"])
    rng = np.random.default_rng(fan_in * 100 + units)
    for n in BATCHES:
        feeds = {"x": f32(rng, (n, fan_in)), "w": f32(rng, (fan_in, units)), "b": f32(rng, (units,)),
                 "t": f32(rng, (n, units))}
        x64, w64, b64, t64 = (feeds[v].astype(np.float64) for v in "xwbt")
        y_ref = x64 @ w64 + b64
        y_got, loss, dx, dw, db = run(gg, backend, feeds)
        close(y_got, y_ref, f"dense {fan_in}->{units} forward, n={n}")
        dy = mse_grad(y_ref, t64)
        close(dx, dy @ w64.T, f"dense {fan_in}->{units} d/dx (dy @ w^T, k = units), n={n}")
        close(dw, x64.T @ dy, f"dense {fan_in}->{units} d/dw (x^T @ dy, k = batch), n={n}")
        close(db, dy.sum(0), f"dense {fan_in}->{units} d/db, n={n}")


def test_dense_one_feature_is_x_times_w():
    """The issue's one-liner: dense(x (N,1), W (1,4)) with x = 3 is 3 * W, not 0."""
    g = gc.Graph("one_feature")
    x = g.input("x", (None, 1))
    w = g.input("w", (1, 4))
    g.output(ops.dense(x, w))
    wv = np.array([[1, 1, 1, 1]], np.float32)
    for backend in BACKENDS:
        out = run(g, backend, {"x": np.full((2, 1), 3, np.float32), "w": wv})
        np.testing.assert_array_equal(out, np.full((2, 4), 3, np.float32))


# (a_shape, b_shape, transpose_a, transpose_b) with an inner (reduction) or outer dimension of 1
MATMULS = [((None, 1), (1, 4), False, False), ((None, 1), (4, 1), False, True),
           ((None, 1), (None, 1), True, False), ((None, 3), (3, 1), False, False),
           ((None, 1), (None, 5), True, False), ((1, 1), (1, 1), False, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(MATMULS)))
def test_matmul_size1_forward_and_gradients(case, backend):
    a_shape, b_shape, ta, tb = MATMULS[case]
    g = gc.Graph(f"matmul_edge{case}")
    a = g.input("a", a_shape)
    bm = g.input("bm", b_shape)
    y = ops.matmul(a, bm, transpose_a=ta, transpose_b=tb)
    t = g.input("t", y.type.shape)
    g.output(y, ops.mse(y, t))
    gg = gc.grad(g, wrt=["a", "bm"])
    rng = np.random.default_rng(case)
    for n in BATCHES:
        concrete = lambda s: tuple(n if d is None else d for d in s)
        feeds = {"a": f32(rng, concrete(a_shape)), "bm": f32(rng, concrete(b_shape))}
        a64, b64 = feeds["a"].astype(np.float64), feeds["bm"].astype(np.float64)
        opa, opb = (a64.T if ta else a64), (b64.T if tb else b64)
        y_ref = opa @ opb
        feeds["t"] = f32(rng, y_ref.shape)
        y_got, loss, da, db = run(gg, backend, feeds)
        close(y_got, y_ref, f"matmul {MATMULS[case]} forward, n={n}")
        dy = mse_grad(y_ref, feeds["t"].astype(np.float64))
        d_opa, d_opb = dy @ opb.T, opa.T @ dy
        close(da, d_opa.T if ta else d_opa, f"matmul {MATMULS[case]} d/da, n={n}")
        close(db, d_opb.T if tb else d_opb, f"matmul {MATMULS[case]} d/db, n={n}")


def test_dense1_head_trains_the_layer_below():
    """A Dense(1) head's backward matmul (dy @ w^T with k = 1) must pass a non-zero gradient down."""
    g = gc.Graph("dense1_head")
    x = g.input("x", (None, 6))
    w1 = g.input("w1", (6, 5))
    w2 = g.input("w2", (5, 1))
    h = ops.tanh(ops.dense(x, w1))
    y = ops.dense(h, w2)
    t = g.input("t", (None, 1))
    g.output(ops.mse(y, t))
    gg = gc.grad(g, wrt=["w1"])
    rng = np.random.default_rng(7)
    feeds = {"x": f32(rng, (4, 6)), "w1": f32(rng, (6, 5)), "w2": f32(rng, (5, 1)), "t": f32(rng, (4, 1))}
    x64, w1_64, w2_64, t64 = (feeds[k].astype(np.float64) for k in ("x", "w1", "w2", "t"))
    h64 = np.tanh(x64 @ w1_64)
    dy = mse_grad(h64 @ w2_64, t64)
    want = x64.T @ ((dy @ w2_64.T) * (1 - h64 ** 2))
    assert np.abs(want).max() > 1e-3
    for backend in BACKENDS:
        _, dw1 = run(gg, backend, feeds)
        close(dw1, want, f"{backend}: d/dw1 below a Dense(1) head")


# ------------------------------------------------------------------------------------------------------
# pools: (kind, in_hwc, pool, stride, padding)

POOLS = [
    ("max", (1, 1, 3), (1, 1), (1, 1), ((0, 0), (0, 0))),       # 1x1 image, 1x1 window
    ("avg", (1, 1, 1), (1, 1), (1, 1), ((0, 0), (0, 0))),
    ("max", (3, 4, 2), (3, 4), (1, 1), ((0, 0), (0, 0))),       # window = image
    ("avg", (3, 4, 2), (3, 4), (3, 4), ((0, 0), (0, 0))),
    ("max", (7, 7, 1), (2, 2), (3, 3), ((0, 0), (0, 0))),       # stride > window
    ("avg", (7, 7, 1), (2, 2), (3, 3), ((0, 0), (0, 0))),
    ("max", (4, 5, 3), (3, 2), (2, 1), ((2, 0), (0, 1))),       # explicit asymmetric padding
    ("avg", (4, 5, 3), (3, 2), (2, 1), ((2, 0), (0, 1))),
    ("max", (1, 1, 2), (2, 2), (1, 1), ((1, 0), (0, 1))),       # 1x1 image padded to the window
    ("avg", (1, 6, 1), (1, 3), (1, 3), ((0, 0), (0, 0))),       # height 1
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(POOLS)))
def test_pool_edge_geometry_forward_and_gradient(case, backend):
    kind, hwc, pool, stride, pads = POOLS[case]
    g = gc.Graph(f"pool_edge{case}")
    x = g.input("x", (None,) + hwc)
    fn = ops.max_pool2d if kind == "max" else ops.avg_pool2d
    y = fn(x, pool=pool, stride=stride, padding=pads)
    t = g.input("t", y.type.shape)
    g.output(y, ops.mse(y, t))
    gg = gc.grad(g, wrt=["x"])
    rng = np.random.default_rng(case)
    for n in BATCHES:
        # distinct values: the routed maximum is unambiguous
        xv = rng.permutation(n * int(np.prod(hwc))).reshape((n,) + hwc).astype(np.float32) / 7
        t_shape = (n,) + tuple(y.type.shape[1:])
        tv = f32(rng, t_shape)
        y_ref, dx_ref = ref_pool(kind, xv.astype(np.float64), lambda yr: mse_grad(yr, tv.astype(np.float64)),
                                 pool, stride, pads)
        y_got, loss, dx = run(gg, backend, {"x": xv, "t": tv})
        close(y_got, y_ref, f"{POOLS[case]} forward, n={n}")
        close(dx, dx_ref, f"{POOLS[case]} d/dx, n={n}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_avg_pool_on_1x1_and_one_channel(backend):
    for hwc in ((1, 1, 1), (1, 1, 5), (3, 2, 1)):
        g = gc.Graph("gap")
        x = g.input("x", (None,) + hwc)
        y = ops.global_avg_pool2d(x)
        t = g.input("t", (None, hwc[2]))
        g.output(y, ops.mse(y, t))
        gg = gc.grad(g, wrt=["x"])
        rng = np.random.default_rng(sum(hwc))
        for n in BATCHES:
            xv, tv = f32(rng, (n,) + hwc), f32(rng, (n, hwc[2]))
            y_ref = xv.astype(np.float64).mean((1, 2))
            dy = mse_grad(y_ref, tv.astype(np.float64))
            y_got, loss, dx = run(gg, backend, {"x": xv, "t": tv})
            close(y_got, y_ref, f"gap {hwc} forward")
            close(dx, np.broadcast_to(dy[:, None, None, :] / (hwc[0] * hwc[1]), xv.shape), f"gap {hwc} d/dx")
