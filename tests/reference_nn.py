"""Independent float64 NumPy references for layer tests (naive loops / direct formulas, no graphcnn code)."""
import numpy as np


def same_pads(size, k, stride, dilation=1):
    """TensorFlow SAME padding (odd extra at the end)."""
    extent = (k - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def pad_input(x, padding, kh, kw, stride, dilation):
    if padding == "valid":
        return x
    if padding == "same":
        (t, b), (l, r) = same_pads(x.shape[1], kh, stride[0], dilation[0]), same_pads(x.shape[2], kw, stride[1], dilation[1])
    else:
        (t, b), (l, r) = padding
    return np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))


def conv2d(x, w, b=None, stride=(1, 1), padding="valid", dilation=(1, 1), groups=1):
    """x (N,H,W,C), w (kh,kw,C//groups,F) -> (N,OH,OW,F), float64 loops over output pixels."""
    x = pad_input(np.asarray(x, np.float64), padding, w.shape[0], w.shape[1], stride, dilation)
    w = np.asarray(w, np.float64)
    n, h, wd, c = x.shape
    kh, kw, cg, f = w.shape
    oh = (h - (kh - 1) * dilation[0] - 1) // stride[0] + 1
    ow = (wd - (kw - 1) * dilation[1] - 1) // stride[1] + 1
    fg = f // groups
    out = np.zeros((n, oh, ow, f))
    for i in range(oh):
        for j in range(ow):
            for di in range(kh):
                for dj in range(kw):
                    patch = x[:, i * stride[0] + di * dilation[0], j * stride[1] + dj * dilation[1], :]
                    for g in range(groups):
                        out[:, i, j, g * fg:(g + 1) * fg] += patch[:, g * cg:(g + 1) * cg] @ w[di, dj, :, g * fg:(g + 1) * fg]
    return out if b is None else out + b


def depthwise_conv2d(x, w, stride=(1, 1), padding="valid", dilation=(1, 1)):
    """w (kh,kw,C,M) -> output channel c*M + m."""
    kh, kw, c, m = w.shape
    outs = [conv2d(x[..., ci:ci + 1], w[:, :, ci:ci + 1, :], None, stride, padding, dilation) for ci in range(c)]
    return np.concatenate(outs, axis=-1)


def relu(x):
    return np.maximum(x, 0.0)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def batch_norm(x, gamma, beta, mean, var, eps):
    return (x - mean) / np.sqrt(var + eps) * gamma + beta
