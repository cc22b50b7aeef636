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

def activation(name, z):
    if name == "linear":
        return z
    if name == "relu":
        return np.where(z > 0, z, np.where(np.isnan(z), z, 0.0))      # NaN stays NaN (IEEE max)
    if name == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    raise ValueError(name)


def activation_vjp(name, y, dy):
    """d/dz given the activation's output y (the form the IR's *_grad ops use)."""
    if name == "linear":
        return dy
    if name == "relu":
        return np.where(y > 0, dy, 0.0)
    if name == "sigmoid":
        return dy * y * (1.0 - y)
    if name == "tanh":
        return dy * (1.0 - y * y)
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
