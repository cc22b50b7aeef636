"""backends/numpy/kernels.py against independent references: naive explicit-loop kernels (written here,
float64, tiny shapes), central finite differences of the forward kernels (float64), closed-form loss
values, the dropout hash recomputed with Python ints, and the Keras optimizer formulas."""
import ast
import math

import numpy as np
import pytest

from backends.numpy import kernels as K

VALID = ((0, 0), (0, 0))


# ---------------------------------------------------------------------------------------------------
# naive references (explicit loops; padding handled by skipping out-of-range cells)

def out_size(size, p0, p1, extent, stride):
    return (size + p0 + p1 - extent) // stride + 1


def ref_conv2d(x, w, b, stride, padding, dilation, activation="linear"):
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    (pt, pb), (pl, pr) = padding
    oh = out_size(h, pt, pb, dilation[0] * (kh - 1) + 1, stride[0])
    ow = out_size(wd, pl, pr, dilation[1] * (kw - 1) + 1, stride[1])
    y = np.zeros((n, oh, ow, f))
    for bi in range(n):
        for i in range(oh):
            for j in range(ow):
                for fo in range(f):
                    acc = 0.0 if b is None else float(b[fo])
                    for p in range(kh):
                        for q in range(kw):
                            r, s = i * stride[0] + p * dilation[0] - pt, j * stride[1] + q * dilation[1] - pl
                            if 0 <= r < h and 0 <= s < wd:
                                for ci in range(c):
                                    acc += float(x[bi, r, s, ci]) * float(w[p, q, ci, fo])
                    y[bi, i, j, fo] = ref_activation(acc, activation)
    return y


def ref_activation(v, activation):
    if activation == "relu":
        return max(v, 0.0)
    if activation == "sigmoid":
        return 1.0 / (1.0 + math.exp(-v))
    if activation == "tanh":
        return math.tanh(v)
    return v


def ref_conv2d_grads(x, w, dy, stride, padding, dilation):
    """(dx, dw) of sum(dy * conv2d(x, w)) by scattering every multiply-add of the forward loop."""
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    (pt, _), (pl, _) = padding
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    for bi in range(n):
        for i in range(dy.shape[1]):
            for j in range(dy.shape[2]):
                for p in range(kh):
                    for q in range(kw):
                        r, s = i * stride[0] + p * dilation[0] - pt, j * stride[1] + q * dilation[1] - pl
                        if not (0 <= r < h and 0 <= s < wd):
                            continue
                        for ci in range(c):
                            for fo in range(f):
                                dx[bi, r, s, ci] += dy[bi, i, j, fo] * w[p, q, ci, fo]
                                dw[p, q, ci, fo] += x[bi, r, s, ci] * dy[bi, i, j, fo]
    return dx, dw


def window_cells(i, j, pool, stride, padding, h, wd):
    """Real (non-padding) cells of window (i, j) in row-major (kh, kw) order, and the window size."""
    (pt, _), (pl, _) = padding
    cells = []
    for p in range(pool[0]):
        for q in range(pool[1]):
            r, s = i * stride[0] + p - pt, j * stride[1] + q - pl
            if 0 <= r < h and 0 <= s < wd:
                cells.append((r, s))
    return cells


def pool_out_hw(shape, pool, stride, padding):
    return (out_size(shape[1], *padding[0], pool[0], stride[0]), out_size(shape[2], *padding[1], pool[1], stride[1]))


def ref_pool(x, pool, stride, padding, mode, count_include_pad=False):
    n, h, wd, c = x.shape
    oh, ow = pool_out_hw(x.shape, pool, stride, padding)
    y = np.zeros((n, oh, ow, c))
    for bi in range(n):
        for i in range(oh):
            for j in range(ow):
                cells = window_cells(i, j, pool, stride, padding, h, wd)
                for ch in range(c):
                    vals = [float(x[bi, r, s, ch]) for r, s in cells]
                    if mode == "max":
                        y[bi, i, j, ch] = max(vals)
                    else:
                        y[bi, i, j, ch] = sum(vals) / (pool[0] * pool[1] if count_include_pad else len(vals))
    return y


def ref_pool_grad(x_shape, dy, pool, stride, padding, mode, x=None, count_include_pad=False):
    n, h, wd, c = x_shape
    dx = np.zeros(x_shape)
    for bi in range(n):
        for i in range(dy.shape[1]):
            for j in range(dy.shape[2]):
                cells = window_cells(i, j, pool, stride, padding, h, wd)
                for ch in range(c):
                    g = float(dy[bi, i, j, ch])
                    if mode == "max":
                        vals = [x[bi, r, s, ch] for r, s in cells]
                        r, s = cells[vals.index(max(vals))]          # list.index: the FIRST maximum
                        dx[bi, r, s, ch] += g
                    else:
                        div = pool[0] * pool[1] if count_include_pad else len(cells)
                        for r, s in cells:
                            dx[bi, r, s, ch] += g / div
    return dx


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of x (perturbed in place)."""
    g = np.zeros(x.shape)
    flat = x.reshape(-1)
    assert np.shares_memory(flat, x)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        g.reshape(-1)[i] = (fp - fm) / (2 * eps)
    return g


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# convolution

CONV_CASES = [
    # x shape,      (kh, kw, f), stride, padding,              dilation
    ((1, 5, 5, 1), (3, 3, 2), (1, 1), VALID, (1, 1)),
    ((3, 6, 5, 2), (3, 2, 3), (2, 2), VALID, (1, 1)),
    ((3, 5, 5, 2), (3, 3, 2), (1, 1), ((1, 1), (1, 1)), (1, 1)),       # "same"
    ((1, 6, 6, 2), (3, 3, 2), (2, 2), ((0, 1), (0, 1)), (1, 1)),       # TF "same", stride 2
    ((3, 5, 6, 3), (2, 3, 2), (1, 2), ((2, 0), (1, 3)), (1, 1)),       # asymmetric explicit
    ((1, 7, 7, 2), (3, 3, 3), (1, 1), VALID, (2, 2)),
    ((3, 7, 6, 1), (2, 2, 2), (2, 1), ((1, 2), (0, 1)), (2, 2)),
    ((1, 4, 4, 3), (1, 1, 4), (1, 1), VALID, (1, 1)),                  # 1x1: im2col is a view
]


@pytest.mark.parametrize("xs,kf,stride,padding,dilation", CONV_CASES)
def test_conv2d_matches_naive_loops(rng, xs, kf, stride, padding, dilation):
    x = rng.standard_normal(xs)
    w = rng.standard_normal(kf[:2] + (xs[3], kf[2]))
    b = rng.standard_normal(kf[2])
    want = ref_conv2d(x, w, b, stride, padding, dilation)
    out = np.empty(want.shape, np.float32)
    got = K.conv2d(f32(x), f32(w), f32(b), out, stride, padding, dilation)
    assert got is out and out.dtype == np.float32
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["linear", "relu", "sigmoid", "tanh"])
def test_conv2d_fused_bias_activation(rng, activation):
    x, w, b = rng.standard_normal((3, 5, 4, 2)), rng.standard_normal((2, 3, 2, 3)), rng.standard_normal(3)
    want = ref_conv2d(x, w, b, (1, 1), ((1, 0), (1, 1)), (1, 1), activation)
    out = np.empty(want.shape, np.float32)
    K.conv2d(f32(x), f32(w), f32(b), out, (1, 1), ((1, 0), (1, 1)), (1, 1), activation)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    no_bias = np.empty(want.shape, np.float32)
    K.conv2d(f32(x), f32(w), None, no_bias, (1, 1), ((1, 0), (1, 1)), (1, 1))
    np.testing.assert_allclose(no_bias, ref_conv2d(x, w, None, (1, 1), ((1, 0), (1, 1)), (1, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("xs,kf,stride,padding,dilation", CONV_CASES)
def test_conv2d_grads_match_naive_scatter(rng, xs, kf, stride, padding, dilation):
    x = rng.standard_normal(xs)
    w = rng.standard_normal(kf[:2] + (xs[3], kf[2]))
    y_shape = ref_conv2d(x, w, None, stride, padding, dilation).shape
    dy = rng.standard_normal(y_shape)
    want_dx, want_dw = ref_conv2d_grads(x, w, dy, stride, padding, dilation)
    dx, dw = np.empty(xs, np.float32), np.empty(w.shape, np.float32)
    K.conv2d_grad_input(f32(dy), f32(w), dx, stride, padding, dilation)
    K.conv2d_grad_filter(f32(x), f32(dy), dw, stride, padding, dilation)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


def test_conv2d_batch_chunking_gives_the_same_result(rng, monkeypatch):
    x, w = rng.standard_normal((5, 6, 6, 2)), rng.standard_normal((3, 3, 2, 3))
    stride, padding, dilation = (1, 2), ((1, 1), (2, 0)), (1, 1)
    want = ref_conv2d(x, w, None, stride, padding, dilation)
    dy = rng.standard_normal(want.shape)
    want_dx, want_dw = ref_conv2d_grads(x, w, dy, stride, padding, dilation)
    monkeypatch.setattr(K, "IM2COL_CHUNK_BYTES", 1)     # one sample per chunk
    assert len(K._batch_chunks(5, 100)) == 5
    out, dx, dw = np.empty(want.shape, np.float32), np.empty(x.shape, np.float32), np.empty(w.shape, np.float32)
    K.conv2d(f32(x), f32(w), None, out, stride, padding, dilation)
    K.conv2d_grad_input(f32(dy), f32(w), dx, stride, padding, dilation)
    K.conv2d_grad_filter(f32(x), f32(dy), dw, stride, padding, dilation)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


def random_conv_geometry(seed):
    r = np.random.default_rng(seed)
    n, c, f = int(r.integers(1, 3)), int(r.integers(1, 4)), int(r.integers(1, 4))
    kh, kw = int(r.integers(1, 4)), int(r.integers(1, 4))
    stride, dilation = tuple(int(v) for v in r.integers(1, 3, 2)), tuple(int(v) for v in r.integers(1, 3, 2))
    pads = tuple(tuple(int(v) for v in r.integers(0, 3, 2)) for _ in range(2))
    h, wd = int(r.integers(dilation[0] * (kh - 1) + 1, 7)), int(r.integers(dilation[1] * (kw - 1) + 1, 7))
    return r, (n, h, wd, c), (kh, kw, c, f), stride, pads, dilation


@pytest.mark.parametrize("seed", range(5))
def test_conv2d_grads_match_finite_differences(seed):
    r, xs, ws, stride, pads, dilation = random_conv_geometry(seed)
    x, w = r.standard_normal(xs), r.standard_normal(ws)
    y = np.empty((xs[0], out_size(xs[1], *pads[0], dilation[0] * (ws[0] - 1) + 1, stride[0]),
                  out_size(xs[2], *pads[1], dilation[1] * (ws[1] - 1) + 1, stride[1]), ws[3]))
    dy = r.standard_normal(y.shape)

    def loss():          # float64 end to end: the kernels follow out's dtype
        return float(np.sum(K.conv2d(x, w, None, y, stride, pads, dilation) * dy))

    dx, dw = np.empty(xs), np.empty(ws)
    K.conv2d_grad_input(dy, w, dx, stride, pads, dilation)
    K.conv2d_grad_filter(x, dy, dw, stride, pads, dilation)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# pooling

POOL_CASES = [
    # x shape,      pool,   stride, padding
    ((1, 4, 4, 1), (2, 2), (2, 2), VALID),
    ((3, 5, 5, 2), (2, 2), (2, 2), ((0, 1), (0, 1))),            # TF "same" for 5 -> 3
    ((1, 5, 6, 2), (3, 3), (1, 1), ((1, 1), (1, 1))),            # overlapping, "same"
    ((3, 6, 5, 1), (3, 2), (2, 1), ((1, 0), (0, 1))),            # asymmetric explicit
    ((1, 7, 7, 3), (3, 3), (2, 2), ((2, 1), (1, 2))),
    ((3, 4, 5, 2), (2, 3), (1, 2), VALID),
]


@pytest.mark.parametrize("xs,pool,stride,padding", POOL_CASES)
def test_max_pool2d_and_grad_match_naive_loops(rng, xs, pool, stride, padding):
    x = rng.standard_normal(xs)
    want = ref_pool(x, pool, stride, padding, "max")
    out = np.empty(want.shape, np.float32)
    K.max_pool2d(f32(x), out, pool, stride, padding)
    np.testing.assert_array_equal(out, f32(want))             # a max is exact
    dy = rng.standard_normal(want.shape)
    dx = np.empty(xs, np.float32)
    K.max_pool2d_grad(f32(x), f32(dy), dx, pool, stride, padding)
    np.testing.assert_allclose(dx, ref_pool_grad(xs, dy, pool, stride, padding, "max", x=f32(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("xs,pool,stride,padding", POOL_CASES)
def test_avg_pool2d_and_grad_match_naive_loops(rng, xs, pool, stride, padding, count_include_pad):
    x = rng.standard_normal(xs)
    want = ref_pool(x, pool, stride, padding, "avg", count_include_pad)
    out = np.empty(want.shape, np.float32)
    K.avg_pool2d(f32(x), out, pool, stride, padding, count_include_pad)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    dy = rng.standard_normal(want.shape)
    dx = np.empty(xs, np.float32)
    K.avg_pool2d_grad(f32(dy), dx, pool, stride, padding, count_include_pad)
    want_dx = ref_pool_grad(xs, dy, pool, stride, padding, "avg", count_include_pad=count_include_pad)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-6)


def test_avg_pool2d_padding_divisors_by_hand():
    x = np.ones((1, 3, 3, 1), np.float32)
    out = np.empty((1, 2, 2, 1), np.float32)
    # 2x2 windows, stride 2, one padding row/col at the bottom/right: windows hold 4, 2, 2, 1 real cells
    K.avg_pool2d(x, out, (2, 2), (2, 2), ((0, 1), (0, 1)), count_include_pad=False)
    np.testing.assert_array_equal(out[0, :, :, 0], [[1, 1], [1, 1]])
    K.avg_pool2d(x, out, (2, 2), (2, 2), ((0, 1), (0, 1)), count_include_pad=True)
    np.testing.assert_array_equal(out[0, :, :, 0], [[1, 0.5], [0.5, 0.25]])


@pytest.mark.parametrize("pool,stride,padding", [((2, 2), (2, 2), VALID), ((3, 2), (1, 2), ((1, 1), (0, 1)))])
def test_max_pool2d_grad_batch_chunking_gives_the_same_result(rng, monkeypatch, pool, stride, padding):
    x = rng.standard_normal((4, 5, 6, 2))
    dy = rng.standard_normal(ref_pool(x, pool, stride, padding, "max").shape)
    monkeypatch.setattr(K, "IM2COL_CHUNK_BYTES", 1)     # one sample per chunk
    dx = np.empty(x.shape, np.float32)
    K.max_pool2d_grad(f32(x), f32(dy), dx, pool, stride, padding)
    np.testing.assert_allclose(dx, ref_pool_grad(x.shape, dy, pool, stride, padding, "max", x=f32(x)),
                               rtol=1e-6, atol=1e-6)


def test_max_pool2d_grad_ties_go_to_the_first_maximum_and_overlaps_accumulate():
    x = np.ones((1, 3, 3, 1), np.float32)
    dy = np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1)
    dx = np.empty_like(x)
    K.max_pool2d_grad(x, dy, dx, (2, 2), (1, 1), VALID)
    # every window is all ties: each one's gradient goes to its top-left cell
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 2, 0], [3, 4, 0], [0, 0, 0]])
    x = np.array([[5, 1, 0], [1, 5, 0], [0, 0, 0]], np.float32).reshape(1, 3, 3, 1)
    K.max_pool2d_grad(x, dy, dx, (2, 2), (1, 1), VALID)
    # windows (0,0) and (1,1) hit the first 5 / the second 5; (0,1) and (1,0) both pick (1,1)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 0, 0], [0, 2 + 3 + 4, 0], [0, 0, 0]])


def test_max_pool2d_padding_is_never_selected():
    x = -np.ones((1, 2, 2, 1), np.float32) * 3
    out = np.empty((1, 2, 2, 1), np.float32)
    K.max_pool2d(x, out, (2, 2), (1, 1), ((1, 0), (1, 0)))
    np.testing.assert_array_equal(out, -3)
    dx = np.empty_like(x)
    K.max_pool2d_grad(x, np.ones_like(out), dx, (2, 2), (1, 1), ((1, 0), (1, 0)))
    np.testing.assert_array_equal(dx[0, :, :, 0], [[4, 0], [0, 0]])   # all windows' first real cell


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["max", "avg_valid_count", "avg_include_pad"])
def test_pool_grads_match_finite_differences(seed, mode):
    r = np.random.default_rng(100 + seed)
    pool = tuple(int(v) for v in r.integers(2, 4, 2))
    stride = tuple(int(v) for v in r.integers(1, 3, 2))
    pads = tuple((int(r.integers(0, k)), int(r.integers(0, k))) for k in pool)
    xs = (int(r.integers(1, 3)), int(r.integers(pool[0], 7)), int(r.integers(pool[1], 7)), int(r.integers(1, 3)))
    x = r.standard_normal(xs)
    y = np.empty((xs[0],) + pool_out_hw(xs, pool, stride, pads) + (xs[3],))
    dy = r.standard_normal(y.shape)
    dx = np.empty(xs)
    if mode == "max":
        def loss():
            return float(np.sum(K.max_pool2d(x, y, pool, stride, pads) * dy))
        K.max_pool2d_grad(x, dy, dx, pool, stride, pads)
    else:
        include = mode == "avg_include_pad"

        def loss():
            return float(np.sum(K.avg_pool2d(x, y, pool, stride, pads, include) * dy))
        K.avg_pool2d_grad(dy, dx, pool, stride, pads, include)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-7)


def test_global_avg_pool2d_and_grad(rng):
    x = rng.standard_normal((3, 4, 5, 2))
    want = np.zeros((3, 2))
    for n in range(3):
        for c in range(2):
            want[n, c] = sum(x[n, i, j, c] for i in range(4) for j in range(5)) / 20
    out = np.empty((3, 2), np.float32)
    K.global_avg_pool2d(f32(x), out)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    dy = rng.standard_normal((3, 2))
    y, dx = np.empty((3, 2)), np.empty(x.shape)
    K.global_avg_pool2d_grad(dy, dx)
    np.testing.assert_allclose(dx, numeric_grad(lambda: float(np.sum(K.global_avg_pool2d(x, y) * dy)), x),
                               rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------
# dense algebra and elementwise arithmetic

@pytest.mark.parametrize("activation", ["linear", "relu", "sigmoid", "tanh"])
def test_dense_matches_loops(rng, activation):
    x, w, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    want = np.array([[ref_activation(sum(x[i, k] * w[k, j] for k in range(4)) + b[j], activation)
                      for j in range(5)] for i in range(3)])
    out = np.empty((3, 5), np.float32)
    K.dense(f32(x), f32(w), f32(b), out, activation)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_transposes(rng, ta, tb):
    a = rng.standard_normal((4, 3) if ta else (3, 4))
    b = rng.standard_normal((5, 4) if tb else (4, 5))
    aa, bb = (a.T if ta else a), (b.T if tb else b)
    want = np.array([[sum(aa[i, k] * bb[k, j] for k in range(4)) for j in range(5)] for i in range(3)])
    out = np.empty((3, 5), np.float32)
    K.matmul(f32(a), f32(b), out, transpose_a=ta, transpose_b=tb)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_bias_add_and_grad(rng):
    x, b = rng.standard_normal((2, 3, 4)), rng.standard_normal(4)
    out = np.empty(x.shape, np.float32)
    K.bias_add(f32(x), f32(b), out)
    np.testing.assert_allclose(out, x + b[None, None, :], rtol=1e-6, atol=1e-6)
    dy = rng.standard_normal(x.shape)
    db = np.empty(4, np.float32)
    K.bias_add_grad(f32(dy), db)
    want = [sum(dy[i, j, c] for i in range(2) for j in range(3)) for c in range(4)]
    np.testing.assert_allclose(db, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel,op", [(K.add, lambda a, b: a + b), (K.sub, lambda a, b: a - b),
                                       (K.mul, lambda a, b: a * b)])
@pytest.mark.parametrize("sa,sb", [((2, 3), (2, 3)), ((2, 3), (3,)), ((2, 1, 4), (3, 1)), ((), (2, 2))])
def test_binary_broadcasting(rng, kernel, op, sa, sb):
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    shape = np.broadcast_shapes(sa, sb)
    want = np.zeros(shape)
    for idx in np.ndindex(shape):   # explicit broadcasting: size-1 (or missing) axes index 0
        ia = tuple(0 if d == 1 else i for i, d in zip(idx[len(shape) - len(sa):], sa))
        ib = tuple(0 if d == 1 else i for i, d in zip(idx[len(shape) - len(sb):], sb))
        want[idx] = op(a[ia], b[ib])
    out = np.empty(shape, np.float32)
    kernel(f32(a), f32(b), out)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("xs,os", [((2, 3, 4), (3, 4)), ((2, 3, 4), (1, 4)), ((2, 3, 4), (2, 1, 1)),
                                   ((2, 3, 4), ()), ((2, 3), (2, 3)), ((3, 1, 4), (1, 4))])
def test_sum_to_is_the_adjoint_of_broadcasting(rng, xs, os):
    x = rng.standard_normal(xs)
    want = np.zeros(os)
    for idx in np.ndindex(xs):
        tail = idx[len(xs) - len(os):]
        want[tuple(0 if d == 1 else i for i, d in zip(tail, os))] += x[idx]
    out = np.empty(os, np.float32)
    K.sum_to(f32(x), out)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# activations

def test_activations_match_formulas(rng):
    x = rng.standard_normal((3, 7)) * 4
    for kernel, fn in [(K.relu, lambda v: max(v, 0.0)), (K.sigmoid, lambda v: 1 / (1 + math.exp(-v))),
                       (K.tanh, math.tanh)]:
        out = np.empty(x.shape, np.float32)
        kernel(f32(x), out)
        np.testing.assert_allclose(out, np.vectorize(fn)(f32(x).astype(np.float64)), rtol=1e-6, atol=1e-7)


def test_sigmoid_does_not_overflow():
    x = np.array([-1000, -80, -20, 0, 20, 100, 1000], np.float32)
    out = np.empty_like(x)
    with np.errstate(over="raise", invalid="raise", divide="raise"):      # underflow to 0 is fine
        K.sigmoid(x, out)
    # relative accuracy is kept for tiny outputs (exp(-80) is still a normal float32)
    np.testing.assert_allclose(out[1:], [math.exp(-80), 1 / (1 + math.exp(20)), 0.5, 1, 1, 1], rtol=1e-5, atol=0)
    assert 0 <= out[0] < 1e-38 and out[-1] == 1          # far left: saturates at a denormal (or 0)
    assert np.all(np.diff(out) >= 0)


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh"])
def test_activation_grads_match_finite_differences(rng, name):
    x = rng.standard_normal((3, 5)) * 2
    x[np.abs(x) < 1e-3] = 0.5                     # keep relu away from its kink
    fwd, grad = getattr(K, name), getattr(K, name + "_grad")
    dy, y = rng.standard_normal(x.shape), np.empty(x.shape)
    fwd(x, y)
    dx = np.empty(x.shape)
    grad(y.copy(), dy, dx)
    np.testing.assert_allclose(dx, numeric_grad(lambda: float(np.sum(fwd(x, np.empty(x.shape)) * dy)), x),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_and_log_softmax(rng, axis):
    x = rng.standard_normal((3, 4, 2)) * 3
    e = np.exp(x)
    want = e / e.sum(axis=axis, keepdims=True)
    out = np.empty(x.shape, np.float32)
    K.softmax(f32(x), out, axis=axis)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)
    K.log_softmax(f32(x), out, axis=axis)
    np.testing.assert_allclose(out, np.log(want), rtol=1e-5, atol=1e-6)
    # finite differences of the float64 forward kernels
    dy = rng.standard_normal(x.shape)
    for fwd, grad in [(K.softmax, K.softmax_grad), (K.log_softmax, K.log_softmax_grad)]:
        y = fwd(x, np.empty(x.shape), axis=axis)
        dx = grad(y, dy, np.empty(x.shape), axis=axis)
        num = numeric_grad(lambda: float(np.sum(fwd(x, np.empty(x.shape), axis=axis) * dy)), x)
        np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)


def test_softmax_is_stable_for_huge_logits():
    x = np.array([[1000, 1000, -1000], [-1e30, 0, 0]], np.float32)
    out = np.empty_like(x)
    with np.errstate(over="raise", invalid="raise"):
        K.softmax(x, out)
    np.testing.assert_allclose(out, [[0.5, 0.5, 0], [0, 0.5, 0.5]])
    K.log_softmax(x, out)
    np.testing.assert_allclose(out[0, :2], [-math.log(2)] * 2, rtol=1e-6)


def test_in_place_aliasing_used_by_the_memory_planner(rng):
    """The planner lets unary ops reuse x, activation grads reuse dy, binary ops reuse a."""
    x = f32(rng.standard_normal((4, 6)) * 3)
    y = np.empty_like(x)
    for name in ["relu", "sigmoid", "tanh"]:
        want = getattr(K, name)(x, np.empty_like(x))
        buf = x.copy()
        np.testing.assert_array_equal(getattr(K, name)(buf, buf), want)
        getattr(K, name)(x, y)
        dy = f32(rng.standard_normal(x.shape))
        want = getattr(K, name + "_grad")(y, dy, np.empty_like(x))
        buf = dy.copy()
        np.testing.assert_array_equal(getattr(K, name + "_grad")(y, buf, buf), want)
    b = f32(rng.standard_normal(6))
    for kernel in [K.add, K.sub, K.mul, K.bias_add]:
        want = kernel(x, b, np.empty_like(x))
        buf = x.copy()
        np.testing.assert_array_equal(kernel(buf, b, buf), want)
    want = K.dropout(x, np.empty_like(x), 0.5, 3, 4)
    buf = x.copy()
    np.testing.assert_array_equal(K.dropout(buf, buf, 0.5, 3, 4), want)


def test_layout_copies(rng):
    x = f32(rng.standard_normal((2, 3, 4)))
    out = np.empty((4, 6), np.float32)
    K.reshape(x, out)
    np.testing.assert_array_equal(out, x.reshape(4, 6))
    out = np.empty((2, 12), np.float32)
    K.flatten(x, out)
    np.testing.assert_array_equal(out, x.reshape(2, 12))
    out = np.empty((4, 2, 3), np.float32)
    K.transpose(x, out, (2, 0, 1))
    for i, j, k in np.ndindex(x.shape):
        assert out[k, i, j] == x[i, j, k]


# ---------------------------------------------------------------------------------------------------
# dropout

def py_mix32(x):
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2 ** 32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2 ** 32
    x ^= x >> 16
    return x


def test_mix32_hand_values():
    assert py_mix32(0) == 0 and K.mix32(0) == 0           # every step maps 0 to 0
    # mix32(1) by hand: 1 ^ (1 >> 16) = 1; * 0x7feb352d = 0x7feb352d; ^ (>> 15 = 0xffd6) = 0x7febcafb;
    # * 0x846ca68b mod 2**32 = 0x6889f849; ^ (>> 16 = 0x6889) = 0x688990c0
    assert 0x7FEB352D >> 15 == 0xFFD6 and 0x7FEB352D ^ 0xFFD6 == 0x7FEBCAFB
    assert (0x7FEBCAFB * 0x846CA68B) % 2 ** 32 == 0x6889F849 and 0x6889F849 ^ 0x6889 == 0x688990C0
    assert K.mix32(1) == 0x688990C0
    # pinned outputs: a change here breaks mask agreement with the LLVM backend
    assert K.mix32(2) == 0xD1132181 and K.mix32(0xDEADBEEF) == 0xE628C683
    arr = np.array([0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF, 123456789], np.uint32)
    assert K.mix32(arr).dtype == np.uint32
    assert K.mix32(arr).tolist() == [py_mix32(int(v)) for v in arr] == [K.mix32(int(v)) for v in arr]


def test_dropout_mask_follows_the_contract_hash():
    shape, rate, seed, step = (3, 5, 4), 0.3, 1234567, 89
    key = py_mix32((seed * 0x9E3779B9 + step) % 2 ** 32)
    threshold = math.floor(rate * 2 ** 32)
    want = np.array([py_mix32((i ^ key) % 2 ** 32) >= threshold for i in range(60)]).reshape(shape)
    mask = K.dropout_mask(shape, rate, seed, step)
    assert mask.dtype == bool and mask.shape == shape
    np.testing.assert_array_equal(mask, want)


def test_dropout_mask_determinism_and_keep_fraction():
    a = K.dropout_mask((100, 1000), 0.3, seed=7, step=11)
    np.testing.assert_array_equal(a, K.dropout_mask((100, 1000), 0.3, seed=7, step=11))
    assert (a != K.dropout_mask((100, 1000), 0.3, seed=7, step=12)).mean() > 0.3
    assert (a != K.dropout_mask((100, 1000), 0.3, seed=8, step=11)).mean() > 0.3
    for rate in (0.1, 0.3, 0.5, 0.9):
        keep = K.dropout_mask((100_000,), rate, seed=3, step=1).mean()
        assert abs(keep - (1 - rate)) < 0.01        # binomial std is <= 0.0016 at n = 100k
    assert K.dropout_mask((1000,), 0.0, 1, 2).all()


def test_dropout_and_grad(rng):
    x = f32(rng.standard_normal((4, 50)))
    keep = K.dropout_mask(x.shape, 0.25, 5, 6)
    out = np.empty_like(x)
    K.dropout(x, out, 0.25, 5, 6)
    np.testing.assert_allclose(out, np.where(keep, x / 0.75, 0), rtol=1e-6)
    dy = f32(rng.standard_normal(x.shape))
    K.dropout_grad(dy, out, 0.25, 5, 6)
    np.testing.assert_allclose(out, np.where(keep, dy / 0.75, 0), rtol=1e-6)
    K.dropout(x, out, 0.0, 5, 6)
    np.testing.assert_array_equal(out, x)


# ---------------------------------------------------------------------------------------------------
# losses

def scalar_out():
    return np.empty((), np.float32)


@pytest.mark.parametrize("k", [2, 10])
def test_crossentropies_of_uniform_predictions_are_log_k(k):
    labels = np.array([0, k - 1, 1], np.int32)
    onehot = np.eye(k, dtype=np.float32)[labels]
    cases = [(K.sparse_categorical_crossentropy, labels), (K.categorical_crossentropy, onehot)]
    for kernel, target in cases:
        out = scalar_out()
        kernel(np.full((3, k), 2.5, np.float32), target, out, from_logits=True)
        assert out.shape == () and math.isclose(float(out), math.log(k), rel_tol=1e-6)
        kernel(np.full((3, k), 1 / k, np.float32), target, out, from_logits=False)
        assert math.isclose(float(out), math.log(k), rel_tol=1e-6)
        kernel(np.full((3, k), 0.7, np.float32), target, out)   # unnormalized: q / sum(q) is uniform too
        assert math.isclose(float(out), math.log(k), rel_tol=1e-6)


def test_crossentropy_closed_forms():
    # perfect one-hot probabilities: the clip gives -log((1 - 1e-7) / (1 + 1e-7)) ~ 2e-7 per sample
    p, out = np.array([[1.0, 0.0, 0.0]]), np.empty(())
    K.sparse_categorical_crossentropy(p, np.array([0]), out)
    assert math.isclose(float(out), -math.log((1 - 1e-7) / (1 + 1e-7)), rel_tol=1e-9)
    # a wrong confident prediction: -log(1e-7 / (1 + 1e-7))
    K.sparse_categorical_crossentropy(p, np.array([2.0]), out)
    assert math.isclose(float(out), -math.log(1e-7 / (1 + 1e-7)), rel_tol=1e-9)
    # logits [0, log 3]: softmax = [1/4, 3/4]; labels 0 and 1 -> mean(log 4, log 4/3)
    logits = np.array([[0.0, math.log(3)], [0.0, math.log(3)]])
    K.sparse_categorical_crossentropy(logits, np.array([0, 1], np.uint8), out, from_logits=True)
    assert math.isclose(float(out), (math.log(4) + math.log(4 / 3)) / 2, rel_tol=1e-12)
    # soft targets: y = [0.5, 0.5], softmax = [1/4, 3/4] -> 0.5 log 4 + 0.5 log 4/3
    K.categorical_crossentropy(logits[:1], np.array([[0.5, 0.5]]), out, from_logits=True)
    assert math.isclose(float(out), 0.5 * math.log(4) + 0.5 * math.log(4 / 3), rel_tol=1e-12)
    K.categorical_crossentropy(np.array([[0.25, 0.75]]), np.array([[0.5, 0.5]]), out)
    assert math.isclose(float(out), 0.5 * math.log(4) + 0.5 * math.log(4 / 3), rel_tol=1e-12)


def test_mse_closed_form():
    out = np.empty(())
    K.mse(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 0.0], [0.0, 4.0]]), out)
    assert float(out) == (0 + 4 + 9 + 0) / 4


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy", "categorical_crossentropy", "mse"])
def test_loss_grads_match_finite_differences(rng, loss, from_logits):
    n, k = 3, 4
    labels = np.array([1, 3, 0])
    if loss == "sparse_categorical_crossentropy":
        target = labels
    elif loss == "categorical_crossentropy":
        target = rng.dirichlet(np.ones(k), n)              # soft targets
    else:
        target = rng.standard_normal((n, k))
    p = rng.standard_normal((n, k)) if from_logits or loss == "mse" else rng.uniform(0.05, 0.9, (n, k))
    kw = {} if loss == "mse" else {"from_logits": from_logits}
    fwd, grad = getattr(K, loss), getattr(K, loss + "_grad")
    dloss = np.array(1.7)
    out = np.empty(())
    dp = grad(p, target, dloss, np.empty(p.shape), **kw)
    num = numeric_grad(lambda: float(fwd(p, target, out, **kw)) * 1.7, p)
    np.testing.assert_allclose(dp, num, rtol=1e-6, atol=1e-8)
    dp32 = grad(f32(p), f32(target) if loss != "sparse_categorical_crossentropy" else target,
                np.array(1.7, np.float32), np.empty(p.shape, np.float32), **kw)
    np.testing.assert_allclose(dp32, num, rtol=1e-4, atol=1e-6)


def test_probability_crossentropy_clip_blocks_gradient_at_the_bounds():
    p = np.array([[1.0, 0.0, 0.5], [1e-7, 0.3, 0.7]], np.float32)
    labels = np.array([0, 1])
    dp = np.empty_like(p)
    K.sparse_categorical_crossentropy_grad(p, labels, np.float32(1), dp)
    assert dp[0, 0] == 0 and dp[0, 1] == 0 and dp[1, 0] == 0     # clipped cells (and p == 1e-7 exactly)
    q_sum0, q_sum1 = 1 - 1e-7 + 1e-7 + 0.5, 1e-7 + 0.3 + 0.7
    np.testing.assert_allclose(dp[0, 2], 1 / q_sum0 / 2, rtol=1e-6)
    np.testing.assert_allclose(dp[1, 1:], [(1 / q_sum1 - 1 / 0.3) / 2, 1 / q_sum1 / 2], rtol=1e-6)
    K.categorical_crossentropy_grad(p, np.eye(3, dtype=np.float32)[labels], np.float32(1), dp)
    assert dp[0, 0] == 0 and dp[0, 1] == 0 and dp[1, 0] == 0


def test_sparse_labels_accept_integer_valued_floats_and_reject_bad_ids():
    p, out = np.full((2, 3), 0.5, np.float32), scalar_out()
    K.sparse_categorical_crossentropy(p, np.array([2.0, 0.0], np.float32), out)
    assert math.isclose(float(out), math.log(3), rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"sparse_categorical_crossentropy: labels must be class ids in \[0, 3\)"):
        K.sparse_categorical_crossentropy(p, np.array([3, 0]), out)
    with pytest.raises(ValueError, match="class ids"):
        K.sparse_categorical_crossentropy(p, np.array([-1, 0]), out)
    with pytest.raises(ValueError, match="integer class ids"):
        K.sparse_categorical_crossentropy(p, np.array([0.5, 0.0]), out)
    with pytest.raises(ValueError, match=r"labels has shape \(3,\), expected \(2,\)"):
        K.sparse_categorical_crossentropy(p, np.array([0, 1, 2]), out)


# ---------------------------------------------------------------------------------------------------
# optimizers

def test_adam_matches_the_keras_formula_for_three_steps(rng):
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-7
    w0 = rng.standard_normal(7)
    grads = [rng.standard_normal(7) for _ in range(3)]
    # Keras 3 Adam.update_step, one element at a time in float64
    want, m, v = list(w0), [0.0] * 7, [0.0] * 7
    for step, g in enumerate(grads, start=1):
        alpha = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        for i in range(7):
            m[i] += (g[i] - m[i]) * (1 - b1)
            v[i] += (g[i] * g[i] - v[i]) * (1 - b2)
            want[i] -= alpha * m[i] / (math.sqrt(v[i]) + eps)
    w, km, kv = f32(w0), np.zeros(7, np.float32), np.zeros(7, np.float32)
    for step, g in enumerate(grads, start=1):
        t = np.float32(step) if step == 2 else step           # the step counter may be a NumPy scalar
        assert K.adam_update(w, f32(g), lr, t, km, kv, b1, b2, eps) is w
    assert w.dtype == np.float32 and km.dtype == np.float32
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(km, m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kv, v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_the_keras_formula_for_three_steps(rng, momentum, nesterov):
    lr = 0.05
    w0 = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(3)]
    want, vel = list(w0), [0.0] * 5
    for g in grads:
        for i in range(5):
            vel[i] = momentum * vel[i] - lr * g[i]
            want[i] += momentum * vel[i] - lr * g[i] if nesterov else vel[i]
    w = f32(w0)
    velocity = None if momentum == 0 else np.zeros(5, np.float32)
    for g in grads:
        K.sgd_update(w, f32(g), lr, velocity, momentum, nesterov)
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)
    if velocity is not None:
        np.testing.assert_allclose(velocity, vel, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# argument checking and module hygiene

@pytest.mark.parametrize("call,message", [
    (lambda: K.conv2d(np.zeros((1, 5, 5, 2), np.float32), np.zeros((3, 3, 2, 4), np.float32), None,
                      np.zeros((1, 3, 3, 5), np.float32), (1, 1), VALID, (1, 1)),
     r"conv2d: out has shape \(1, 3, 3, 5\), expected \(1, 3, 3, 4\)"),
    (lambda: K.conv2d(np.zeros((1, 5, 5, 2), np.float32), np.zeros((3, 3, 3, 4), np.float32), None,
                      np.zeros((1, 3, 3, 4), np.float32), (1, 1), VALID, (1, 1)),
     r"conv2d: x \(1, 5, 5, 2\) has 2 channels but w \(3, 3, 3, 4\) expects 3"),
    (lambda: K.conv2d(np.zeros((1, 5, 5, 2), np.float32), np.zeros((3, 3, 2, 4), np.float32), None,
                      np.zeros((1, 3, 3, 4), np.float32), (1, 1), VALID, (1, 1), "gelu"),
     "conv2d: unknown activation 'gelu'"),
    (lambda: K.conv2d(np.zeros((1, 5, 5, 2), np.float32), np.zeros((3, 3, 2, 4), np.float32), None,
                      np.zeros((1, 3, 3, 4), np.float32), (1, 1), (1, 1), (1, 1)),
     r"conv2d: padding must be \(\(top, bottom\), \(left, right\)\)"),
    (lambda: K.conv2d(np.zeros((1, 2, 2, 1), np.float32), np.zeros((3, 3, 1, 1), np.float32), None,
                      np.zeros((1, 1, 1, 1), np.float32), (1, 1), VALID, (1, 1)),
     "conv2d: window extent .* is larger than the padded input"),
    (lambda: K.conv2d_grad_input(np.zeros((1, 3, 3, 4), np.float32), np.zeros((3, 3, 2, 4), np.float32),
                                 np.zeros((1, 6, 5, 2), np.float32), (1, 1), VALID, (1, 1)),
     r"conv2d_grad_input: dy has shape \(1, 3, 3, 4\), expected \(1, 4, 3, 4\)"),
    (lambda: K.conv2d_grad_filter(np.zeros((1, 5, 5, 2), np.float32), np.zeros((1, 3, 3, 4), np.float32),
                                  np.zeros((3, 3, 2, 5), np.float32), (1, 1), VALID, (1, 1)),
     r"conv2d_grad_filter: out has shape \(3, 3, 2, 5\), expected \(3, 3, 2, 4\)"),
    (lambda: K.max_pool2d(np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 3, 3, 1), np.float32),
                          (2, 2), (2, 2), VALID),
     r"max_pool2d: out has shape \(1, 3, 3, 1\), expected \(1, 2, 2, 1\)"),
    (lambda: K.avg_pool2d(np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 3, 3, 1), np.float32),
                          (2, 2), (2, 2), ((2, 0), (0, 0))),
     "avg_pool2d: padding .* must be smaller than the pool window"),
    (lambda: K.dense(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32), None,
                     np.zeros((2, 5), np.float32)), r"dense: x \(2, 3\) and w \(4, 5\) do not chain"),
    (lambda: K.add(np.zeros((2, 3)), np.zeros((3,)), np.zeros((4, 2, 3))),
     r"add: out has shape \(4, 2, 3\), expected \(2, 3\)"),
    (lambda: K.mul(np.zeros((2, 3)), np.zeros((2,)), np.zeros((2, 3))), "mul: operand shapes .* do not broadcast"),
    (lambda: K.sum_to(np.zeros((2, 3)), np.zeros((2,))), r"sum_to: out shape \(2,\) does not broadcast"),
    (lambda: K.dropout(np.zeros(3), np.zeros(3), 1.0, 0, 0), r"dropout: rate must be in \[0, 1\)"),
    (lambda: K.sgd_update(np.zeros(3), np.zeros(3), 0.1, None, momentum=0.9), "sgd_update: momentum=0.9 needs"),
    (lambda: K.adam_update(np.zeros(3), np.zeros(4), 0.1, 1, np.zeros(3), np.zeros(3)),
     r"adam_update: g has shape \(4,\), expected \(3,\)"),
])
def test_bad_arguments_raise_value_errors_naming_the_kernel(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_module_imports_only_numpy_and_math_and_runs_standalone():
    from backends.numpy.codegen import standalone_kernel_source
    source = standalone_kernel_source()      # kernels.py with the activation math pasted in, as --emit py
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"numpy", "math"}
    ns = {}
    exec(compile("import os as _os\n" + source, "standalone", "exec"), ns)   # as pasted by --emit py
    out = np.empty((1, 1, 1, 1), np.float32)
    ns["conv2d"](np.ones((1, 2, 2, 1), np.float32), np.ones((2, 2, 1, 1), np.float32), None, out,
                 (1, 1), VALID, (1, 1))
    assert out.item() == 4
