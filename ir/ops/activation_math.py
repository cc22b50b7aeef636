"""NumPy implementations of the activation table's entries (ir/ops/activations.py): the NumPy backend's
activation kernels and the reference the tests compare the LLVM backend against.

`NAME(x, out, **params)` writes activation(x) into out; `NAME_grad(y, dy, out, **params)` writes
dy * slope(y), y the activation's OUTPUT. out may alias x (or dy). float32 in, float32 out; NaN maps to NaN.

Self-contained on purpose (imports only math and numpy): graphcnn's standalone NumPy modules paste this
file in front of backends/numpy/kernels.py, so it must not import from the package.
"""

import numpy as np

# the activations implemented here (the table in ir/ops/activations.py has one entry per name)
ACTIVATION_NAMES = ("linear", "relu", "sigmoid", "tanh", "leaky_relu", "clip")
__all__ = ["ACTIVATION_NAMES", "linear", "relu", "relu_grad", "sigmoid", "sigmoid_grad", "tanh", "tanh_grad",
           "leaky_relu", "leaky_relu_grad", "clip", "clip_grad"]


def linear(x, out):
    np.copyto(out, x)
    return out


def relu(x, out):
    return np.maximum(x, 0, out=out)


def relu_grad(y, dy, out):
    return np.multiply(dy, y > 0, out=out)


def sigmoid(x, out):
    # the LLVM builder's formula: e = exp(-|x|) in (0, 1] never overflows; s = 1/(1+e) for x >= 0 and
    # e*s for x < 0, accurate down to the denormals and exactly 0 at -inf (as IEEE 1/(1+exp(inf)))
    negative = x < 0                       # taken first: out may be x itself
    e = np.abs(x)
    np.negative(e, out=e)
    np.exp(e, out=e)
    np.add(e, 1, out=out)
    np.reciprocal(out, out=out)
    np.multiply(e, out, out=e)
    np.copyto(out, e, where=negative)
    return out


def sigmoid_grad(y, dy, out):
    slope = np.subtract(1, y)
    slope *= y
    return np.multiply(dy, slope, out=out)


def tanh(x, out):
    return np.tanh(x, out=out)


def tanh_grad(y, dy, out):
    slope = np.multiply(y, y)
    np.subtract(1, slope, out=slope)
    return np.multiply(dy, slope, out=out)


def leaky_relu(x, out, alpha):
    # x where x > 0, else alpha * x (NaN: the comparison is false, alpha * NaN = NaN)
    np.copyto(out, np.where(x > 0, x, x * np.float32(alpha)))
    return out


def leaky_relu_grad(y, dy, out, alpha):
    # y > 0 exactly where x > 0 (alpha >= 0): the slope is 1 there, alpha elsewhere
    return np.multiply(dy, np.where(y > 0, np.float32(1), np.float32(alpha)), out=out)


def clip(x, out, min_value, max_value):
    # np.maximum / np.minimum propagate NaN; a None bound is no bound
    if min_value is not None:
        x = np.maximum(x, np.float32(min_value), out=out)
    if max_value is not None:
        x = np.minimum(x, np.float32(max_value), out=out)
    if x is not out:
        np.copyto(out, x)
    return out


def _clip_inside(y, min_value, max_value):
    inside = np.ones(np.shape(y), bool)
    if min_value is not None:
        inside &= y > np.float32(min_value)
    if max_value is not None:
        inside &= y < np.float32(max_value)
    return inside


def clip_grad(y, dy, out, min_value, max_value):
    # slope 1 strictly inside the bounds (as relu6's), 0 on or beyond them
    return np.multiply(dy, _clip_inside(y, min_value, max_value), out=out)
