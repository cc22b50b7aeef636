"""NumPy kernels: the runtime library of the NumPy backend. Every kernel writes into a caller-provided
`out` (possibly a view into the memory arena) and returns it. Vectorized: convolutions are im2col +
one matmul; pools loop only over window taps. Depends only on NumPy (pasted into standalone modules)."""
import numpy as np

_ACT = {}


def _act(out, activation):
    if activation == "linear" or activation is None:
        return out
    if activation == "relu":
        return np.maximum(out, 0, out=out)
    if activation == "sigmoid":
        return sigmoid(out, out)
    if activation == "tanh":
        return np.tanh(out, out=out)
    raise ValueError(f"unknown activation {activation!r}")


def _pad(x, padding, value=0.0):
    (t, b), (l, r) = padding
    if t == b == l == r == 0:
        return x
    n, h, w, c = x.shape
    xp = np.full((n, h + t + b, w + l + r, c), value, dtype=x.dtype)
    xp[:, t:t + h, l:l + w, :] = x
    return xp


def _windows(xp, kh, kw, stride, dilation, oh, ow):
    """Strided view (N, OH, OW, KH, KW, C) of a padded NHWC tensor."""
    n, _, _, c = xp.shape
    sn, sh, sw, sc = xp.strides
    return np.lib.stride_tricks.as_strided(
        xp, (n, oh, ow, kh, kw, c),
        (sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], sc), writeable=False)


def _check(name, out, shape):
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name}: out has shape {out.shape}, expected {tuple(shape)}")


def conv2d(x, w, b, out, stride, padding, dilation, activation="linear"):
    n, h, wd, c = x.shape
    kh, kw, ci, f = w.shape
    if ci != c:
        raise ValueError(f"conv2d: x has {c} channels, w expects {ci}")
    oh, ow = out.shape[1:3]
    _check("conv2d", out, (n, oh, ow, f))
    cols = _windows(_pad(x, padding), kh, kw, stride, dilation, oh, ow).reshape(n * oh * ow, kh * kw * c)
    np.matmul(cols, w.reshape(kh * kw * c, f), out=out.reshape(n * oh * ow, f))
    if b is not None:
        out += b
    return _act(out, activation)


def conv2d_grad_filter(x, dy, out, stride, padding, dilation):
    n, oh, ow, f = dy.shape
    kh, kw, c, _ = out.shape
    cols = _windows(_pad(x, padding), kh, kw, stride, dilation, oh, ow).reshape(n * oh * ow, kh * kw * c)
    np.matmul(cols.T, dy.reshape(n * oh * ow, f), out=out.reshape(kh * kw * c, f))
    return out


def conv2d_grad_input(dy, w, out, stride, padding, dilation):
    n, oh, ow, f = dy.shape
    kh, kw, c, _ = w.shape
    _, h, wd, _ = out.shape
    (t, bo), (l, r) = padding
    dcols = (dy.reshape(-1, f) @ w.reshape(kh * kw * c, f).T).reshape(n, oh, ow, kh, kw, c)
    dxp = np.zeros((n, h + t + bo, wd + l + r, c), dtype=out.dtype)
    sh, sw = stride
    dh, dw = dilation
    for i in range(kh):
        for j in range(kw):
            dxp[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw, :] += dcols[:, :, :, i, j, :]
    out[...] = dxp[:, t:t + h, l:l + wd, :]
    return out


def max_pool2d(x, out, pool, stride, padding):
    n, oh, ow, c = out.shape
    xp = _pad(x, padding, -np.inf)
    win = _windows(xp, pool[0], pool[1], stride, (1, 1), oh, ow)
    np.max(win, axis=(3, 4), out=out)
    return out


def max_pool2d_grad(x, dy, out, pool, stride, padding):
    n, oh, ow, c = dy.shape
    _, h, wd, _ = x.shape
    (t, b), (l, r) = padding
    xp = _pad(x, padding, -np.inf)
    win = _windows(xp, pool[0], pool[1], stride, (1, 1), oh, ow).reshape(n, oh, ow, pool[0] * pool[1], c)
    arg = np.argmax(win, axis=3)                     # first maximum in row-major window order
    dxp = np.zeros(xp.shape, dtype=out.dtype)
    sh, sw = stride
    for k in range(pool[0] * pool[1]):
        i, j = divmod(k, pool[1])
        dxp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += np.where(arg == k, dy, 0)
    out[...] = dxp[:, t:t + h, l:l + wd, :]
    return out


def _avg_counts(h, wd, pool, stride, padding, oh, ow, count_include_pad, dtype):
    if count_include_pad:
        return dtype.type(pool[0] * pool[1])
    ones = _pad(np.ones((1, h, wd, 1), dtype), padding, 0.0)
    return _windows(ones, pool[0], pool[1], stride, (1, 1), oh, ow).sum(axis=(3, 4))


def avg_pool2d(x, out, pool, stride, padding, count_include_pad=False):
    n, oh, ow, c = out.shape
    win = _windows(_pad(x, padding), pool[0], pool[1], stride, (1, 1), oh, ow)
    np.sum(win, axis=(3, 4), out=out)
    out /= _avg_counts(x.shape[1], x.shape[2], pool, stride, padding, oh, ow, count_include_pad, out.dtype)
    return out


def avg_pool2d_grad(dy, out, pool, stride, padding, count_include_pad=False):
    n, oh, ow, c = dy.shape
    _, h, wd, _ = out.shape
    (t, b), (l, r) = padding
    g = dy / _avg_counts(h, wd, pool, stride, padding, oh, ow, count_include_pad, out.dtype)
    dxp = np.zeros((n, h + t + b, wd + l + r, c), dtype=out.dtype)
    sh, sw = stride
    for i in range(pool[0]):
        for j in range(pool[1]):
            dxp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += g
    out[...] = dxp[:, t:t + h, l:l + wd, :]
    return out


def global_avg_pool2d(x, out):
    np.mean(x, axis=(1, 2), out=out)
    return out


def global_avg_pool2d_grad(dy, out):
    out[...] = dy[:, None, None, :] / (out.shape[1] * out.shape[2])
    return out


def dense(x, w, b, out, activation="linear"):
    np.matmul(x, w, out=out)
    if b is not None:
        out += b
    return _act(out, activation)


def matmul(a, b, out, transpose_a=False, transpose_b=False):
    np.matmul(a.T if transpose_a else a, b.T if transpose_b else b, out=out)
    return out


def bias_add(x, b, out):
    return np.add(x, b, out=out)


def bias_add_grad(dy, out):
    np.sum(dy.reshape(-1, dy.shape[-1]), axis=0, out=out)
    return out


def add(a, b, out):
    return np.add(a, b, out=out)


def sub(a, b, out):
    return np.subtract(a, b, out=out)


def mul(a, b, out):
    return np.multiply(a, b, out=out)


def sum_to(x, out):
    lead = x.ndim - out.ndim
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(out.shape) if d == 1 and x.shape[lead + i] != 1)
    out[...] = np.sum(x, axis=axes).reshape(out.shape)
    return out


def relu(x, out):
    return np.maximum(x, 0, out=out)


def sigmoid(x, out):
    # 0.5 * (1 + tanh(x / 2)): no overflow for large |x|
    np.multiply(x, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1
    out *= 0.5
    return out


def tanh(x, out):
    return np.tanh(x, out=out)


def relu_grad(y, dy, out):
    return np.multiply(dy, y > 0, out=out)


def sigmoid_grad(y, dy, out):
    np.multiply(dy, y * (1 - y), out=out)
    return out


def tanh_grad(y, dy, out):
    np.multiply(dy, 1 - y * y, out=out)
    return out


def softmax(x, out, axis=-1):
    np.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def log_softmax(x, out, axis=-1):
    np.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    out -= np.log(np.exp(out).sum(axis=axis, keepdims=True))
    return out


def softmax_grad(y, dy, out, axis=-1):
    np.multiply(y, dy - (dy * y).sum(axis=axis, keepdims=True), out=out)
    return out


def log_softmax_grad(y, dy, out, axis=-1):
    np.subtract(dy, np.exp(y) * dy.sum(axis=axis, keepdims=True), out=out)
    return out


def reshape(x, out):
    out[...] = x.reshape(out.shape)
    return out


flatten = reshape


def transpose(x, out, perm):
    out[...] = np.transpose(x, perm)
    return out


def _mix32(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def dropout_mask(shape, rate, seed, step):
    """Keep-mask from a counter-based hash of (seed, step, flat index): identical on every backend."""
    with np.errstate(over="ignore"):
        key = _mix32(np.uint32((int(seed) * 0x9E3779B9 + int(step)) & 0xFFFFFFFF))
        h = _mix32(np.arange(int(np.prod(shape)), dtype=np.uint32) ^ key)
    return (h.astype(np.uint64) >= np.uint64(int(rate * 2 ** 32))).reshape(shape)


def dropout(x, out, rate, seed, step):
    if rate == 0:
        out[...] = x
        return out
    keep = dropout_mask(x.shape, rate, seed, step)
    np.multiply(x, keep, out=out)
    out *= 1.0 / (1.0 - rate)
    return out


def dropout_grad(dy, out, rate, seed, step):
    return dropout(dy, out, rate, seed, step)


EPS = 1e-7


def _labels(labels, k):
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    return np.clip(y, 0, k - 1)


def sparse_categorical_crossentropy(p, labels, out, from_logits=False):
    n, k = p.shape
    y = _labels(labels, k)
    if from_logits:
        m = p.max(axis=1, keepdims=True)
        lse = np.log(np.exp(p - m).sum(axis=1)) + m[:, 0]
        out[...] = np.mean(lse - p[np.arange(n), y])
    else:
        q = np.clip(p, EPS, 1 - EPS)
        out[...] = np.mean(-np.log(q[np.arange(n), y] / q.sum(axis=1)))
    return out


def sparse_categorical_crossentropy_grad(p, labels, dloss, out, from_logits=False):
    n, k = p.shape
    y = _labels(labels, k)
    scale = np.asarray(dloss, dtype=out.dtype) / n
    if from_logits:
        softmax(p, out, axis=1)
        out[np.arange(n), y] -= 1
    else:
        q = np.clip(p, EPS, 1 - EPS)
        out[...] = 1.0 / q.sum(axis=1, keepdims=True)
        out[np.arange(n), y] -= 1.0 / q[np.arange(n), y]
        out *= (p > EPS) & (p < 1 - EPS)
    out *= scale
    return out


def categorical_crossentropy(p, y, out, from_logits=False):
    if from_logits:
        lsm = np.empty_like(p)
        log_softmax(p, lsm, axis=1)
        out[...] = np.mean(-(y * lsm).sum(axis=1))
    else:
        q = np.clip(p, EPS, 1 - EPS)
        out[...] = np.mean(-(y * np.log(q / q.sum(axis=1, keepdims=True))).sum(axis=1))
    return out


def categorical_crossentropy_grad(p, y, dloss, out, from_logits=False):
    n = p.shape[0]
    scale = np.asarray(dloss, dtype=out.dtype) / n
    ysum = y.sum(axis=1, keepdims=True)
    if from_logits:
        softmax(p, out, axis=1)
        out *= ysum
        out -= y
    else:
        q = np.clip(p, EPS, 1 - EPS)
        out[...] = ysum / q.sum(axis=1, keepdims=True) - y / q
        out *= (p > EPS) & (p < 1 - EPS)
    out *= scale
    return out


def mse(p, y, out):
    out[...] = np.mean(np.square(p - y))
    return out


def mse_grad(p, y, dloss, out):
    np.subtract(p, y, out=out)
    out *= 2.0 * np.asarray(dloss, dtype=out.dtype) / p.size
    return out


def sgd_update(w, g, velocity, lr, momentum=0.0, nesterov=False):
    if velocity is None or momentum == 0.0:
        w -= lr * g
        return w
    velocity *= momentum
    velocity -= lr * g
    if nesterov:
        w += momentum * velocity - lr * g
    else:
        w += velocity
    return w


def adam_update(w, g, m, v, t, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    t = float(t)
    alpha = lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
    m += (g - m) * (1 - beta_1)
    v += (g * g - v) * (1 - beta_2)
    w -= (alpha * m / (np.sqrt(v) + epsilon)).astype(w.dtype)
    return w
