"""Independent float64 reference kernels and their vector-Jacobian products, for differential tests.

Written from the op definitions (TensorFlow/Keras semantics, NHWC, HWIO), sharing no code with
backends/: windows are explicit loops over kernel taps on a padded copy, reductions are plain sums.
Every function takes and returns float64 arrays; `vjp_*` return the gradient of sum(dy * f(...)) with
respect to each float input."""
from __future__ import annotations

import numpy as np


def _out_size(size, pads, extent, stride):
    return (size + pads[0] + pads[1] - extent) // stride + 1


def _taps(kh, kw, dil):
    return [(i, j, i * dil[0], j * dil[1]) for i in range(kh) for j in range(kw)]


def _window(xp, di, dj, oh, ow, stride):
    """xp[:, di + s*a, dj + s*b, :] for a < oh, b < ow: the values one kernel tap sees."""
    return xp[:, di:di + (oh - 1) * stride[0] + 1:stride[0], dj:dj + (ow - 1) * stride[1] + 1:stride[1], :]


def _pad(x, pads, fill=0.0):
    return np.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)), constant_values=fill)


def _crop(xp, pads, h, w):
    return xp[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w, :]


# -- activations -----------------------------------------------------------------------------------

def activation(name, z, alpha=0.3, min_value=None, max_value=None):
    """The activation table's entries (ir/ops/activations.py) by their definitions; NaN stays NaN."""
    if name == "linear":
        return z
    if name == "relu":
        return np.where(z > 0, z, np.where(np.isnan(z), z, 0.0))      # NaN stays NaN (IEEE max)
    if name == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    if name == "leaky_relu":
        return np.where(z > 0, z, alpha * z)                          # NaN: alpha * NaN = NaN
    if name == "clip":
        out = z
        if min_value is not None:
            out = np.where(out < min_value, min_value, out)             # comparisons with NaN are false
        if max_value is not None:
            out = np.where(out > max_value, max_value, out)
        return out
    raise ValueError(name)


def activation_vjp(name, y, dy, alpha=0.3, min_value=None, max_value=None):
    """d/dz given the activation's output y (the form the IR's *_grad ops use)."""
    if name == "linear":
        return dy
    if name == "relu":
        return np.where(y > 0, dy, 0.0)
    if name == "sigmoid":
        return dy * y * (1.0 - y)
    if name == "tanh":
        return dy * (1.0 - y * y)
    if name == "leaky_relu":                 # y > 0 exactly where z > 0 (alpha >= 0)
        return dy * np.where(y > 0, 1.0, alpha)
    if name == "clip":                       # slope 1 strictly inside the bounds, 0 on and beyond them
        inside = np.ones(np.shape(y), bool)
        if min_value is not None:
            inside &= y > min_value
        if max_value is not None:
            inside &= y < max_value
        return dy * inside
    raise ValueError(name)


# -- convolution, pooling, dense, matmul -------------------------------------------------------------

def conv2d(x, w, b, stride, pads, dil):
    n, h, wd, _ = x.shape
    kh, kw, _, f = w.shape
    oh = _out_size(h, pads[0], (kh - 1) * dil[0] + 1, stride[0])
    ow = _out_size(wd, pads[1], (kw - 1) * dil[1] + 1, stride[1])
    xp = _pad(x, pads)
    y = np.zeros((n, oh, ow, f))
    for i, j, di, dj in _taps(kh, kw, dil):
        y += np.einsum("nabc,cf->nabf", _window(xp, di, dj, oh, ow, stride), w[i, j])
    return y if b is None else y + b


def vjp_conv2d(x, w, dy, stride, pads, dil):
    """-> (dx, dw, db)."""
    n, h, wd, _ = x.shape
    kh, kw = w.shape[:2]
    oh, ow = dy.shape[1:3]
    xp = _pad(x, pads)
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i, j, di, dj in _taps(kh, kw, dil):
        _window(dxp, di, dj, oh, ow, stride)[...] += np.einsum("nabf,cf->nabc", dy, w[i, j])
        dw[i, j] = np.einsum("nabc,nabf->cf", _window(xp, di, dj, oh, ow, stride), dy)
    return _crop(dxp, pads, h, wd), dw, dy.sum(axis=(0, 1, 2))


def max_pool2d(x, pool, stride, pads):
    n, h, w, c = x.shape
    oh, ow = _out_size(h, pads[0], pool[0], stride[0]), _out_size(w, pads[1], pool[1], stride[1])
    xp = _pad(x, pads, -np.inf)
    y = np.full((n, oh, ow, c), -np.inf)
    nan = np.zeros(y.shape, bool)
    for _, _, di, dj in _taps(pool[0], pool[1], (1, 1)):
        v = _window(xp, di, dj, oh, ow, stride)
        nan |= np.isnan(v)
        y = np.maximum(y, np.where(np.isnan(v), -np.inf, v))
    return np.where(nan, np.nan, y)                     # a NaN in the window gives NaN (np.max)


def vjp_max_pool2d(x, dy, pool, stride, pads):
    """dy goes to the first maximum of each window in row-major tap order."""
    n, h, w, c = x.shape
    oh, ow = dy.shape[1:3]
    y = max_pool2d(x, pool, stride, pads)
    xp = _pad(x, pads, -np.inf)
    dxp = np.zeros_like(xp)
    taken = np.zeros(y.shape, bool)
    for _, _, di, dj in _taps(pool[0], pool[1], (1, 1)):
        hit = (_window(xp, di, dj, oh, ow, stride) == y) & ~taken
        _window(dxp, di, dj, oh, ow, stride)[...] += np.where(hit, dy, 0.0)
        taken |= hit
    return _crop(dxp, pads, h, w)


def _avg_counts(shape, pool, stride, pads, include_pad):
    n, h, w, c = shape
    oh, ow = _out_size(h, pads[0], pool[0], stride[0]), _out_size(w, pads[1], pool[1], stride[1])
    if include_pad:
        return np.full((1, oh, ow, 1), float(pool[0] * pool[1]))
    ones = _pad(np.ones((1, h, w, 1)), pads)
    count = np.zeros((1, oh, ow, 1))
    for _, _, di, dj in _taps(pool[0], pool[1], (1, 1)):
        count += _window(ones, di, dj, oh, ow, stride)
    return count


def avg_pool2d(x, pool, stride, pads, include_pad):
    n, h, w, c = x.shape
    count = _avg_counts(x.shape, pool, stride, pads, include_pad)
    xp = _pad(x, pads)
    y = np.zeros((n,) + count.shape[1:3] + (c,))
    for _, _, di, dj in _taps(pool[0], pool[1], (1, 1)):
        y += _window(xp, di, dj, y.shape[1], y.shape[2], stride)
    return y / count


def vjp_avg_pool2d(x, dy, pool, stride, pads, include_pad):
    n, h, w, c = x.shape
    g = dy / _avg_counts(x.shape, pool, stride, pads, include_pad)
    dxp = np.zeros((n, h + sum(pads[0]), w + sum(pads[1]), c))
    for _, _, di, dj in _taps(pool[0], pool[1], (1, 1)):
        _window(dxp, di, dj, dy.shape[1], dy.shape[2], stride)[...] += g
    return _crop(dxp, pads, h, w)


def matmul(a, b, ta, tb):
    a = a.T if ta else a
    b = b.T if tb else b
    out = np.zeros((a.shape[0], b.shape[1]))
    for k in range(a.shape[1]):                          # rank-1 updates: a plain sum over k
        out += np.outer(a[:, k], b[k, :])
    return out


def vjp_matmul(a, b, dy, ta, tb):
    am, bm = (a.T if ta else a), (b.T if tb else b)
    da, db = dy @ bm.T, am.T @ dy
    return (da.T if ta else da), (db.T if tb else db)


# -- softmax family, losses ----------------------------------------------------------------------

def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def vjp_softmax(y, dy, axis):
    return y * (dy - (y * dy).sum(axis=axis, keepdims=True))


def vjp_log_softmax(y, dy, axis):
    return dy - np.exp(y) * dy.sum(axis=axis, keepdims=True)


def crossentropy(p, target, from_logits, sparse):
    """Keras categorical / sparse categorical crossentropy, mean over the batch. Probabilities are
    normalized per row (the tests keep them inside the 1e-7 clip, where Keras' clip is the identity)."""
    t = np.eye(p.shape[1])[target.astype(int)] if sparse else target
    logq = log_softmax(p, 1) if from_logits else np.log(p / p.sum(axis=1, keepdims=True))
    return -np.mean((t * logq).sum(axis=1))


def vjp_crossentropy(p, target, from_logits, sparse):
    t = np.eye(p.shape[1])[target.astype(int)] if sparse else target
    n = p.shape[0]
    if from_logits:
        return (softmax(p, 1) * t.sum(axis=1, keepdims=True) - t) / n
    return (t.sum(axis=1, keepdims=True) / p.sum(axis=1, keepdims=True) - t / p) / n


def mse(p, t):
    return np.mean((p - t) ** 2)


def vjp_mse(p, t):
    return 2.0 * (p - t) / p.size


# -- broadcasting -----------------------------------------------------------------------------------

def unbroadcast(g, shape):
    """Sum g down to `shape` (the adjoint of NumPy broadcasting)."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for ax, d in enumerate(shape):
        if d == 1 and g.shape[ax] != 1:
            g = g.sum(axis=ax, keepdims=True)
    return g


# -- depthwise convolution ---------------------------------------------------------------------------

def _inside(x, pads):
    """1.0 on the image, 0.0 on the padding of _pad(x, pads), as an (1, H', W', 1) mask."""
    return _pad(np.ones((1,) + x.shape[1:3] + (1,)), pads)


def depthwise_conv2d(x, w, b, stride, pads, dil):
    """y[..., c*M + m] = sum over taps inside the image of x[..., c] * w[i, j, c, m] (+ b). Taps on the
    padding are skipped, not multiplied by 0 (both backends' documented kernel semantic: an inf weight
    facing the padding gives no NaN; conv2d, as TensorFlow, multiplies the zero padding instead)."""
    n, h, wd, c = x.shape
    kh, kw, _, m = w.shape
    oh = _out_size(h, pads[0], (kh - 1) * dil[0] + 1, stride[0])
    ow = _out_size(wd, pads[1], (kw - 1) * dil[1] + 1, stride[1])
    xp, inside = _pad(x, pads), _inside(x, pads)
    y = np.zeros((n, oh, ow, c, m))
    for i, j, di, dj in _taps(kh, kw, dil):
        on_image = _window(inside, di, dj, oh, ow, stride)[..., None] > 0
        y += np.where(on_image, np.einsum("nabc,cm->nabcm", _window(xp, di, dj, oh, ow, stride), w[i, j]), 0.0)
    y = y.reshape(n, oh, ow, c * m)
    return y if b is None else y + b


def vjp_depthwise_conv2d(x, w, dy, stride, pads, dil):
    """-> (dx, dw, db); padding taps contribute nothing (as in depthwise_conv2d)."""
    n, h, wd, c = x.shape
    kh, kw, _, m = w.shape
    oh, ow = dy.shape[1:3]
    dy5 = dy.reshape(n, oh, ow, c, m)
    xp, inside = _pad(x, pads), _inside(x, pads)
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i, j, di, dj in _taps(kh, kw, dil):
        on_image = _window(inside, di, dj, oh, ow, stride)[..., None] > 0
        _window(dxp, di, dj, oh, ow, stride)[...] += np.einsum("nabcm,cm->nabc", dy5, w[i, j])  # padding: cropped
        dw[i, j] = np.einsum("nabcm->cm", np.where(on_image, _window(xp, di, dj, oh, ow, stride)[..., None] * dy5,
                                                    0.0))
    return _crop(dxp, pads, h, wd), dw, dy.sum(axis=(0, 1, 2))


# -- batch normalization (channels last) ---------------------------------------------------------------

def batch_norm(x, gamma, beta, mean, var, eps):
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def vjp_batch_norm(x, gamma, mean, var, eps, dy):
    """-> dict of the gradients w.r.t. x, gamma, beta, mean, var (inference form, given statistics)."""
    axes = tuple(range(x.ndim - 1))
    inv = 1.0 / np.sqrt(var + eps)
    centered_dot = (dy * (x - mean)).sum(axis=axes)
    return {"x": dy * gamma * inv, "gamma": centered_dot * inv, "beta": dy.sum(axis=axes),
            "mean": -(dy * gamma * inv).sum(axis=axes), "var": -0.5 * gamma * centered_dot * inv ** 3}


def batch_statistics(x):
    """(mean, biased variance) per channel over every axis but the last."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    return mean, ((x - mean) ** 2).mean(axis=axes)


def vjp_batch_norm_train(x, gamma, eps, dy):
    """Gradients of (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta, the statistics functions of x."""
    axes = tuple(range(x.ndim - 1))
    mean, var = batch_statistics(x)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * inv
    dxhat = dy * gamma
    dx = inv * (dxhat - dxhat.mean(axis=axes) - xhat * (dxhat * xhat).mean(axis=axes))
    return {"x": dx, "gamma": (dy * xhat).sum(axis=axes), "beta": dy.sum(axis=axes)}


# -- global max pooling ------------------------------------------------------------------------------

def global_max_pool2d(x):
    n, h, w, c = x.shape
    y = np.full((n, c), -np.inf)
    nan = np.zeros((n, c), bool)
    for i in range(h):
        for j in range(w):
            nan |= np.isnan(x[:, i, j])
            y = np.maximum(y, np.where(np.isnan(x[:, i, j]), -np.inf, x[:, i, j]))
    return np.where(nan, np.nan, y)


def vjp_global_max_pool2d(x, dy):
    """dy goes to the first (row-major over H, W) position holding the maximum (the first NaN if NaN)."""
    n, h, w, c = x.shape
    y = global_max_pool2d(x)
    dx = np.zeros_like(x)
    taken = np.zeros((n, c), bool)
    for i in range(h):
        for j in range(w):
            v = x[:, i, j]
            hit = ((v == y) | (np.isnan(v) & np.isnan(y))) & ~taken
            dx[:, i, j] = np.where(hit, dy, 0.0)
            taken |= hit
    return dx


# -- binary crossentropy -------------------------------------------------------------------------------

def binary_crossentropy(p, t, from_logits):
    """Keras: per element -(t log q + (1 - t) log(1 - q)), mean over the last axis, then over the batch
    (probabilities inside the 1e-7 clip, where the clip is the identity)."""
    if from_logits:        # TensorFlow's sigmoid_cross_entropy_with_logits, the documented formula
        return np.mean(np.maximum(p, 0) - p * t + np.log1p(np.exp(-np.abs(p))))
    return np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))


def vjp_binary_crossentropy(p, t, from_logits):
    if from_logits:
        return (1.0 / (1.0 + np.exp(-p)) - t) / p.size
    return ((1 - t) / (1 - p) - t / p) / p.size
