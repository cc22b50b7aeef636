"""The functional op API (gc.ops): build graphs directly from values.

    g = gc.Graph("net"); x = g.input("x", (None, 28, 28, 1)); w = g.input("w", (3, 3, 1, 8))
    y = gc.ops.relu(gc.ops.conv2d(x, w, stride=1, padding="same"))
"""
from __future__ import annotations

from ir.ops import emit


def conv2d(x, w, b=None, stride=1, padding="valid", dilation=1):
    """2-D convolution, NHWC input, HWIO kernel; optional bias (a separate node the fuser folds in)."""
    y = emit("conv2d", x, w, stride=stride, padding=padding, dilation=dilation)
    return y if b is None else emit("bias_add", y, b)


def max_pool2d(x, pool=2, stride=None, padding="valid"):
    return emit("max_pool2d", x, pool=pool, stride=stride, padding=padding)


def avg_pool2d(x, pool=2, stride=None, padding="valid", count_include_pad=False):
    return emit("avg_pool2d", x, pool=pool, stride=stride, padding=padding, count_include_pad=count_include_pad)


def global_avg_pool2d(x):
    return emit("global_avg_pool2d", x)


def dense(x, w, b=None):
    """x @ w (+ b); x (N, in), w (in, out)."""
    y = emit("dense", x, w)
    return y if b is None else emit("bias_add", y, b)


def matmul(a, b, transpose_a=False, transpose_b=False):
    return emit("matmul", a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def add(a, b):
    return emit("add", a, b)


def sub(a, b):
    return emit("sub", a, b)


def mul(a, b):
    return emit("mul", a, b)


def relu(x):
    return emit("relu", x)


def sigmoid(x):
    return emit("sigmoid", x)


def tanh(x):
    return emit("tanh", x)


def softmax(x, axis=-1):
    return emit("softmax", x, axis=axis)


def log_softmax(x, axis=-1):
    return emit("log_softmax", x, axis=axis)


def flatten(x):
    return emit("flatten", x)


def reshape(x, shape):
    return emit("reshape", x, shape=shape)


def transpose(x, perm=None):
    return emit("transpose", x, perm=perm)


def dropout(x, rate, seed=0, step=None):
    """Inverted dropout; the mask is a pure function of (seed, step, element index)."""
    return emit("dropout", x, step, rate=rate, seed=seed) if step is not None else \
        emit("dropout", x, rate=rate, seed=seed)


def sparse_categorical_crossentropy(pred, labels, from_logits=False):
    return emit("sparse_categorical_crossentropy", pred, labels, from_logits=from_logits)


def categorical_crossentropy(pred, target, from_logits=False):
    return emit("categorical_crossentropy", pred, target, from_logits=from_logits)


def mse(pred, target):
    return emit("mse", pred, target)


mean_squared_error = mse
