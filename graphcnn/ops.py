"""The functional op API (gc.ops): build graphs directly from values.

    g = gc.Graph("net"); x = g.input("x", (None, 28, 28, 1)); w = g.input("w", (3, 3, 1, 8))
    y = gc.ops.relu(gc.ops.conv2d(x, w, stride=1, padding="same"))
"""
from __future__ import annotations

from ir.ops import emit


def conv2d(x, w, b=None, stride=1, padding="valid", dilation=1, groups=1):
    """2-D convolution, NHWC input, HWIO kernel (kh, kw, in_ch // groups, out_ch); optional bias (a
    separate node the fuser folds in). groups > 1: grouped convolution (groups divides in_ch and out_ch)."""
    y = emit("conv2d", x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return y if b is None else emit("bias_add", y, b)


def depthwise_conv2d(x, w, b=None, stride=1, padding="valid", dilation=1):
    """Depthwise 2-D convolution: w (kh, kw, C, depth_multiplier), output channel c * multiplier + m
    (TF/Keras order); optional bias of C * multiplier (a separate node the fuser folds in)."""
    y = emit("depthwise_conv2d", x, w, stride=stride, padding=padding, dilation=dilation)
    return y if b is None else emit("bias_add", y, b)


def batch_norm(x, gamma, beta, mean, var, epsilon=1e-3):
    """Inference batch normalization, channels last: (x - mean) * gamma / sqrt(var + epsilon) + beta."""
    return emit("batch_norm", x, gamma, beta, mean, var, epsilon=epsilon)


def batch_norm_train(x, gamma, beta, epsilon=1e-3):
    """Training batch normalization with the batch's statistics over all axes but the last:
    returns (y, batch_mean, batch_var) (biased variance, as Keras; the statistics are not differentiated)."""
    return emit("batch_norm_train", x, gamma, beta, epsilon=epsilon)


def concat(values, axis=-1):
    """Concatenate a list of values along axis (not the batch axis of batched values)."""
    values = list(values)
    return emit("concat", *values, axis=axis)


def global_max_pool2d(x):
    """(N, H, W, C) -> (N, C): max over H and W (NaN propagates)."""
    return emit("global_max_pool2d", x)


def pad(x, padding=((1, 1), (1, 1)), value=0.0):
    """Constant padding of NHWC spatial axes: padding ((top, bottom), (left, right)), (ph, pw) or an int."""
    return emit("pad", x, padding=padding, value=value)


def reduce_sum(x, axis=None, keepdims=False):
    """Sum over axis (int, tuple or None = all)."""
    return emit("reduce_sum", x, axis=axis, keepdims=keepdims)


def reduce_mean(x, axis=None, keepdims=False):
    """Mean over axis (int, tuple or None = all)."""
    return emit("reduce_mean", x, axis=axis, keepdims=keepdims)


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


def leaky_relu(x, alpha=0.3):
    """x where x > 0, else alpha * x (alpha >= 0; Keras' LeakyReLU negative_slope)."""
    return emit("leaky_relu", x, alpha=alpha)


def clip(x, min_value=None, max_value=None):
    """x clamped to [min_value, max_value]; a None bound is no bound (relu6 = clip(x, 0, 6))."""
    return emit("clip", x, min_value=min_value, max_value=max_value)


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


# Losses: a scalar, sum_i sample_weight_i * loss_i / N (Keras' "sum_over_batch_size"; without
# sample_weight the mean). sample_weight is an optional (N,) value (class_weight: look it up per label).

def sparse_categorical_crossentropy(pred, labels, from_logits=False, sample_weight=None):
    return emit("sparse_categorical_crossentropy", pred, labels, sample_weight, from_logits=from_logits)


def categorical_crossentropy(pred, target, from_logits=False, sample_weight=None):
    return emit("categorical_crossentropy", pred, target, sample_weight, from_logits=from_logits)


def binary_crossentropy(pred, target, from_logits=False, sample_weight=None):
    """Keras binary_crossentropy: per element, probabilities clipped to [1e-7, 1 - 1e-7] (or logits);
    each sample's loss is the mean over its last axis."""
    return emit("binary_crossentropy", pred, target, sample_weight, from_logits=from_logits)


def mse(pred, target, sample_weight=None):
    return emit("mse", pred, target, sample_weight)


mean_squared_error = mse


def random_flip(x, mode="horizontal", seed=0, step=None):
    """Flip each image (N, H, W, C) with probability 1/2 (Keras's RandomFlip): mode "horizontal",
    "vertical" or "horizontal_and_vertical"; a pure function of (seed, step, image index). Training
    only: the inference pipeline removes it."""
    return emit("random_flip", x, step, mode=mode, seed=seed)


def random_translation(x, height_factor, width_factor, fill_mode="reflect", interpolation="bilinear", seed=0,
                       fill_value=0.0, step=None):
    """Shift each image (N, H, W, C) by a random fraction of its size (Keras's RandomTranslation): factors
    f or (lower, upper) in [-1, 1], fill_mode reflect|wrap|constant|nearest, interpolation
    bilinear|nearest; a pure function of (seed, step, image index). Training only, like dropout."""
    return emit("random_translation", x, step, height_factor=height_factor, width_factor=width_factor,
                fill_mode=fill_mode, interpolation=interpolation, seed=seed, fill_value=fill_value)
