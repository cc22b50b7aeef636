"""NumPy kernels: the runtime library of the NumPy backend (generated code calls them as K.<op>).

Every kernel writes its result into a caller-provided `out` (possibly a view into the memory arena) and
returns it; results follow `out`'s dtype (float32 in production, float64 in the test reference mode).
Convolutions are im2col + one matmul per batch chunk; pools and col2im loop only over window taps.

This file is pasted verbatim into standalone modules (`graphcnn compile --target numpy --emit py`), so it
imports only `math`, `numpy` and the activation table's NumPy math (ACTIVATION_MATH_IMPORT: the standalone
writer pastes ir/ops/activation_math.py in place of that line), has no package-relative imports and no
`from __future__` line.
"""
import math

import numpy as np

from ir.ops.activation_math import *  # noqa: F401,F403  (relu, relu_grad, ..., clip_grad: K.<activation>)

ACTIVATION_MATH_IMPORT = "from ir.ops.activation_math import *"
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


def _activation(kernel, activation):
    """The activation table's NumPy function for a fused activation name."""
    if activation not in ACTIVATION_NAMES:
        _fail(kernel, f"unknown activation {activation!r}; use one of {ACTIVATION_NAMES}")
    return globals()[activation]


# ---------------------------------------------------------------------------------------------------
# shared building blocks

def _apply_activation(y, fn, params):
    """In place on y (the fused epilogue of conv2d and dense): the standalone activation kernel itself,
    so fused and unfused results are identical."""
    if fn is not linear:
        fn(y, y, **dict(params))
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

def conv2d(x, w, b, out, stride, padding, dilation, activation="linear", activation_params=(), groups=1,
           residual=None):
    """out = activation(cross_correlate(x, w) + b [+ residual]); x (N,H,W,C), w (KH,KW,C/groups,F), b (F,)
    or None, residual None or out's shape, out (N,OH,OW,F). Zero padding ((top, bottom), (left, right));
    stride/dilation (sh, sw), (dh, dw). groups > 1: each group of C/groups input channels feeds its own
    F/groups output channels. The residual is added after the bias, as the unfused add would."""
    _expect_rank("conv2d", "x", x, 4)
    _expect_rank("conv2d", "w", w, 4)
    act = _activation("conv2d", activation)
    n, _, _, c = x.shape
    kh, kw, wc, f = w.shape
    if groups != 1:
        if residual is not None:
            _fail("conv2d", f"a residual operand needs groups=1, got groups={groups!r}")
        if not isinstance(groups, (int, np.integer)) or groups < 1 or c % groups or f % groups \
                or wc * groups != c:
            _fail("conv2d", f"groups={groups!r} does not fit x {x.shape} and w {w.shape}")
        _expect_shape("conv2d", "out", out.shape[:1] + out.shape[3:], (n, f))
        cg, fg = c // groups, f // groups
        for k in range(groups):
            fs = slice(k * fg, (k + 1) * fg)
            conv2d(x[..., k * cg:(k + 1) * cg], w[..., fs], None if b is None else b[fs], out[..., fs],
                   stride, padding, dilation, activation, activation_params)
        return out
    if wc != c:
        _fail("conv2d", f"x {x.shape} has {c} channels but w {w.shape} expects {wc}")
    if b is not None:
        _expect_shape("conv2d", "b", np.shape(b), (f,))
    stride, pads, dilation, (oh, ow) = _window_geometry("conv2d", x.shape, kh, kw, stride, padding, dilation)
    _expect_shape("conv2d", "out", out.shape, (n, oh, ow, f))
    if residual is not None:
        _expect_shape("conv2d", "residual", residual.shape, out.shape)
        residual2 = residual.reshape(n * oh * ow, f)
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
        if residual is not None:
            y += residual2[s * oh * ow:e * oh * ow].reshape(y.shape)
        _apply_activation(y, act, activation_params)
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
    else:                                 # padding never wins: -inf, or an integer dtype's minimum
        out.fill(-np.inf if out.dtype.kind == "f" else np.iinfo(out.dtype).min)
    for _, (o_h, o_w), (i_h, i_w) in taps:
        region = out[:, o_h, o_w]
        np.maximum(region, x[:, i_h, i_w], out=region)
    return out


def conv2d_max_pool(x, w, b, out, stride, padding, dilation, pool, activation="linear", activation_params=(),
                    groups=1, residual=None):
    """out = max_pool2d(conv2d(x, w, b, residual, activation), pool, stride=pool, no padding): the two
    kernels composed (the LLVM backend fuses them; the results agree exactly)."""
    _expect_rank("conv2d_max_pool", "x", x, 4)
    _expect_rank("conv2d_max_pool", "w", w, 4)
    *_, conv_hw = _window_geometry("conv2d_max_pool", x.shape, w.shape[0], w.shape[1], stride, padding, dilation)
    y = np.empty((x.shape[0],) + conv_hw + (w.shape[3],), np.float32)
    conv2d(x, w, b, y, stride, padding, dilation, activation, activation_params, groups, residual=residual)
    return max_pool2d(y, out, pool, pool, ((0, 0), (0, 0)))


def max_pool2d_grad(x, dy, out, pool, stride, padding, relu_mask=False):
    """out (x's shape): each window's dy goes to the FIRST maximum of the window in row-major (kh, kw)
    order; overlapping windows accumulate. relu_mask: then out *= (x > 0), as relu_grad(x, out)."""
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
            # a select, not dy * hit: a tap that is not the maximum gets exactly 0 even when dy is NaN/inf
            if disjoint:
                np.copyto(dxc[:, i_h, i_w], dyc[:, o_h, o_w], where=hit_r)
            else:
                share_r = share[:e - s, o_h, o_w]
                share_r.fill(0)
                np.copyto(share_r, dyc[:, o_h, o_w], where=hit_r)
                _accumulate(dxc[:, i_h, i_w], share_r)
    if relu_mask:
        relu_grad(x, out, out)
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
    """out (N,C) = mean of x (N,H,W,C) over H and W. u8/i8 x (same scale and zero point out):
    rint(f32(int32 sum) / f32(H*W)), half to even (ir/ops/nn.py GlobalAvgPool2D)."""
    _expect_rank("global_avg_pool2d", "x", x, 4)
    _expect_shape("global_avg_pool2d", "out", out.shape, (x.shape[0], x.shape[3]))
    if x.dtype.kind == "f":
        np.mean(x, axis=(1, 2), out=out)
        return out
    total = x.sum(axis=(1, 2), dtype=np.int32).astype(np.float32)
    np.rint(total / np.float32(x.shape[1] * x.shape[2]), out=total)
    out[...] = total.astype(out.dtype)
    return out


def global_avg_pool2d_grad(dy, out):
    """out (N,H,W,C) = dy (N,C) / (H*W) broadcast over H and W."""
    _expect_rank("global_avg_pool2d_grad", "out", out, 4)
    _expect_shape("global_avg_pool2d_grad", "dy", np.shape(dy), (out.shape[0], out.shape[3]))
    np.copyto(out, (dy / (out.shape[1] * out.shape[2]))[:, None, None, :])
    return out


# ---------------------------------------------------------------------------------------------------
# dense algebra and elementwise arithmetic

def dense(x, w, b, out, activation="linear", activation_params=()):
    """out (N,M) = activation(x (N,K) @ w (K,M) + b (M,) or None)."""
    _expect_rank("dense", "x", x, 2)
    _expect_rank("dense", "w", w, 2)
    act = _activation("dense", activation)
    if x.shape[1] != w.shape[0]:
        _fail("dense", f"x {x.shape} and w {w.shape} do not chain (x has {x.shape[1]} features)")
    if b is not None:
        _expect_shape("dense", "b", np.shape(b), (w.shape[1],))
    _expect_shape("dense", "out", out.shape, (x.shape[0], w.shape[1]))
    _write_matmul(x, w, out, *out.shape)
    if b is not None:
        out += b
    return _apply_activation(out, act, activation_params)


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


def div(a, b, out):
    """out = a / b (NumPy broadcasting, IEEE: x/0 = ±inf, 0/0 = NaN)."""
    _broadcast_into("div", a, b, out)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(a, b, out=out)


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

# relu, sigmoid, tanh, leaky_relu, clip and their *_grad kernels come from the activation table's NumPy
# math (ir/ops/activation_math.py, imported above)


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
# losses: a scalar in out (shape ()), sum_i weight_i * loss_i / N over the N samples (Keras'
# "sum_over_batch_size"; weight None = all ones = the mean). Gradients scale row i by
# float32(dloss / N) * weight_i.

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


def _reduce_rows(kernel, rows, weight, out):
    """out[...] = sum_i weight_i * rows_i / N (rows: the per-sample losses, summed in float64)."""
    n = rows.shape[0]
    rows = np.asarray(rows, np.float64)
    if weight is not None:
        _expect_shape(kernel, "weight", np.shape(weight), (n,))
        rows = rows * np.asarray(weight, np.float64)
    out[...] = rows.sum() / n if n else np.nan
    return out


def _scale_rows(kernel, out, dloss, count, weight, factor=1):
    """out *= float32(dloss / count) * factor, times weight_i on row i (count: N, or the number of
    elements for the per-element losses)."""
    scale = _grad_scale(kernel, dloss, count, out.dtype) * factor
    if weight is None:
        out *= scale
        return out
    _expect_shape(kernel, "weight", np.shape(weight), (out.shape[0],))
    row_scale = np.multiply(np.asarray(weight, out.dtype), scale)
    out *= row_scale.reshape((-1,) + (1,) * (out.ndim - 1))
    return out


def sparse_categorical_crossentropy(p, labels, out, from_logits=False, weight=None):
    """out () = weighted mean of -log softmax(p_i)[y_i] (from_logits) or, for probabilities, of
    -log(q_i[y_i] / sum_k q_ik), q = clip(p, 1e-7, 1 - 1e-7)."""
    kernel = "sparse_categorical_crossentropy"
    _check_loss(kernel, p, out)
    ids = _class_ids(kernel, labels, p)
    rows = np.arange(p.shape[0])
    if from_logits:
        peak = p.max(axis=1)
        lse = np.log(np.exp(p - peak[:, None]).sum(axis=1)) + peak
        per_row = lse - p[rows, ids]
    else:
        q = np.clip(p, *_clip_bounds(p.dtype))
        per_row = np.log(q.sum(axis=1)) - np.log(q[rows, ids])
    return _reduce_rows(kernel, per_row, weight, out)


def sparse_categorical_crossentropy_grad(p, labels, dloss, out, from_logits=False, weight=None):
    """out (N,K) = d sparse_categorical_crossentropy / dp * dloss. For probabilities the clip passes
    gradient only where 1e-7 < p < 1 - 1e-7 (like tf.clip_by_value)."""
    kernel = "sparse_categorical_crossentropy_grad"
    _check_loss(kernel, p, out, p.shape)
    ids = _class_ids(kernel, labels, p)
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
    return _scale_rows(kernel, out, dloss, p.shape[0], weight)


def categorical_crossentropy(p, y, out, from_logits=False, weight=None):
    """out () = weighted mean of -sum_k y_ik log softmax(p_i)_k (from_logits) or, for probabilities, of
    -sum_k y_ik log q_ik, q = clip(p, 1e-7, 1 - 1e-7) normalized to sum 1."""
    kernel = "categorical_crossentropy"
    _check_loss(kernel, p, out, target=y)
    log_q = np.empty(p.shape, np.result_type(p, out))
    if from_logits:
        log_softmax(p, log_q, axis=1)
    else:
        q = np.clip(p, *_clip_bounds(p.dtype))
        np.log(q, out=log_q)
        log_q -= np.log(q.sum(axis=1, keepdims=True))
    log_q *= y
    return _reduce_rows(kernel, -log_q.sum(axis=1), weight, out)


def categorical_crossentropy_grad(p, y, dloss, out, from_logits=False, weight=None):
    """out (N,K) = d categorical_crossentropy / dp * dloss (soft targets allowed)."""
    kernel = "categorical_crossentropy_grad"
    _check_loss(kernel, p, out, p.shape, target=y)
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
    return _scale_rows(kernel, out, dloss, p.shape[0], weight)


def _sigmoid_xent_terms(z):
    """(max(z, 0), log(1 + exp(-|z|))) of logits z: the stable sigmoid cross-entropy's two pieces."""
    return np.maximum(z, 0), np.log1p(np.exp(-np.abs(z)))


def binary_crossentropy(p, y, out, from_logits=False, weight=None):
    """out () = weighted mean over samples of the mean over the last axis of -(y log q + (1-y) log(1-q)),
    q = clip(p, 1e-7, 1 - 1e-7); from_logits: max(p, 0) - p y + log(1 + exp(-|p|)) (TensorFlow's
    sigmoid_cross_entropy_with_logits)."""
    kernel = "binary_crossentropy"
    _check_loss(kernel, p, out, target=y)
    if from_logits:
        relu_part, softplus_part = _sigmoid_xent_terms(p)
        per_elem = relu_part - p * y + softplus_part
    else:
        q = np.clip(p, *_clip_bounds(p.dtype))
        per_elem = -(y * np.log(q) + (1 - y) * np.log(1 - q))
    k = max(1, p.shape[1])
    return _reduce_rows(kernel, np.sum(per_elem, axis=1, dtype=np.float64) / k, weight, out)


def binary_crossentropy_grad(p, y, dloss, out, from_logits=False, weight=None):
    """out (N,K) = d binary_crossentropy / dp * dloss: (sigmoid(p) - y) (from_logits) or
    (1-y)/(1-q) - y/q where 1e-7 < p < 1 - 1e-7, else 0; times float32(dloss / (N*K)) [* weight_i]."""
    kernel = "binary_crossentropy_grad"
    _check_loss(kernel, p, out, p.shape, target=y)
    if from_logits:
        sigmoid(p, out)
        out -= y
    else:
        lo, hi = _clip_bounds(p.dtype)
        q = np.clip(p, lo, hi)
        np.subtract(np.divide(1 - y, 1 - q), np.divide(y, q), out=out)
        out *= (p > lo) & (p < hi)
    return _scale_rows(kernel, out, dloss, p.size, weight)


def mse(p, y, out, weight=None):
    """out () = sum_i weight_i * sum_j (p - y)_ij^2 / p.size: the mean over ALL elements when unweighted
    (Keras: mean over the last axis, then the batch reduction)."""
    _expect_shape("mse", "targets", np.shape(y), np.shape(p))
    _expect_shape("mse", "out", out.shape, ())
    diff = np.atleast_1d(np.subtract(p, y))        # an array also for 0-d operands (out= needs one)
    np.square(diff, out=diff)
    if weight is None:
        out[...] = np.mean(diff)
        return out
    n = p.shape[0]
    per_row = np.sum(diff.reshape(n, -1), axis=1, dtype=np.float64) / max(1, int(np.prod(p.shape[1:])))
    return _reduce_rows("mse", per_row, weight, out)


def mse_grad(p, y, dloss, out, weight=None):
    """out = 2 * (p - y) * float32(dloss / p.size) (times weight_i on sample i)."""
    _expect_shape("mse_grad", "targets", np.shape(y), np.shape(p))
    _expect_shape("mse_grad", "out", out.shape, np.shape(p))
    np.subtract(p, y, out=out)
    return _scale_rows("mse_grad", out, dloss, p.size, weight, factor=2)


# ---------------------------------------------------------------------------------------------------
# optimizer updates: in place on their state arrays (the only kernels that write their inputs).
# Settings arrive validated by the IR (ir/ops/optim.py: check_setting); lr is a number or a 0-d array
# (the training graph's learning-rate input). Operands come in the IR op's order (w, g, lr, scalars,
# slots; ir/ops/optim.py operand_names) and are passed by name. Each update first applies the two steps Keras 3's base
# optimizer applies to every optimizer: clipnorm, then decoupled weight decay (_prepare_update).

def _check_state(kernel, w, **state):
    for name, arr in state.items():
        if arr is not None:
            _expect_shape(kernel, name, np.shape(arr), w.shape)


def _scalar(kernel, what, value):
    if np.size(value) != 1:
        _fail(kernel, f"{what} must be a scalar, got shape {np.shape(value)}")
    return float(np.asarray(value).reshape(()))


def _prepare_update(kernel, w, g, lr, weight_decay, clipnorm):
    """Keras 3 BaseOptimizer before update_step, in float32 like the LLVM kernels: returns the clipped
    gradient g * clipnorm / max(||g||, clipnorm) (||g|| summed in float64; g itself when clipnorm is 0)
    and applies the decoupled weight decay w -= (w * weight_decay) * lr in place."""
    cast = w.dtype.type
    if clipnorm:
        flat = np.asarray(g, np.float64).ravel()
        norm = cast(math.sqrt(float(np.dot(flat, flat))))
        # a NaN norm compares False: divide by clipnorm, so NaN stays where the gradient has it
        g = np.multiply(g, cast(clipnorm)) / (norm if norm > cast(clipnorm) else cast(clipnorm))
    if weight_decay:
        decay = np.multiply(w, cast(weight_decay))
        decay *= cast(lr)
        w -= decay
    return g


def sgd_update(w, g, lr, velocity=None, momentum=0.0, nesterov=False, weight_decay=0.0, clipnorm=0.0):
    """Keras SGD in place: velocity = momentum*velocity - lr*g; w += velocity (nesterov:
    w += momentum*velocity - lr*g). velocity may be None when momentum == 0 (then w -= lr*g)."""
    _check_state("sgd_update", w, g=g, velocity=velocity)
    lr, momentum = _scalar("sgd_update", "lr", lr), float(momentum)
    g = _prepare_update("sgd_update", w, g, lr, weight_decay, clipnorm)
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


def adam_update(w, g, lr, t, m, v, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.0, clipnorm=0.0):
    """Keras 3 Adam in place, t the step number after increment (1 on the first step):
    alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t); m += (g - m)(1 - beta_1);
    v += (g^2 - v)(1 - beta_2); w -= alpha * m / (sqrt(v) + epsilon). AdamW = weight_decay > 0."""
    _check_state("adam_update", w, g=g, m=m, v=v)
    t = _scalar("adam_update", "t", t)
    if t < 1:
        _fail("adam_update", f"step t must be >= 1 (the step number after increment), got {t}")
    lr, beta_1, beta_2 = _scalar("adam_update", "lr", lr), float(beta_1), float(beta_2)
    g = _prepare_update("adam_update", w, g, lr, weight_decay, clipnorm)
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


# ---------------------------------------------------------------------------------------------------
# CNN building blocks: depthwise convolution, batch normalization, global max pooling, padding,
# concatenation, slicing, reductions

def depthwise_conv2d(x, w, b, out, stride, padding, dilation, activation="linear", activation_params=()):
    """out[..., c*M + m] = activation(sum over taps of x[..., c] * w[i, j, c, m] + b); x (N,H,W,C),
    w (KH,KW,C,M), b (C*M,) or None, out (N,OH,OW,C*M). Taps accumulate from 0 in row-major order,
    then the bias is added (so a fused bias equals a separate bias_add exactly)."""
    _expect_rank("depthwise_conv2d", "x", x, 4)
    _expect_rank("depthwise_conv2d", "w", w, 4)
    act = _activation("depthwise_conv2d", activation)
    n, h, wd, c = x.shape
    kh, kw, wc, m = w.shape
    if wc != c:
        _fail("depthwise_conv2d", f"x {x.shape} has {c} channels but w {w.shape} expects {wc}")
    if b is not None:
        _expect_shape("depthwise_conv2d", "b", np.shape(b), (c * m,))
    stride, pads, dilation, (oh, ow) = _window_geometry("depthwise_conv2d", x.shape, kh, kw, stride, padding,
                                                         dilation)
    _expect_shape("depthwise_conv2d", "out", out.shape, (n, oh, ow, c * m))
    acc = out.reshape(n, oh, ow, c, m) if out.flags.c_contiguous else np.empty((n, oh, ow, c, m), out.dtype)
    acc.fill(0)
    for tap, (o_h, o_w), (i_h, i_w) in _taps(kh, kw, stride, pads, dilation, (h, wd), (oh, ow)):
        region = acc[:, o_h, o_w]
        _accumulate(region, x[:, i_h, i_w, :, None] * w[tap // kw, tap % kw])
    if not out.flags.c_contiguous:
        out[...] = acc.reshape(out.shape)
    if b is not None:
        out += b
    return _apply_activation(out, act, activation_params)


def _depthwise_grad_taps(kernel, image_shape, kernel_shape, dy, stride, padding, dilation):
    """Shared set-up of the two depthwise gradients: checks (naming `kernel`), dy as (N, OH, OW, C, M),
    the kernel width and the taps [(tap, (out rows, out cols), (in rows, in cols))]."""
    n, h, wd, c = image_shape
    kh, kw, wc, m = kernel_shape
    if wc != c:
        _fail(kernel, f"the image {tuple(image_shape)} has {c} channels but the kernel {tuple(kernel_shape)} "
                      f"expects {wc}")
    stride, pads, dilation, (oh, ow) = _window_geometry(kernel, image_shape, kh, kw, stride, padding, dilation)
    _expect_shape(kernel, "dy", dy.shape, (n, oh, ow, c * m))
    return dy.reshape(n, oh, ow, c, m), kw, _taps(kh, kw, stride, pads, dilation, (h, wd), (oh, ow))


def depthwise_conv2d_grad_input(dy, w, out, stride, padding, dilation):
    """out (N,H,W,C) = d(sum(dy * depthwise_conv2d(x, w)))/dx."""
    _expect_rank("depthwise_conv2d_grad_input", "out", out, 4)
    _expect_rank("depthwise_conv2d_grad_input", "w", w, 4)
    dy5, kw, taps = _depthwise_grad_taps("depthwise_conv2d_grad_input", out.shape, w.shape, dy, stride, padding,
                                         dilation)
    out.fill(0)
    for tap, (o_h, o_w), (i_h, i_w) in taps:
        _accumulate(out[:, i_h, i_w], (dy5[:, o_h, o_w] * w[tap // kw, tap % kw]).sum(axis=-1))
    return out


def depthwise_conv2d_grad_filter(x, dy, out, stride, padding, dilation):
    """out (KH,KW,C,M) = d(sum(dy * depthwise_conv2d(x, w)))/dw, summed over the batch."""
    _expect_rank("depthwise_conv2d_grad_filter", "x", x, 4)
    _expect_rank("depthwise_conv2d_grad_filter", "out", out, 4)
    dy5, kw, taps = _depthwise_grad_taps("depthwise_conv2d_grad_filter", x.shape, out.shape, dy, stride, padding,
                                         dilation)
    out.fill(0)
    for tap, (o_h, o_w), (i_h, i_w) in taps:
        out[tap // kw, tap % kw] = np.einsum("nhwc,nhwcm->cm", x[:, i_h, i_w], dy5[:, o_h, o_w])
    return out


def _bn_check(kernel, x, *vectors):
    if np.ndim(x) < 2:
        _fail(kernel, f"x must have rank >= 2 (channels last), got shape {np.shape(x)}")
    for i, v in enumerate(vectors):
        _expect_shape(kernel, f"per-channel input {i}", np.shape(v), (x.shape[-1],))
    return x.shape[-1]


def _bn_inv_std(var, epsilon, dtype):
    """1 / sqrt(var + epsilon) in dtype: sqrt then a division (both correctly rounded)."""
    std = np.sqrt(np.add(var, dtype.type(epsilon), dtype=dtype))
    return np.divide(dtype.type(1), std)


def _bn_scale(gamma, var, epsilon, dtype):
    """gamma / sqrt(var + epsilon) in dtype: an add, a sqrt and a division, each correctly rounded."""
    return np.divide(gamma, np.sqrt(np.add(var, dtype.type(epsilon), dtype=dtype)), dtype=dtype)


def _bn_normalize(x, mean, scale, beta, out):
    """out = (x - mean) * scale + beta, three roundings (no fused multiply-add) as in the LLVM kernels."""
    np.subtract(x, mean, out=out)
    out *= scale
    out += beta
    return out


def batch_norm(x, gamma, beta, mean, var, out, epsilon=1e-3):
    """out = (x - mean) * (gamma / sqrt(var + epsilon)) + beta per channel (the last axis)."""
    _bn_check("batch_norm", x, gamma, beta, mean, var)
    _expect_shape("batch_norm", "out", out.shape, x.shape)
    return _bn_normalize(x, mean, _bn_scale(gamma, var, epsilon, out.dtype), beta, out)


def batch_norm_train(x, gamma, beta, out, batch_mean, batch_var, epsilon=1e-3):
    """Normalize with the batch's statistics over every axis but the last: batch_mean = sum(x) / M,
    batch_var = sum((x - batch_mean)^2) / M (biased), both accumulated in float64 and stored rounded;
    out as batch_norm with them. out may be x."""
    c = _bn_check("batch_norm_train", x, gamma, beta)
    _expect_shape("batch_norm_train", "out", out.shape, x.shape)
    _expect_shape("batch_norm_train", "batch_mean", batch_mean.shape, (c,))
    _expect_shape("batch_norm_train", "batch_var", batch_var.shape, (c,))
    x2 = x.reshape(-1, c)
    rows = max(1, x2.shape[0])
    batch_mean[...] = x2.sum(axis=0, dtype=np.float64) / rows
    centered = out.reshape(-1, c)
    np.subtract(x2, batch_mean, out=centered)           # x - mean, rounded like the kernel's
    batch_var[...] = np.einsum("ij,ij->j", centered, centered, dtype=np.float64) / rows
    centered *= _bn_scale(gamma, batch_var, epsilon, out.dtype)
    centered += beta
    return out, batch_mean, batch_var


def batch_norm_train_grad(x, dy, gamma, mean, var, dx, dgamma, dbeta, epsilon=1e-3):
    """Gradients of batch_norm_train (statistics as functions of x), inv = 1 / sqrt(var + epsilon):
    dbeta = sum(dy); dgamma = sum(dy * (x - mean)) * inv;
    dx = gamma * inv * ((dy - dbeta / M) - (x - mean) * (sum(dy * (x - mean)) / M * inv * inv)).
    Sums in float64. dx may be dy."""
    c = _bn_check("batch_norm_train_grad", x, gamma, mean, var)
    _expect_shape("batch_norm_train_grad", "dy", np.shape(dy), x.shape)
    _expect_shape("batch_norm_train_grad", "dx", dx.shape, x.shape)
    _expect_shape("batch_norm_train_grad", "dgamma", dgamma.shape, (c,))
    _expect_shape("batch_norm_train_grad", "dbeta", dbeta.shape, (c,))
    dt = dx.dtype
    x2, dy2 = x.reshape(-1, c), dy.reshape(-1, c)
    rows = max(1, x2.shape[0])
    inv = _bn_inv_std(var, epsilon, dt)
    centered = np.subtract(x2, mean, dtype=dt)
    sum_dy = dy2.sum(axis=0, dtype=np.float64)
    sum_dyc = np.einsum("ij,ij->j", dy2, centered, dtype=np.float64)
    mean_dy = (sum_dy / rows).astype(dt)
    mean_dyc = (sum_dyc / rows).astype(dt) * inv * inv
    dbeta[...] = sum_dy
    dgamma[...] = sum_dyc.astype(dt) * inv
    out = dx.reshape(-1, c)
    np.subtract(dy2, mean_dy, out=out)
    centered *= mean_dyc
    out -= centered
    out *= np.multiply(gamma, inv, dtype=dt)
    return dx, dgamma, dbeta


def rsqrt(x, out):
    """out = 1 / sqrt(x)."""
    _expect_shape("rsqrt", "out", out.shape, np.shape(x))
    np.sqrt(x, out=out)
    return np.divide(out.dtype.type(1), out, out=out)


def global_max_pool2d(x, out):
    """out (N,C) = max of x (N,H,W,C) over H and W; NaN propagates."""
    _expect_rank("global_max_pool2d", "x", x, 4)
    _expect_shape("global_max_pool2d", "out", out.shape, (x.shape[0], x.shape[3]))
    np.max(x, axis=(1, 2), out=out)
    return out


def global_max_pool2d_grad(x, y, dy, out):
    """out (N,H,W,C): dy at the first (row-major) position of each (sample, channel) maximum (the first
    NaN when the maximum is NaN), 0 elsewhere."""
    _expect_rank("global_max_pool2d_grad", "x", x, 4)
    n, h, w, c = x.shape
    _expect_shape("global_max_pool2d_grad", "dy", np.shape(dy), (n, c))
    _expect_shape("global_max_pool2d_grad", "out", out.shape, x.shape)
    first = np.argmax(x.reshape(n, h * w, c), axis=1)          # argmax takes the first NaN as the max
    flat = np.zeros((n, h * w, c), out.dtype)
    np.put_along_axis(flat, first[:, None, :], np.asarray(dy)[:, None, :], axis=1)
    np.copyto(out, flat.reshape(out.shape))
    return out


def pad(x, out, padding, value=0.0):
    """out = x surrounded by `value`: padding ((top, bottom), (left, right)) on H and W of NHWC x."""
    _expect_rank("pad", "x", x, 4)
    (t, b), (l, r) = _padding(padding, "pad")
    n, h, w, c = x.shape
    _expect_shape("pad", "out", out.shape, (n, h + t + b, w + l + r, c))
    out.fill(value)
    out[:, t:t + h, l:l + w] = x
    return out


def pad_grad(dy, out, padding):
    """out = dy cropped by padding ((top, bottom), (left, right)): the gradient of pad."""
    _expect_rank("pad_grad", "dy", dy, 4)
    (t, b), (l, r) = _padding(padding, "pad_grad")
    n, h, w, c = dy.shape
    _expect_shape("pad_grad", "out", out.shape, (n, h - t - b, w - l - r, c))
    np.copyto(out, dy[:, t:h - b, l:w - r])
    return out


def concat(*values_and_out, axis=-1):
    """concat(v0, v1, ..., out, axis=k): out = the values joined along axis k."""
    *values, out = values_and_out
    if not values:
        _fail("concat", "needs at least one value")
    try:
        np.concatenate(values, axis=axis, out=out)
    except ValueError as e:
        _fail("concat", f"values {[np.shape(v) for v in values]} and out {out.shape} along axis {axis}: {e}")
    return out


def slice_axis(x, out, axis, start, stop):
    """out = x[start:stop] along axis (the `slice` op; named so as not to shadow the builtin here)."""
    index = (np.s_[:],) * int(axis) + (np.s_[int(start):int(stop)],)
    _expect_shape("slice", "out", out.shape, x[index].shape)
    np.copyto(out, x[index])
    return out


def slice_grad(dy, out, axis, start, size):
    """out = zeros with dy at [start, start + dy.shape[axis]) along axis (size is out's length there)."""
    axis, start = int(axis), int(start)
    _expect_shape("slice_grad", "out", out.shape[axis:axis + 1], (int(size),))
    out.fill(0)
    index = (np.s_[:],) * axis + (np.s_[start:start + dy.shape[axis]],)
    np.copyto(out[index], dy)
    return out


def reduce_sum(x, out, axis, keepdims=False):
    """out = sum of x over the axes in `axis` (a tuple)."""
    np.sum(x, axis=tuple(axis), keepdims=keepdims, out=out)
    return out


def reduce_mean(x, out, axis, keepdims=False):
    """out = mean of x over the axes in `axis` (a tuple)."""
    np.mean(x, axis=tuple(axis), keepdims=keepdims, out=out)
    return out


def reduce_grad(dy, out, axis, mean=False):
    """out = dy broadcast over the reduced axes of out's shape (divided by their element count if mean)."""
    keep = tuple(1 if i in axis else d for i, d in enumerate(out.shape))
    if np.size(dy) != math.prod(keep):
        _fail("reduce_grad", f"dy {np.shape(dy)} does not match out {out.shape} reduced over {tuple(axis)}")
    np.copyto(out, np.reshape(dy, keep))
    if mean:
        out /= max(1, math.prod(out.shape[i] for i in axis))
    return out


def batch_norm_scale(gamma, var, out, epsilon=1e-3):
    """out = gamma / sqrt(var + epsilon) (the factor of batch_norm; fold_batch_norm's weight scale)."""
    _expect_shape("batch_norm_scale", "var", np.shape(var), np.shape(gamma))
    _expect_shape("batch_norm_scale", "out", out.shape, np.shape(gamma))
    np.copyto(out, _bn_scale(gamma, var, epsilon, out.dtype))
    return out
def rmsprop_update(w, g, lr, velocity, momentum_buffer=None, average_gradient=None, rho=0.9, momentum=0.0,
                   epsilon=1e-7, centered=False, weight_decay=0.0, clipnorm=0.0):
    """Keras 3 RMSprop in place: velocity = rho*velocity + (1-rho)*g^2; denominator = velocity + epsilon
    (centered: average_gradient = rho*avg + (1-rho)*g, denominator = velocity - avg^2 + epsilon);
    increment = lr*g / sqrt(denominator); w -= increment, or with momentum > 0:
    momentum_buffer = momentum*buffer + increment; w -= momentum_buffer."""
    kernel = "rmsprop_update"
    _check_state(kernel, w, g=g, velocity=velocity, momentum_buffer=momentum_buffer,
                 average_gradient=average_gradient)
    if bool(momentum) != (momentum_buffer is not None) or bool(centered) != (average_gradient is not None):
        _fail(kernel, f"momentum={momentum} / centered={centered} need exactly the matching state arrays")
    lr = _scalar(kernel, "lr", lr)
    g = _prepare_update(kernel, w, g, lr, weight_decay, clipnorm)
    cast = w.dtype.type
    rho = float(rho)
    velocity *= cast(rho)
    tmp = np.multiply(g, g)
    tmp *= cast(1 - rho)
    velocity += tmp
    if centered:
        average_gradient *= cast(rho)
        np.multiply(g, cast(1 - rho), out=tmp)
        average_gradient += tmp
        np.multiply(average_gradient, average_gradient, out=tmp)
        np.subtract(velocity, tmp, out=tmp)
        tmp += cast(epsilon)
    else:
        np.add(velocity, cast(epsilon), out=tmp)
    np.sqrt(tmp, out=tmp)
    np.divide(np.multiply(g, cast(lr)), tmp, out=tmp)       # increment = (lr * g) / sqrt(denominator)
    if momentum:
        momentum_buffer *= cast(momentum)
        momentum_buffer += tmp
        w -= momentum_buffer
    else:
        w -= tmp
    return w
# augmentation (random_flip, random_translation): per-image draws from the dropout key, identical in
# every backend (the contract is in ir/ops/augment.py); the weights are float32 in this exact order.

AUG_FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")
AUG_FILL_MODES = ("reflect", "wrap", "constant", "nearest")
AUG_INTERPOLATIONS = ("bilinear", "nearest")


def augment_uniform(count, seed, step, stream, base=0):
    """float32 r in [0, 1) for images base .. base+count-1 of one stream: (mix32((2i + stream + 1) ^ key)
    >> 8) * 2**-24, key = mix32(seed * 0x9E3779B9 + step)."""
    key = mix32((int(seed) * 0x9E3779B9 + int(step)) & 0xFFFFFFFF)
    counter = (np.arange(int(base), int(base) + int(count), dtype=np.uint64) * 2 + int(stream) + 1).astype(np.uint32)
    h = mix32(counter ^ np.uint32(key))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def _check_image_batch(kernel, x, out):
    if x.ndim != 4:
        _fail(kernel, f"expects an image batch (N, H, W, C), got shape {x.shape}")
    _expect_shape(kernel, "out", out.shape, x.shape)


def random_flip(x, out, mode, seed, step, base=0):
    """out[i] = x[i] flipped (mode: horizontal = along W, vertical = along H, or both) when image i's
    draw r < 0.5, else a copy. out must not be x (a flip is a permutation)."""
    kernel = "random_flip"
    _check_image_batch(kernel, x, out)
    if mode not in AUG_FLIP_MODES:
        _fail(kernel, f"mode must be one of {AUG_FLIP_MODES}, got {mode!r}")
    flip = augment_uniform(x.shape[0], seed, step, 0, base) < np.float32(0.5)
    src = x
    if mode in ("vertical", "horizontal_and_vertical"):
        src = src[:, ::-1]
    if mode in ("horizontal", "horizontal_and_vertical"):
        src = src[:, :, ::-1]
    np.copyto(out, x)
    out[flip] = src[flip]
    return out


def _fill_index(index, size, fill_mode):
    """Tap indices -> (in-range indices, valid mask): Keras's fill modes (constant: valid = inside)."""
    if fill_mode == "reflect":                                   # d c b a | a b c d | d c b a
        j = np.mod(index, 2 * size)
        return np.where(j >= size, 2 * size - 1 - j, j), np.ones(index.shape, bool)
    if fill_mode == "wrap":                                      # a b c d | a b c d
        return np.mod(index, size), np.ones(index.shape, bool)
    if fill_mode == "nearest":                                   # a a | a b c d | d d
        return np.clip(index, 0, size - 1), np.ones(index.shape, bool)
    valid = (index >= 0) & (index < size)                        # constant: fill_value outside
    return np.clip(index, 0, size - 1), valid


def translation_taps(count, size, factor, stream, fill_mode, interpolation, seed, step, base=0):
    """Per-image taps of one axis: (index, weight, valid) each (taps, count, size); weight float32.
    The source coordinate of output position p is p - (lo + (hi - lo) * r) * size (float32 steps)."""
    lo, hi = np.float32(factor[0]), np.float32(factor[1])
    r = augment_uniform(count, seed, step, stream, base)
    shift = (lo + (hi - lo) * r) * np.float32(size)                      # (count,)
    coord = np.arange(size, dtype=np.float32)[None, :] - shift[:, None]  # (count, size)
    if interpolation == "nearest":
        taps = [(np.rint(coord), np.ones_like(coord))]                   # round half to even
    else:
        low = np.floor(coord)
        frac = coord - low
        taps = [(low, np.float32(1.0) - frac), (low + np.float32(1.0), frac)]
    index, weight, valid = [], [], []
    for pos, w in taps:
        i, v = _fill_index(pos.astype(np.int64), size, fill_mode)
        index.append(i)
        weight.append(w.astype(np.float32))
        valid.append(v)
    return np.stack(index), np.stack(weight), np.stack(valid)


def _translation_args(kernel, x, out, height_factor, width_factor, fill_mode, interpolation):
    _check_image_batch(kernel, x, out)
    if fill_mode not in AUG_FILL_MODES:
        _fail(kernel, f"fill_mode must be one of {AUG_FILL_MODES}, got {fill_mode!r}")
    if interpolation not in AUG_INTERPOLATIONS:
        _fail(kernel, f"interpolation must be one of {AUG_INTERPOLATIONS}, got {interpolation!r}")
    for name, f in (("height_factor", height_factor), ("width_factor", width_factor)):
        if len(f) != 2 or not -1.0 <= f[0] <= f[1] <= 1.0:
            _fail(kernel, f"{name} must be a (lower, upper) pair in [-1, 1], got {f!r}")


def _translation_plan(x, height_factor, width_factor, fill_mode, interpolation, seed, step, base):
    n, h, w, _ = x.shape
    rows = translation_taps(n, h, height_factor, 0, fill_mode, interpolation, seed, step, base)
    cols = translation_taps(n, w, width_factor, 1, fill_mode, interpolation, seed, step, base)
    return rows, cols


def random_translation(x, out, height_factor, width_factor, fill_mode, interpolation, fill_value, seed, step,
                       base=0):
    """out[i, y, x] = sum over taps (a, b) of w_a(y) * w_b(x) * x[i, row_a(y), col_b(x)] (fill_value for an
    outside tap in constant mode; zero-weight taps skipped), the taps of translation_taps. out must not be x."""
    kernel = "random_translation"
    _translation_args(kernel, x, out, height_factor, width_factor, fill_mode, interpolation)
    (ri, rw, rv), (ci, cw, cv) = _translation_plan(x, height_factor, width_factor, fill_mode, interpolation,
                                                   seed, step, base)
    images = np.arange(x.shape[0])[:, None, None]
    fill = out.dtype.type(fill_value)
    first = True
    for a in range(len(ri)):
        for b in range(len(ci)):
            weight = (rw[a][:, :, None] * cw[b][:, None, :])[..., None]                      # (n, h, w, 1) f32
            vals = x[images, ri[a][:, :, None], ci[b][:, None, :]]
            vals = np.where((rv[a][:, :, None] & cv[b][:, None, :])[..., None], vals, fill)
            term = np.where(weight == 0, out.dtype.type(0), weight.astype(out.dtype) * vals)
            if first:
                np.copyto(out, term)
                first = False
            else:
                np.add(out, term, out=out)
    return out


def random_translation_grad(dy, out, height_factor, width_factor, fill_mode, interpolation, fill_value, seed,
                            step, base=0):
    """The adjoint of random_translation: out[i, row_a(y), col_b(x)] += w_a(y) * w_b(x) * dy[i, y, x] for each
    valid, nonzero-weight tap, visited in the order (y, x, a, b) (the LLVM kernel's order)."""
    kernel = "random_translation_grad"
    _translation_args(kernel, dy, out, height_factor, width_factor, fill_mode, interpolation)
    (ri, rw, rv), (ci, cw, cv) = _translation_plan(dy, height_factor, width_factor, fill_mode, interpolation,
                                                   seed, step, base)
    n, h, w, c = dy.shape
    ta, tb = len(ri), len(ci)
    out.fill(0)
    for i in range(n):
        # (h, w, ta, tb) grids in visiting order
        src = ri[:, i].T[:, None, :, None] * w + ci[:, i].T[None, :, None, :]
        weight = rw[:, i].T[:, None, :, None] * cw[:, i].T[None, :, None, :]
        keep = (rv[:, i].T[:, None, :, None] & cv[:, i].T[None, :, None, :]) & (weight != 0)
        terms = weight[..., None].astype(out.dtype) * dy[i][:, :, None, None, :]           # (h, w, ta, tb, c)
        keep = keep.reshape(-1)
        np.add.at(out[i].reshape(h * w, c), src.reshape(-1)[keep], terms.reshape(-1, c)[keep])
    return out


# ---------------------------------------------------------------------------------------------------
# int8 quantized inference (ir/ops/quant.py defines the arithmetic; this is its reference). Integer
# products are summed by a float64 matmul: every partial sum is an integer below 2**53 (the op bounds the
# reduction length), so BLAS gives the exact integer sum in any order.

QUANT_DTYPES = {"u8": np.dtype(np.uint8), "i8": np.dtype(np.int8)}


def _quant_out(kernel, out, dtype):
    """The [lo, hi] range of a quantized output buffer, which must have the op's dtype."""
    if QUANT_DTYPES.get(dtype) != out.dtype:
        _fail(kernel, f"out is {out.dtype}, expected {dtype} ({QUANT_DTYPES.get(dtype)})")
    info = np.iinfo(out.dtype)
    return info.min, info.max


def requant_multiplier(x_scale, w_scale, y_scale):
    """m[c] = f32(f64(x_scale) * f64(w_scale[c]) / f64(y_scale)): the float32 requantization
    multipliers (one definition for every backend)."""
    m = np.float64(x_scale) * np.asarray(w_scale, np.float64) / np.float64(y_scale)
    return m.astype(np.float32)


def _requantize(acc, m, y_zero_point, y_min, y_max, out, residual=None):
    """out = clamp(rint(f32(acc) * m [+ residual]) + y_zero_point, y_min, y_max); acc int32 (rows, F),
    m (F,), residual the f32 term f32(r - r_zero_point) * mr shaped like acc (ir/ops/quant.py)."""
    y = acc.astype(np.float32)
    np.multiply(y, m, out=y)
    if residual is not None:
        np.add(y, residual, out=y)
    np.rint(y, out=y)
    y += np.float32(y_zero_point)
    np.clip(y, y_min, y_max, out=y)
    out[...] = y.reshape(out.shape)


def _accumulate_int32(prod, b):
    """int32 accumulator (two's-complement wraparound) from the exact float64 sums and the i32 bias."""
    acc = prod.astype(np.int64)
    if b is not None:
        acc += np.asarray(b, np.int64)
    return acc.astype(np.int32)         # int64 -> int32 keeps the low 32 bits: wraparound


def quantize(x, out, scale, zero_point=0, dtype="u8"):
    """out = clamp(rint(f32(x) / f32(scale)) + zero_point) (NaN -> zero_point), ONNX QuantizeLinear."""
    lo, hi = _quant_out("quantize", out, dtype)
    _expect_shape("quantize", "out", out.shape, np.shape(x))
    q = np.divide(np.asarray(x, np.float32), np.float32(scale), dtype=np.float32)
    np.rint(q, out=q)
    q[np.isnan(q)] = 0
    q += np.float32(zero_point)
    np.clip(q, lo, hi, out=q)
    out[...] = q
    return out


def dequantize(x, out, scale, zero_point=0):
    """out = f32(x - zero_point) * f32(scale), ONNX DequantizeLinear."""
    _expect_shape("dequantize", "out", out.shape, np.shape(x))
    r = (np.asarray(x, np.int32) - np.int32(zero_point)).astype(np.float32)
    np.multiply(r, np.float32(scale), out=r)
    out[...] = r
    return out


def conv2d_q(x, w, b, out, stride, padding, dilation, x_scale, w_scale, y_scale, x_zero_point=0,
             y_zero_point=0, dtype="u8", y_min=None, y_max=None, residual=None, r_scale=None, r_zero_point=0):
    """out (N,OH,OW,F) u8/i8 = requantized conv of x (N,H,W,C) u8/i8 (padding = x_zero_point) with
    w (KH,KW,C,F) i8 plus b (F,) i32 or None, plus the u8/i8 residual (laid out like out; r_scale,
    r_zero_point) when given."""
    _expect_rank("conv2d_q", "x", x, 4)
    _expect_rank("conv2d_q", "w", w, 4)
    lo, hi = _quant_out("conv2d_q", out, dtype)
    n, _, _, c = x.shape
    kh, kw, wc, f = w.shape
    if wc != c:
        _fail("conv2d_q", f"x {x.shape} has {c} channels but w {w.shape} expects {wc}")
    if b is not None:
        _expect_shape("conv2d_q", "b", np.shape(b), (f,))
    stride, pads, dilation, (oh, ow) = _window_geometry("conv2d_q", x.shape, kh, kw, stride, padding, dilation)
    _expect_shape("conv2d_q", "out", out.shape, (n, oh, ow, f))
    if residual is not None:
        _expect_shape("conv2d_q", "residual", residual.shape, out.shape)
        if r_scale is None:
            _fail("conv2d_q", "a residual needs r_scale")
        mr = np.float32(np.float64(r_scale) / np.float64(y_scale))
    m = requant_multiplier(x_scale, w_scale, y_scale)
    y_min = lo if y_min is None else y_min
    y_max = hi if y_max is None else y_max
    k = kh * kw * c
    w2 = w.reshape(k, f).astype(np.float64)
    for s, e in _batch_chunks(n, oh * ow * (k + f) * 8):
        xs = x[s:e].astype(np.float64) - np.float64(x_zero_point)
        # padded cells hold x_zero_point, i.e. 0 after subtracting it
        cols = _windows(_padded(xs, pads, 0), kh, kw, stride, dilation, oh, ow).reshape(-1, k)
        acc = _accumulate_int32(np.matmul(cols, w2), b)
        res = None
        if residual is not None:
            res = np.multiply(np.subtract(residual[s:e].reshape(-1, f), r_zero_point, dtype=np.int32).astype(np.float32),
                              mr, dtype=np.float32)
        _requantize(acc, m, y_zero_point, y_min, y_max, out[s:e], res)
    return out


def dense_q(x, w, b, out, x_scale, w_scale, y_scale, x_zero_point=0, y_zero_point=0, dtype="u8",
            y_min=None, y_max=None):
    """out (N,M) u8/i8 = requantized (x (N,K) u8/i8 - x_zero_point) @ w (K,M) i8 + b (M,) i32 or None."""
    _expect_rank("dense_q", "x", x, 2)
    _expect_rank("dense_q", "w", w, 2)
    lo, hi = _quant_out("dense_q", out, dtype)
    if x.shape[1] != w.shape[0]:
        _fail("dense_q", f"x {x.shape} and w {w.shape} do not chain (x has {x.shape[1]} features)")
    if b is not None:
        _expect_shape("dense_q", "b", np.shape(b), (w.shape[1],))
    _expect_shape("dense_q", "out", out.shape, (x.shape[0], w.shape[1]))
    m = requant_multiplier(x_scale, w_scale, y_scale)
    xs = x.astype(np.float64) - np.float64(x_zero_point)
    acc = _accumulate_int32(np.matmul(xs, w.astype(np.float64)), b)
    _requantize(acc, m, y_zero_point, lo if y_min is None else y_min, hi if y_max is None else y_max, out)
    return out
