"""Keras-style layers. Each layer turns an input value into an output value in a graph (via
ir.ops.emit) and declares its weights; the model owns the weight arrays."""
from __future__ import annotations

import numpy as np

from ir.ops import emit, pair
from ir.types import IRError

from .errors import LayerError

ACTIVATIONS = ("relu", "sigmoid", "tanh", "softmax", "linear")
FUSABLE = ("relu", "sigmoid", "tanh")


def check_activation(act, layer):
    if act is None:
        return "linear"
    if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
        raise LayerError(f"{layer}: unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    return act.lower()


def apply_activation(x, act):
    """Emit the activation as its own node; the fusion pass folds relu/sigmoid/tanh into conv/dense."""
    if act == "linear":
        return x
    if act == "softmax":
        return emit("softmax", x, axis=-1)
    return emit(act, x)


def glorot_uniform(rng, shape, fan_in, fan_out):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


class Layer:
    """Base layer: `weight_specs(input_shape)` -> {suffix: (shape, init)}, `call(ctx, x)` -> value."""
    kind = "layer"

    def __init__(self, name=None, input_shape=None):
        self.name = name
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def weight_specs(self, input_shape) -> dict:
        return {}

    def output_shape(self, input_shape):
        raise NotImplementedError

    def call(self, ctx, x):
        raise NotImplementedError

    def config(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("name", "input_shape")}

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"


class Input(Layer):
    """Declares the per-sample input shape, e.g. Input((28, 28, 1))."""
    kind = "input"

    def __init__(self, shape, name=None):
        try:
            shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        except (TypeError, ValueError):
            raise LayerError(f"Input: shape must be a tuple of ints (without the batch), got {shape!r}") from None
        if not shape or min(shape) < 1:
            raise LayerError(f"Input: shape must be non-empty positive ints, got {shape!r}")
        super().__init__(name, shape)
        self.shape = shape


class Conv2D(Layer):
    kind = "conv2d"

    def __init__(self, filters, kernel_size, strides=1, padding="valid", dilation_rate=1,
                 activation=None, use_bias=True, name=None, input_shape=None):
        super().__init__(name, input_shape)
        if not isinstance(filters, (int, np.integer)) or filters < 1:
            raise LayerError(f"Conv2D: filters must be a positive int, got {filters!r}")
        self.filters = int(filters)
        self.kernel_size = _pair(kernel_size, "kernel_size", "Conv2D")
        self.strides = _pair(strides, "strides", "Conv2D")
        self.dilation_rate = _pair(dilation_rate, "dilation_rate", "Conv2D")
        self.padding = _padding(padding, "Conv2D")
        self.activation = check_activation(activation, "Conv2D")
        self.use_bias = bool(use_bias)

    def weight_specs(self, s):
        kh, kw = self.kernel_size
        shape = (kh, kw, s[-1], self.filters)
        specs = {"kernel": (shape, lambda rng: glorot_uniform(rng, shape, kh * kw * s[-1], kh * kw * self.filters))}
        if self.use_bias:
            specs["bias"] = ((self.filters,), lambda rng: np.zeros(self.filters, np.float32))
        return specs

    def call(self, ctx, x):
        if x.type.rank != 4:
            raise LayerError(f"layer {self.name!r} (Conv2D) needs a 4-D input (batch, height, width, channels), "
                             f"got {_shape(x)}; reshape the input or add an Input((H, W, C)) layer")
        y = emit("conv2d", x, ctx.weight(self, "kernel"), stride=self.strides, padding=self.padding,
                 dilation=self.dilation_rate)
        if self.use_bias:
            y = emit("bias_add", y, ctx.weight(self, "bias"))
        return apply_activation(y, self.activation)


class Dense(Layer):
    kind = "dense"

    def __init__(self, units, activation=None, use_bias=True, name=None, input_shape=None):
        super().__init__(name, input_shape)
        if not isinstance(units, (int, np.integer)) or units < 1:
            raise LayerError(f"Dense: units must be a positive int, got {units!r}")
        self.units = int(units)
        self.activation = check_activation(activation, "Dense")
        self.use_bias = bool(use_bias)

    def weight_specs(self, s):
        shape = (s[-1], self.units)
        specs = {"kernel": (shape, lambda rng: glorot_uniform(rng, shape, s[-1], self.units))}
        if self.use_bias:
            specs["bias"] = ((self.units,), lambda rng: np.zeros(self.units, np.float32))
        return specs

    def call(self, ctx, x):
        if x.type.rank != 2:
            raise LayerError(f"layer {self.name!r} (Dense) needs a 2-D input (batch, features), got "
                             f"{_shape(x)}; add a Flatten() layer before it")
        y = emit("dense", x, ctx.weight(self, "kernel"))
        if self.use_bias:
            y = emit("bias_add", y, ctx.weight(self, "bias"))
        return apply_activation(y, self.activation)


class _Pool(Layer):
    op = ""

    def __init__(self, pool_size=2, strides=None, padding="valid", name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.pool_size = _pair(pool_size, "pool_size", type(self).__name__)
        self.strides = None if strides is None else _pair(strides, "strides", type(self).__name__)
        self.padding = _padding(padding, type(self).__name__)

    def call(self, ctx, x):
        if x.type.rank != 4:
            raise LayerError(f"layer {self.name!r} ({type(self).__name__}) needs a 4-D input, got {_shape(x)}")
        return emit(self.op, x, pool=self.pool_size, stride=self.strides, padding=self.padding)


class MaxPool2D(_Pool):
    kind = "max_pooling2d"
    op = "max_pool2d"


class AveragePool2D(_Pool):
    kind = "average_pooling2d"
    op = "avg_pool2d"


class GlobalAveragePooling2D(Layer):
    kind = "global_average_pooling2d"

    def call(self, ctx, x):
        return emit("global_avg_pool2d", x)


class Flatten(Layer):
    kind = "flatten"

    def call(self, ctx, x):
        return emit("flatten", x)


class Dropout(Layer):
    kind = "dropout"

    def __init__(self, rate, seed=None, name=None, input_shape=None):
        super().__init__(name, input_shape)
        if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise LayerError(f"Dropout: rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.seed = seed

    def call(self, ctx, x):
        if not ctx.training or self.rate == 0.0:
            return x
        seed = ctx.layer_seed(self) if self.seed is None else int(self.seed)
        return emit("dropout", x, ctx.step(), rate=self.rate, seed=seed)


class Activation(Layer):
    kind = "activation"

    def __init__(self, activation, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.activation = check_activation(activation, "Activation")

    def call(self, ctx, x):
        return apply_activation(x, self.activation)


class ReLU(Activation):
    kind = "re_lu"

    def __init__(self, name=None, input_shape=None):
        super().__init__("relu", name, input_shape)

    def config(self):
        return {}


class Softmax(Activation):
    kind = "softmax"

    def __init__(self, name=None, input_shape=None):
        super().__init__("softmax", name, input_shape)

    def config(self):
        return {}


class Reshape(Layer):
    kind = "reshape"

    def __init__(self, target_shape, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.target_shape = tuple(int(d) for d in target_shape)

    def call(self, ctx, x):
        return emit("reshape", x, shape=(None,) + self.target_shape)


MaxPooling2D = MaxPool2D
AveragePooling2D = AvgPool2D = AveragePool2D

LAYER_TYPES = {c.__name__: c for c in (Input, Conv2D, Dense, MaxPool2D, AveragePool2D, GlobalAveragePooling2D,
                                       Flatten, Dropout, Activation, ReLU, Softmax, Reshape)}


def _pair(v, what, layer):
    try:
        return pair(v, what, layer)
    except IRError as e:
        raise LayerError(str(e)) from None


def _padding(p, layer):
    if isinstance(p, str):
        if p.lower() not in ("valid", "same"):
            raise LayerError(f"{layer}: unknown padding {p!r}; use 'valid', 'same' or ((top, bottom), (left, right))")
        return p.lower()
    try:
        (t, b), (l, r) = p
        return ((int(t), int(b)), (int(l), int(r)))
    except (TypeError, ValueError):
        raise LayerError(f"{layer}: bad padding {p!r}; use 'valid', 'same' or ((top, bottom), (left, right))") from None


def _shape(v):
    return "(" + ", ".join("None" if d is None else str(d) for d in v.shape) + ")"


__all__ = list(LAYER_TYPES) + ["MaxPooling2D", "AveragePooling2D", "AvgPool2D", "Layer"]
