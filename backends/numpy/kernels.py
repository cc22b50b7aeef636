"""NumPy kernels: the runtime library of the NumPy backend (generated code calls them as K.<op>).

Every kernel writes its result into a caller-provided `out` (possibly a view into the memory arena) and
returns it; results follow `out`'s dtype (float32 in production, float64 in the test reference mode).
Convolutions are im2col + one matmul per batch chunk; pools and col2im loop only over window taps.

This file is pasted verbatim into standalone modules (`graphcnn compile --target numpy --emit py`), so it
imports only `math` and `numpy`, has no package-relative imports and no `from __future__` line.
"""
import math

import numpy as np

ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh")
# Keras' backend epsilon, used by the probability (from_logits=False) cross-entropies.
PROB_EPSILON = 1e-7
# im2col buffers are built per batch chunk of about this many bytes: bounds peak memory (a whole-batch
# im2col of a 3x3 conv is 9x its input) and keeps each chunk's columns in cache for the matmul.
IM2COL_CHUNK_BYTES = 4 << 20


# ---------------------------------------------------------------------------------------------------
# argument checking (O(1): runs on every call)

def _fail(kernel, message):
    raise ValueError(f"{kernel}: {message}")


def _expect_shape(kernel, what, shape, expected):
    if tuple(shape) != tuple(expected):
        _fail(kernel, f"{what} has shape {tuple(shape)}, expected {tuple(expected)}")


def _expect_rank(kernel, what, arr, rank):
    if np.ndim(arr) != rank:
        _fail(kernel, f"{what} must be {rank}-D, got shape {np.shape(arr)}")


def _pair(value, what, kernel):
    """(a, b) of positive ints from a pair (or one int for both)."""
    try:
        a, b = (value, value) if isinstance(value, (int, np.integer)) else value
        a, b = int(a), int(b)
    except (TypeError, ValueError):
        _fail(kernel, f"{what} must be a pair of ints, got {value!r}")
    if a < 1 or b < 1:
        _fail(kernel, f"{what} must be >= 1, got {value!r}")
    return a, b


def _padding(padding, kernel):
    """((top, bottom), (left, right)) of non-negative ints."""
    try:
        (t, b), (l, r) = padding
        pads = ((int(t), int(b)), (int(l), int(r)))
    except (TypeError, ValueError):
        _fail(kernel, f"padding must be ((top, bottom), (left, right)), got {padding!r}")
    if min(pads[0] + pads[1]) < 0:
        _fail(kernel, f"padding must be >= 0, got {padding!r}")
    return pads


def _window_count(size, pads, extent, stride):
    """Number of window positions along one axis (0 or less: the window does not fit)."""
    return (size + pads[0] + pads[1] - extent) // stride + 1


def _window_geometry(kernel, in_shape, kh, kw, stride, padding, dilation):
    """Checked (stride, pads, dilation, (OH, OW)) of a sliding window over an NHWC input shape."""
    stride = _pair(stride, "stride", kernel)
    dilation = _pair(dilation, "dilation", kernel)
    pads = _padding(padding, kernel)
    ext_h, ext_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    oh = _window_count(in_shape[1], pads[0], ext_h, stride[0])
    ow = _window_count(in_shape[2], pads[1], ext_w, stride[1])
    if oh < 1 or ow < 1:
        _fail(kernel, f"window extent {(ext_h, ext_w)} is larger than the padded input "
                      f"{tuple(in_shape[1:3])} + {pads}")
    return stride, pads, dilation, (oh, ow)


def _pool_geometry(kernel, in_shape, pool, stride, padding):
    pool = _pair(pool, "pool", kernel)
    stride, pads, _, out_hw = _window_geometry(kernel, in_shape, pool[0], pool[1], stride, padding, (1, 1))
    # a window made only of padding would have no maximum and nothing to average
    if max(pads[0]) >= pool[0] or max(pads[1]) >= pool[1]:
        _fail(kernel, f"padding {pads} must be smaller than the pool window {pool}")
    return pool, stride, pads, out_hw


def _check_activation(kernel, activation):
    if activation not in ACTIVATIONS:
        _fail(kernel, f"unknown activation {activation!r}; use one of {ACTIVATIONS}")


# ---------------------------------------------------------------------------------------------------
# shared building blocks

def _apply_activation(y, activation):
    """In place on y (the fused epilogue of conv2d and dense)."""
    if activation == "relu":
        np.maximum(y, 0, out=y)
    elif activation == "sigmoid":
        sigmoid(y, y)
    elif activation == "tanh":
        np.tanh(y, out=y)
    return y


def _padded(x, pads, fill):
    """x (N,H,W,C) surrounded by `fill`; x itself when there is no padding."""
    (t, b), (l, r) = pads
    if t == b == l == r == 0:
        return x
    n, h, w, c = x.shape
    xp = np.empty((n, h + t + b, w + l + r, c), x.dtype)
    # fill only the border strips: the interior is overwritten by x right after
    xp[:, :t] = fill
    xp[:, t + h:] = fill
    xp[:, t:t + h, :l] = fill
    xp[:, t:t + h, l + w:] = fill
    xp[:, t:t + h, l:l + w] = x
    return xp


def _windows(xp, kh, kw, stride, dilation, oh, ow):
    """Read-only strided view (N, OH, OW, KH, KW, C) of the windows of a padded NHWC tensor."""
    n, _, _, c = xp.shape
    s_n, s_h, s_w, s_c = xp.strides
    return np.lib.stride_tricks.as_strided(
        xp, (n, oh, ow, kh, kw, c),
        (s_n, s_h * stride[0], s_w * stride[1], s_h * dilation[0], s_w * dilation[1], s_c), writeable=False)


def _batch_chunks(n, bytes_per_sample):
    """[start, stop) batch ranges of about IM2COL_CHUNK_BYTES each (at least one sample per range)."""
    step = max(1, min(n, IM2COL_CHUNK_BYTES // max(1, bytes_per_sample)))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _tap_span(offset, pad_before, stride, in_size, out_size):
    """For the window tap at `offset` (k * dilation) along one axis: the outputs [o0, o1) whose tap
    reads a real (non-padding) input, and the input slice they read. Input i = o*stride + offset - pad."""
    o0 = max(0, -((offset - pad_before) // stride))                  # ceil((pad - offset) / stride)
    o1 = min(out_size, (in_size - 1 + pad_before - offset) // stride + 1)
    if o1 <= o0:
        return None
    i0 = o0 * stride + offset - pad_before
    return o0, o1, slice(i0, i0 + (o1 - o0 - 1) * stride + 1, stride)


def _taps(kh, kw, stride, pads, dilation, in_hw, out_hw):
    """Per window tap (row-major (kh, kw) order) with at least one real input:
    (tap index, output slices (rows, cols), input slices (rows, cols))."""
    taps = []
    for i in range(kh):
        span_h = _tap_span(i * dilation[0], pads[0][0], stride[0], in_hw[0], out_hw[0])
        for j in range(kw):
            span_w = _tap_span(j * dilation[1], pads[1][0], stride[1], in_hw[1], out_hw[1])
            if span_h is None or span_w is None:
                continue
            taps.append((i * kw + j, (slice(span_h[0], span_h[1]), slice(span_w[0], span_w[1])),
                         (span_h[2], span_w[2])))
    return taps


def _accumulate(region, value):
    """region += value for a strided view region (np.add with out=: no write-back copy of the view)."""
    np.add(region, value, out=region)


def _write_matmul(a, b, out, rows, cols):
    """out (any shape with rows*cols elements) = a @ b, directly into out's memory when contiguous."""
    if out.flags.c_contiguous:
        np.matmul(a, b, out=out.reshape(rows, cols))
    else:
        out[...] = np.matmul(a, b).reshape(out.shape)


# ---------------------------------------------------------------------------------------------------
# convolution

def conv2d(x, w, b, out, stride, padding, dilation, activation="linear"):
    """out = activation(cross_correlate(x, w) + b); x (N,H,W,C), w (KH,KW,C,F), b (F,) or None,
    out (N,OH,OW,F). Zero padding ((top, bottom), (left, right)); stride/dilation (sh, sw), (dh, dw)."""
    _expect_rank("conv2d", "x", x, 4)
    _expect_rank("conv2d", "w", w, 4)
    _check_activation("conv2d", activation)
    n, _, _, c = x.shape
    kh, kw, wc, f = w.shape
    if wc != c:
        _fail("conv2d", f"x {x.shape} has {c} channels but w {w.shape} expects {wc}")
    if b is not None:
        _expect_shape("conv2d", "b", np.shape(b), (f,))
    stride, pads, dilation, (oh, ow) = _window_geometry("conv2d", x.shape, kh, kw, stride, padding, dilation)
    _expect_shape("conv2d", "out", out.shape, (n, oh, ow, f))
    k = kh * kw * c
    w2 = w.reshape(k, f)
    direct = out.flags.c_contiguous
    out2 = out.reshape(n * oh * ow, f) if direct else None
    for s, e in _batch_chunks(n, oh * ow * (k + f) * x.itemsize):
        rows = (e - s) * oh * ow
        cols = _windows(_padded(x[s:e], pads, 0), kh, kw, stride, dilation, oh, ow).reshape(rows, k)
        if direct:
            y = out2[s * oh * ow:e * oh * ow]
            np.matmul(cols, w2, out=y)
        else:
            y = np.matmul(cols, w2).astype(out.dtype, copy=False)
        # epilogue on the chunk while it is still in cache
        if b is not None:
            y += b
        _apply_activation(y, activation)
        if not direct:
            out[s:e] = y.reshape(e - s, oh, ow, f)
    return out


def conv2d_grad_filter(x, dy, out, stride, padding, dilation):
    """out (KH,KW,C,F) = d(sum(dy * conv2d(x, w)))/dw, summed over the batch: im2col(x)^T @ dy."""
    _expect_rank("conv2d_grad_filter", "x", x, 4)
    _expect_rank("conv2d_grad_filter", "dy", dy, 4)
    _expect_rank("conv2d_grad_filter", "out", out, 4)
    n, _, _, c = x.shape
    kh, kw, _, f = out.shape
    stride, pads, dilation, (oh, ow) = _window_geometry("conv2d_grad_filter", x.shape, kh, kw,
                                                         stride, padding, dilation)
    _expect_shape("conv2d_grad_filter", "out", out.shape, (kh, kw, c, dy.shape[3]))
    _expect_shape("conv2d_grad_filter", "dy", dy.shape, (n, oh, ow, f))
    k = kh * kw * c
    dy2 = dy.reshape(n * oh * ow, f)
    for s, e in _batch_chunks(n, oh * ow * (k + f) * x.itemsize):
        cols = _windows(_padded(x[s:e], pads, 0), kh, kw, stride, dilation, oh, ow).reshape(-1, k)
        if s == 0:
            _write_matmul(cols.T, dy2[:e * oh * ow], out, k, f)
        else:      # later batch chunks add their (small, filter-sized) partial sums
            out += np.matmul(cols.T, dy2[s * oh * ow:e * oh * ow]).reshape(out.shape)
    return out


def conv2d_grad_input(dy, w, out, stride, padding, dilation):
    """out (N,H,W,C) = d(sum(dy * conv2d(x, w)))/dx: dcols = dy @ w^T, then col2im (one strided
    accumulate per kernel tap, skipping the padding)."""
    _expect_rank("conv2d_grad_input", "dy", dy, 4)
    _expect_rank("conv2d_grad_input", "w", w, 4)
    _expect_rank("conv2d_grad_input", "out", out, 4)
    n, h, wd, c = out.shape
    kh, kw, wc, f = w.shape
    if wc != c:
        _fail("conv2d_grad_input", f"out {out.shape} has {c} channels but w {w.shape} expects {wc}")
    stride, pads, dilation, (oh, ow) = _window_geometry("conv2d_grad_input", out.shape, kh, kw,
                                                         stride, padding, dilation)
    _expect_shape("conv2d_grad_input", "dy", dy.shape, (n, oh, ow, f))
    k = kh * kw * c
    wt = w.reshape(k, f).T
    dy2 = dy.reshape(n * oh * ow, f)
    taps = _taps(kh, kw, stride, pads, dilation, (h, wd), (oh, ow))
    chunks = _batch_chunks(n, oh * ow * (k + f) * out.itemsize)
    dcols_buf = np.empty(((chunks[0][1] - chunks[0][0]) * oh * ow, k), np.result_type(dy, w))
    out.fill(0)
    for s, e in chunks:
        dcols = dcols_buf[:(e - s) * oh * ow]
        np.matmul(dy2[s * oh * ow:e * oh * ow], wt, out=dcols)
        dcols = dcols.reshape(e - s, oh, ow, kh * kw, c)
        dx = out[s:e]
        for tap, (o_h, o_w), (i_h, i_w) in taps:
            _accumulate(dx[:, i_h, i_w], dcols[:, o_h, o_w, tap])
    return out


# ---------------------------------------------------------------------------------------------------
# pooling

def max_pool2d(x, out, pool, stride, padding):
    """out (N,OH,OW,C) = max over each (ph, pw) window; padding cells count as -inf (never selected)."""
    _expect_rank("max_pool2d", "x", x, 4)
    pool, stride, pads, out_hw = _pool_geometry("max_pool2d", x.shape, pool, stride, padding)
    _expect_shape("max_pool2d", "out", out.shape, (x.shape[0],) + out_hw + (x.shape[3],))
    taps = _taps(pool[0], pool[1], stride, pads, (1, 1), x.shape[1:3], out_hw)
    _, (o_h, o_w), (i_h, i_w) = taps[0]
    covers_all = (o_h.start, o_h.stop, o_w.start, o_w.stop) == (0, out_hw[0], 0, out_hw[1])
    if covers_all:                        # no top/left padding: the first tap initializes everything
        np.copyto(out, x[:, i_h, i_w])
        taps = taps[1:]
    else:
        out.fill(-np.inf)
    for _, (o_h, o_w), (i_h, i_w) in taps:
        region = out[:, o_h, o_w]
        np.maximum(region, x[:, i_h, i_w], out=region)
    return out


def max_pool2d_grad(x, dy, out, pool, stride, padding):
    """out (x's shape): each window's dy goes to the FIRST maximum of the window in row-major (kh, kw)
    order; overlapping windows accumulate."""
    _expect_rank("max_pool2d_grad", "x", x, 4)
    pool, stride, pads, out_hw = _pool_geometry("max_pool2d_grad", x.shape, pool, stride, padding)
    _expect_shape("max_pool2d_grad", "dy", dy.shape, (x.shape[0],) + out_hw + (x.shape[3],))
    _expect_shape("max_pool2d_grad", "out", out.shape, x.shape)
    taps = _taps(pool[0], pool[1], stride, pads, (1, 1), x.shape[1:3], out_hw)
    # disjoint windows write each input cell at most once: no accumulation buffer needed
    disjoint = stride[0] >= pool[0] and stride[1] >= pool[1]
    # batch chunks keep the scratch arrays small, cache-resident and reused; a chunk touches about
    # 4x its slice of x (x, out, dy and the scratch)
    chunks = _batch_chunks(x.shape[0], 4 * x[:1].nbytes)
    rows = chunks[0][1] - chunks[0][0]
    window_max = np.empty((rows,) + dy.shape[1:], x.dtype)
    routed = np.empty(window_max.shape, bool)        # windows whose gradient already went to a maximum
    hit = np.empty(window_max.shape, bool)
    share = None if disjoint else np.empty(window_max.shape, out.dtype)
    out.fill(0)
    for s, e in chunks:
        xc, dyc, dxc = x[s:e], dy[s:e], out[s:e]
        wm, rt, ht = window_max[:e - s], routed[:e - s], hit[:e - s]
        max_pool2d(xc, wm, pool, stride, pads)
        rt.fill(False)
        for _, (o_h, o_w), (i_h, i_w) in taps:
            hit_r, routed_r = ht[:, o_h, o_w], rt[:, o_h, o_w]
            np.equal(xc[:, i_h, i_w], wm[:, o_h, o_w], out=hit_r)
            np.greater(hit_r, routed_r, out=hit_r)     # hit and not yet routed (bools: a > b == a & ~b)
            routed_r |= hit_r
            if disjoint:
                np.multiply(dyc[:, o_h, o_w], hit_r, out=dxc[:, i_h, i_w])
            else:
                share_r = share[:e - s, o_h, o_w]
                np.multiply(dyc[:, o_h, o_w], hit_r, out=share_r)
                _accumulate(dxc[:, i_h, i_w], share_r)
    return out


def _avg_divisors(in_hw, out_hw, pool, stride, pads, count_include_pad, dtype):
    """The divisor of every window, shaped (OH, OW, 1) (or a scalar when it is constant)."""
    if count_include_pad:
        return dtype.type(pool[0] * pool[1])
    per_axis = []
    for size, n_out, k, s, (p0, _) in zip(in_hw, out_hw, pool, stride, pads):
        start = np.arange(n_out) * s - p0
        per_axis.append(np.minimum(start + k, size) - np.maximum(start, 0))   # real cells per axis
    return (per_axis[0][:, None] * per_axis[1][None, :]).astype(dtype)[:, :, None]


def avg_pool2d(x, out, pool, stride, padding, count_include_pad=False):
    """out (N,OH,OW,C) = window sums / (real cells in the window, or ph*pw if count_include_pad)."""
    _expect_rank("avg_pool2d", "x", x, 4)
    pool, stride, pads, out_hw = _pool_geometry("avg_pool2d", x.shape, pool, stride, padding)
    _expect_shape("avg_pool2d", "out", out.shape, (x.shape[0],) + out_hw + (x.shape[3],))
    taps = _taps(pool[0], pool[1], stride, pads, (1, 1), x.shape[1:3], out_hw)
    _, (o_h, o_w), (i_h, i_w) = taps[0]
    if (o_h.start, o_h.stop, o_w.start, o_w.stop) == (0, out_hw[0], 0, out_hw[1]):
        np.copyto(out, x[:, i_h, i_w])     # no top/left padding: the first tap initializes everything
        taps = taps[1:]
    else:
        out.fill(0)
    for _, (o_h, o_w), (i_h, i_w) in taps:
        _accumulate(out[:, o_h, o_w], x[:, i_h, i_w])
    out /= _avg_divisors(x.shape[1:3], out_hw, pool, stride, pads, count_include_pad, out.dtype)
    return out


def avg_pool2d_grad(dy, out, pool, stride, padding, count_include_pad=False):
    """out (N,H,W,C), the shape of avg_pool2d's input: every window spreads dy / divisor over its cells."""
    _expect_rank("avg_pool2d_grad", "out", out, 4)
    pool, stride, pads, out_hw = _pool_geometry("avg_pool2d_grad", out.shape, pool, stride, padding)
    _expect_shape("avg_pool2d_grad", "dy", dy.shape, (out.shape[0],) + out_hw + (out.shape[3],))
    divisor = _avg_divisors(out.shape[1:3], out_hw, pool, stride, pads, count_include_pad, out.dtype)
    taps = _taps(pool[0], pool[1], stride, pads, (1, 1), out.shape[1:3], out_hw)
    out.fill(0)
    if stride[0] >= pool[0] and stride[1] >= pool[1]:
        # disjoint windows write each input cell at most once: divide straight into out
        for _, (o_h, o_w), (i_h, i_w) in taps:
            d = divisor if np.ndim(divisor) == 0 else divisor[o_h, o_w]
            np.divide(dy[:, o_h, o_w], d, out=out[:, i_h, i_w])
        return out
    share = np.divide(dy, divisor, dtype=out.dtype)
    for _, (o_h, o_w), (i_h, i_w) in taps:
        _accumulate(out[:, i_h, i_w], share[:, o_h, o_w])
    return out


def global_avg_pool2d(x, out):
    """out (N,C) = mean of x (N,H,W,C) over H and W."""
    _expect_rank("global_avg_pool2d", "x", x, 4)
    _expect_shape("global_avg_pool2d", "out", out.shape, (x.shape[0], x.shape[3]))
    np.mean(x, axis=(1, 2), out=out)
    return out


def global_avg_pool2d_grad(dy, out):
    """out (N,H,W,C) = dy (N,C) / (H*W) broadcast over H and W."""
    _expect_rank("global_avg_pool2d_grad", "out", out, 4)
    _expect_shape("global_avg_pool2d_grad", "dy", np.shape(dy), (out.shape[0], out.shape[3]))
    np.copyto(out, (dy / (out.shape[1] * out.shape[2]))[:, None, None, :])
    return out


# ---------------------------------------------------------------------------------------------------
# dense algebra and elementwise arithmetic

def dense(x, w, b, out, activation="linear"):
    """out (N,M) = activation(x (N,K) @ w (K,M) + b (M,) or None)."""
    _expect_rank("dense", "x", x, 2)
    _expect_rank("dense", "w", w, 2)
    _check_activation("dense", activation)
    if x.shape[1] != w.shape[0]:
        _fail("dense", f"x {x.shape} and w {w.shape} do not chain (x has {x.shape[1]} features)")
    if b is not None:
        _expect_shape("dense", "b", np.shape(b), (w.shape[1],))
    _expect_shape("dense", "out", out.shape, (x.shape[0], w.shape[1]))
    _write_matmul(x, w, out, *out.shape)
    if b is not None:
        out += b
    return _apply_activation(out, activation)


def matmul(a, b, out, transpose_a=False, transpose_b=False):
    """out = op(a) @ op(b), op = transpose when asked; 2-D only."""
    _expect_rank("matmul", "a", a, 2)
    _expect_rank("matmul", "b", b, 2)
    a = a.T if transpose_a else a
    b = b.T if transpose_b else b
    if a.shape[1] != b.shape[0]:
        _fail("matmul", f"inner dimensions differ: {a.shape} @ {b.shape} (after transposes "
                        f"transpose_a={transpose_a}, transpose_b={transpose_b})")
    _expect_shape("matmul", "out", out.shape, (a.shape[0], b.shape[1]))
    _write_matmul(a, b, out, *out.shape)
    return out


def bias_add(x, b, out):
    """out = x + b, b (C,) broadcast over the last axis of x."""
    if np.ndim(x) < 1 or np.shape(b) != (x.shape[-1],):
        _fail("bias_add", f"b has shape {np.shape(b)}, expected {np.shape(x)[-1:]} for x {np.shape(x)}")
    _expect_shape("bias_add", "out", out.shape, x.shape)
    return np.add(x, b, out=out)


def bias_add_grad(dy, out):
    """out (C,) = dy summed over every axis but the last."""
    _expect_shape("bias_add_grad", "out", out.shape, np.shape(dy)[-1:])
    np.sum(dy.reshape(-1, dy.shape[-1]), axis=0, out=out)
    return out


def _broadcast_into(kernel, a, b, out):
    try:
        shape = np.broadcast_shapes(np.shape(a), np.shape(b))
    except ValueError:
        _fail(kernel, f"operand shapes {np.shape(a)} and {np.shape(b)} do not broadcast")
    _expect_shape(kernel, "out", out.shape, shape)


def add(a, b, out):
    """out = a + b (NumPy broadcasting)."""
    _broadcast_into("add", a, b, out)
    return np.add(a, b, out=out)


def sub(a, b, out):
    """out = a - b (NumPy broadcasting)."""
    _broadcast_into("sub", a, b, out)
    return np.subtract(a, b, out=out)


def mul(a, b, out):
    """out = a * b (NumPy broadcasting)."""
    _broadcast_into("mul", a, b, out)
    return np.multiply(a, b, out=out)


def sum_to(x, out):
    """Sum x down to out.shape, the gradient of broadcasting out.shape to x.shape (NumPy rules)."""
    lead = x.ndim - out.ndim
    if lead < 0 or any(o not in (1, d) for o, d in zip(out.shape, x.shape[lead:])):
        _fail("sum_to", f"out shape {out.shape} does not broadcast to x shape {x.shape}")
    axes = tuple(range(lead)) + tuple(lead + i for i, (o, d) in enumerate(zip(out.shape, x.shape[lead:]))
                                      if o == 1 and d != 1)
    if not axes:
        np.copyto(out, x.reshape(out.shape))
    else:
        # keepdims keeps every axis: out with `lead` unit axes in front is a view of the same memory
        np.sum(x, axis=axes, keepdims=True, out=out[(np.newaxis,) * lead])
    return out


# ---------------------------------------------------------------------------------------------------
# activations

def relu(x, out):
    """out = max(x, 0)."""
    _expect_shape("relu", "out", out.shape, x.shape)
    return np.maximum(x, 0, out=out)


def sigmoid(x, out):
    """out = 1 / (1 + exp(-x)); out may be x. exp(-x) is capped below overflow: the result is then a
    denormal (or 0), which is what sigmoid is there, so it stays accurate in relative terms elsewhere."""
    _expect_shape("sigmoid", "out", out.shape, x.shape)
    np.negative(x, out=out)
    np.minimum(out, math.floor(math.log(np.finfo(out.dtype).max)), out=out)   # 88 in float32
    np.exp(out, out=out)
    out += 1
    np.reciprocal(out, out=out)
    return out


def tanh(x, out):
    """out = tanh(x)."""
    _expect_shape("tanh", "out", out.shape, x.shape)
    return np.tanh(x, out=out)


def relu_grad(y, dy, out):
    """out = dy * (y > 0), y the relu OUTPUT; out may be dy."""
    _expect_shape("relu_grad", "dy", np.shape(dy), y.shape)
    _expect_shape("relu_grad", "out", out.shape, y.shape)
    return np.multiply(dy, y > 0, out=out)


def sigmoid_grad(y, dy, out):
    """out = dy * y * (1 - y), y the sigmoid output; out may be dy."""
    _expect_shape("sigmoid_grad", "dy", np.shape(dy), y.shape)
    _expect_shape("sigmoid_grad", "out", out.shape, y.shape)
    slope = np.subtract(1, y)
    slope *= y
    return np.multiply(dy, slope, out=out)


def tanh_grad(y, dy, out):
    """out = dy * (1 - y*y), y the tanh output; out may be dy."""
    _expect_shape("tanh_grad", "dy", np.shape(dy), y.shape)
    _expect_shape("tanh_grad", "out", out.shape, y.shape)
    slope = np.multiply(y, y)
    np.subtract(1, slope, out=slope)
    return np.multiply(dy, slope, out=out)


def softmax(x, out, axis=-1):
    """out = exp(x - max) / sum(exp(x - max)) along axis."""
    _expect_shape("softmax", "out", out.shape, x.shape)
    np.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def log_softmax(x, out, axis=-1):
    """out = (x - max) - log(sum(exp(x - max))) along axis."""
    _expect_shape("log_softmax", "out", out.shape, x.shape)
    np.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    out -= np.log(np.exp(out).sum(axis=axis, keepdims=True))
    return out


def softmax_grad(y, dy, out, axis=-1):
    """out = y * (dy - sum(dy * y, axis)), y the softmax output."""
    _expect_shape("softmax_grad", "dy", np.shape(dy), y.shape)
    _expect_shape("softmax_grad", "out", out.shape, y.shape)
    inner = np.sum(dy * y, axis=axis, keepdims=True)
    np.subtract(dy, inner, out=out)
    out *= y
    return out


def log_softmax_grad(y, dy, out, axis=-1):
    """out = dy - exp(y) * sum(dy, axis), y the log_softmax output."""
    _expect_shape("log_softmax_grad", "dy", np.shape(dy), y.shape)
    _expect_shape("log_softmax_grad", "out", out.shape, y.shape)
    total = np.sum(dy, axis=axis, keepdims=True)
    spread = np.exp(y)
    spread *= total
    return np.subtract(dy, spread, out=out)


# ---------------------------------------------------------------------------------------------------
# layout

def reshape(x, out):
    """Copy x into out, which has the same number of elements (row-major order)."""
    if x.size != out.size:
        _fail("reshape", f"x {x.shape} has {x.size} elements, out {out.shape} has {out.size}")
    np.copyto(out, x.reshape(out.shape))
    return out


def flatten(x, out):
    """Copy x (N, ...) into out (N, prod(...))."""
    _expect_shape("flatten", "out", out.shape, (x.shape[0], x.size // max(1, x.shape[0])))
    np.copyto(out, x.reshape(out.shape))
    return out


def transpose(x, out, perm):
    """out = x with its axes permuted by perm (copied)."""
    if sorted(perm) != list(range(x.ndim)):
        _fail("transpose", f"perm {perm} is not a permutation of the {x.ndim} axes of x {x.shape}")
    _expect_shape("transpose", "out", out.shape, tuple(x.shape[p] for p in perm))
    np.copyto(out, np.transpose(x, perm))
    return out


# ---------------------------------------------------------------------------------------------------
# dropout: a counter-based hash of (seed, step, flat index), so every backend draws the same mask

def mix32(x):
    """The 32-bit integer hash of the dropout contract, on a Python int or a uint32 array (mod 2**32)."""
    if isinstance(x, np.ndarray):
        h = x.astype(np.uint32, copy=True)
        shifted = np.empty_like(h)
        for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
            np.right_shift(h, shift, out=shifted)
            h ^= shifted
            if mult is not None:
                h *= np.uint32(mult)            # uint32 array arithmetic wraps mod 2**32
        return h
    x = int(x) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def _drop_threshold(kernel, rate):
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        _fail(kernel, f"rate must be in [0, 1), got {rate}")
    # floor(rate * 2**32) < 2**32 for rate < 1, so the comparison can stay in uint32
    return rate, math.floor(rate * 4294967296.0)


def dropout_mask(shape, rate, seed, step):
    """Bool keep-mask of `shape`: keep_i = mix32(i ^ key) >= floor(rate * 2**32), i the row-major flat
    index, key = mix32(seed * 0x9E3779B9 + step)."""
    _, threshold = _drop_threshold("dropout_mask", rate)
    shape = tuple(int(d) for d in shape)
    key = mix32((int(seed) * 0x9E3779B9 + int(step)) & 0xFFFFFFFF)
    index = np.arange(math.prod(shape), dtype=np.uint32)    # flat indices wrap mod 2**32 by contract
    index ^= np.uint32(key)
    return (mix32(index) >= np.uint32(threshold)).reshape(shape)


def _apply_dropout(kernel, x, out, rate, seed, step):
    rate, _ = _drop_threshold(kernel, rate)
    _expect_shape(kernel, "out", out.shape, x.shape)
    if rate == 0.0:
        np.copyto(out, x)
        return out
    np.multiply(x, dropout_mask(x.shape, rate, seed, step), out=out)
    np.divide(out, 1.0 - rate, out=out)
    return out


def dropout(x, out, rate, seed, step):
    """out = x * keep / (1 - rate) (inverted dropout); rate == 0 copies x. out may be x."""
    return _apply_dropout("dropout", x, out, rate, seed, step)


def dropout_grad(dy, out, rate, seed, step):
    """out = dy * keep / (1 - rate), the same mask as the forward dropout of that (seed, step)."""
    return _apply_dropout("dropout_grad", dy, out, rate, seed, step)


# ---------------------------------------------------------------------------------------------------
# losses: a scalar in out (shape ()), the mean over the batch (Keras semantics)

def _class_ids(kernel, labels, p):
    """labels (N,) of any integer dtype (or floats holding integers) -> checked intp class ids."""
    n, k = p.shape
    labels = np.asarray(labels)
    _expect_shape(kernel, "labels", labels.shape, (n,))
    ids = labels.astype(np.intp)
    if labels.dtype.kind not in "iub" and not np.array_equal(ids, labels):
        _fail(kernel, f"labels must hold integer class ids, got non-integer values of dtype {labels.dtype}")
    if n and (ids.min() < 0 or ids.max() >= k):
        _fail(kernel, f"labels must be class ids in [0, {k}), got values in [{ids.min()}, {ids.max()}]")
    return ids


def _check_loss(kernel, p, out, target_shape=None, target=None):
    _expect_rank(kernel, "p", p, 2)
    if target is not None:
        _expect_shape(kernel, "targets", np.shape(target), p.shape)
    _expect_shape(kernel, "out", out.shape, () if target_shape is None else target_shape)


def _clip_bounds(dtype):
    return dtype.type(PROB_EPSILON), dtype.type(1 - PROB_EPSILON)


def _grad_scale(kernel, dloss, n, dtype):
    if np.size(dloss) != 1:
        _fail(kernel, f"dloss must be a scalar, got shape {np.shape(dloss)}")
    return dtype.type(float(np.asarray(dloss).reshape(())) / max(1, n))


def sparse_categorical_crossentropy(p, labels, out, from_logits=False):
    """out () = mean_i(-log softmax(p_i)[y_i]) (from_logits) or, for probabilities,
    mean_i(-log(q_i[y_i] / sum_k q_ik)), q = clip(p, 1e-7, 1 - 1e-7)."""
    _check_loss("sparse_categorical_crossentropy", p, out)
    ids = _class_ids("sparse_categorical_crossentropy", labels, p)
    rows = np.arange(p.shape[0])
    if from_logits:
        peak = p.max(axis=1)
        lse = np.log(np.exp(p - peak[:, None]).sum(axis=1)) + peak
        out[...] = np.mean(lse - p[rows, ids])
    else:
        q = np.clip(p, *_clip_bounds(p.dtype))
        out[...] = np.mean(np.log(q.sum(axis=1)) - np.log(q[rows, ids]))
    return out


def sparse_categorical_crossentropy_grad(p, labels, dloss, out, from_logits=False):
    """out (N,K) = d sparse_categorical_crossentropy / dp * dloss. For probabilities the clip passes
    gradient only where 1e-7 < p < 1 - 1e-7 (like tf.clip_by_value)."""
    kernel = "sparse_categorical_crossentropy_grad"
    _check_loss(kernel, p, out, p.shape)
    ids = _class_ids(kernel, labels, p)
    scale = _grad_scale(kernel, dloss, p.shape[0], out.dtype)
    rows = np.arange(p.shape[0])
    if from_logits:
        softmax(p, out, axis=1)                          # d/dp = softmax(p) - onehot(y)
        out[rows, ids] -= 1
    else:
        lo, hi = _clip_bounds(p.dtype)
        q = np.clip(p, lo, hi)
        # loss_i = log(sum_k q_ik) - log(q_iy): d/dq_ik = 1/sum_k q_ik - [k == y_i] / q_iy
        np.copyto(out, 1 / q.sum(axis=1, keepdims=True))
        out[rows, ids] -= 1 / q[rows, ids]
        out *= (p > lo) & (p < hi)
    out *= scale
    return out


def categorical_crossentropy(p, y, out, from_logits=False):
    """out () = mean_i(-sum_k y_ik log softmax(p_i)_k) (from_logits) or, for probabilities,
    mean_i(-sum_k y_ik log q_ik), q = clip(p, 1e-7, 1 - 1e-7) normalized to sum 1."""
    _check_loss("categorical_crossentropy", p, out, target=y)
    log_q = np.empty(p.shape, np.result_type(p, out))
    if from_logits:
        log_softmax(p, log_q, axis=1)
    else:
        q = np.clip(p, *_clip_bounds(p.dtype))
        np.log(q, out=log_q)
        log_q -= np.log(q.sum(axis=1, keepdims=True))
    log_q *= y
    out[...] = -np.mean(log_q.sum(axis=1))
    return out


def categorical_crossentropy_grad(p, y, dloss, out, from_logits=False):
    """out (N,K) = d categorical_crossentropy / dp * dloss (soft targets allowed)."""
    kernel = "categorical_crossentropy_grad"
    _check_loss(kernel, p, out, p.shape, target=y)
    scale = _grad_scale(kernel, dloss, p.shape[0], out.dtype)
    y_total = np.sum(y, axis=1, keepdims=True)
    if from_logits:
        softmax(p, out, axis=1)                          # d/dp = softmax(p) * sum_k y_k - y
        out *= y_total
        out -= y
    else:
        lo, hi = _clip_bounds(p.dtype)
        q = np.clip(p, lo, hi)
        # loss_i = sum_k y_ik (log sum_j q_ij - log q_ik): d/dq_ik = sum_k y_ik / sum_j q_ij - y_ik / q_ik
        np.divide(y, q, out=out)
        np.subtract(y_total / q.sum(axis=1, keepdims=True), out, out=out)
        out *= (p > lo) & (p < hi)
    out *= scale
    return out


def mse(p, y, out):
    """out () = mean over ALL elements of (p - y)^2."""
    _expect_shape("mse", "targets", np.shape(y), np.shape(p))
    _expect_shape("mse", "out", out.shape, ())
    diff = np.subtract(p, y)
    out[...] = np.mean(np.square(diff, out=diff))
    return out


def mse_grad(p, y, dloss, out):
    """out = 2 * (p - y) / p.size * dloss."""
    _expect_shape("mse_grad", "targets", np.shape(y), np.shape(p))
    _expect_shape("mse_grad", "out", out.shape, np.shape(p))
    np.subtract(p, y, out=out)
    out *= _grad_scale("mse_grad", dloss, max(1, p.size), out.dtype) * 2
    return out


# ---------------------------------------------------------------------------------------------------
# optimizer updates: in place on their state arrays (the only kernels that write their inputs)

def _check_state(kernel, w, **state):
    for name, arr in state.items():
        if arr is not None:
            _expect_shape(kernel, name, np.shape(arr), w.shape)


def sgd_update(w, g, velocity, lr, momentum=0.0, nesterov=False):
    """Keras SGD in place: velocity = momentum*velocity - lr*g; w += velocity (nesterov:
    w += momentum*velocity - lr*g). velocity may be None when momentum == 0 (then w -= lr*g)."""
    _check_state("sgd_update", w, g=g, velocity=velocity)
    lr, momentum = float(lr), float(momentum)
    step = np.multiply(g, w.dtype.type(lr))             # lr * g
    if momentum == 0.0 and velocity is None:
        w -= step
        return w
    if velocity is None:
        _fail("sgd_update", f"momentum={momentum} needs a velocity array, got None")
    velocity *= w.dtype.type(momentum)
    velocity -= step
    if nesterov:
        np.subtract(np.multiply(velocity, w.dtype.type(momentum)), step, out=step)
        w += step
    else:
        w += velocity
    return w


def adam_update(w, g, m, v, t, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras 3 Adam in place, t the step number after increment (1 on the first step):
    alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t); m += (g - m)(1 - beta_1);
    v += (g^2 - v)(1 - beta_2); w -= alpha * m / (sqrt(v) + epsilon)."""
    _check_state("adam_update", w, g=g, m=m, v=v)
    t = float(np.asarray(t).reshape(()))
    if t < 1:
        _fail("adam_update", f"step t must be >= 1 (the step number after increment), got {t}")
    lr, beta_1, beta_2 = float(lr), float(beta_1), float(beta_2)
    alpha = lr * math.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
    cast = w.dtype.type
    tmp = np.subtract(g, m)
    tmp *= cast(1 - beta_1)
    m += tmp
    np.multiply(g, g, out=tmp)
    tmp -= v
    tmp *= cast(1 - beta_2)
    v += tmp
    np.sqrt(v, out=tmp)
    tmp += cast(epsilon)
    np.divide(m, tmp, out=tmp)
    tmp *= cast(alpha)
    w -= tmp
    return w
