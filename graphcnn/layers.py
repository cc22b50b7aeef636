"""Keras-style layers. Each layer turns input value(s) into an output value in a graph (via
ir.ops.emit or gc.ops) and declares its weights (`weight_specs`); the model owns the weight arrays.

Layers are callable on symbolic tensors (the functional API, graphcnn/functional.py) and can be listed in
a Sequential. `call(ctx, x)` gets one ir Value, or a list of them for merge layers; `ctx` gives the
layer's weights, whether the graph is for training, the step counter and a per-layer seed, and collects
state updates (BatchNormalization's moving statistics)."""
from __future__ import annotations

import numpy as np

from ir.ops import activations as activation_table
from ir.ops import emit, pair
from ir.types import IRError

from . import ops as gops
from .errors import LayerError
from .functional import LayerNode, WeightSpec, call_layer, describe

# the activation table's names (ir/ops/activations.py), plus softmax (not elementwise: never fused)
ACTIVATIONS = activation_table.NAMES + ("softmax",)


def check_activation(act, layer):
    if act is None:
        return "linear"
    if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
        raise LayerError(f"{layer}: unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    return act.lower()


def apply_activation(x, act):
    """Emit the activation as its own node (table defaults for its parameters); the fusion pass folds
    every table activation into conv/dense."""
    if act == "linear":
        return x
    if act == "softmax":
        return emit("softmax", x, axis=-1)
    return emit(act, x)


def glorot_uniform(rng, shape, fan_in, fan_out):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def glorot_kernel(shape):
    """WeightSpec of a Glorot-uniform kernel with Keras's fans: receptive field x the last two dims
    (conv (kh, kw, in, out): in*kh*kw / out*kh*kw; depthwise (kh, kw, C, mult): C*kh*kw / mult*kh*kw)."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    return WeightSpec(shape, lambda rng: glorot_uniform(rng, shape, fan_in, fan_out))


def constant_weight(shape, value, trainable=True):
    return WeightSpec(shape, lambda rng: np.full(shape, value, np.float32), trainable)


class Layer:
    """Base layer: `weight_specs(input_shape)` -> {suffix: WeightSpec}, `call(ctx, x)` -> value.
    Calling a layer on symbolic tensors records it in a layer graph (see gc.Model)."""
    kind = "layer"

    def __init__(self, name=None, input_shape=None):
        if name is not None and (not isinstance(name, str) or not name.replace("_", "a").isalnum()):
            raise LayerError(f"{type(self).__name__}: name must be letters, digits and '_', got {name!r}")
        self.name = name
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def __call__(self, inputs):
        """The functional API: layer(tensor) or layer([tensors]) -> a new symbolic tensor."""
        return call_layer(self, inputs)

    def weight_specs(self, input_shape) -> dict:
        return {}

    def call(self, ctx, x):
        raise NotImplementedError

    def config(self) -> dict:
        """Constructor arguments (JSON-able) that rebuild this layer; `_`-prefixed attributes are state."""
        return {k: v for k, v in vars(self).items() if k not in ("name", "input_shape") and not k.startswith("_")}

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"


class Input(Layer):
    """Declares the per-sample input shape, e.g. Input((28, 28, 1)). Usable as the first layer of a
    Sequential and as the input tensor of the functional API (layers are called on it)."""
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
        self._node = LayerNode(self, [], False, (None,) + shape)

    @property
    def output(self):
        """The symbolic tensor this Input stands for (batch dimension None)."""
        return self._node.output

    def config(self):
        return {"shape": list(self.shape)}


def _check_rank(layer, x, ranks, what, fix):
    if x.type.rank not in ranks:
        raise LayerError(f"{describe(layer)} needs {what}, got {_shape(x)}; {fix}")


class Conv2D(Layer):
    kind = "conv2d"

    def __init__(self, filters, kernel_size, strides=1, padding="valid", dilation_rate=1, groups=1,
                 activation=None, use_bias=True, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.filters = _positive_int(filters, "filters", "Conv2D")
        self.kernel_size = _pair(kernel_size, "kernel_size", "Conv2D")
        self.strides = _pair(strides, "strides", "Conv2D")
        self.dilation_rate = _pair(dilation_rate, "dilation_rate", "Conv2D")
        self.groups = _positive_int(groups, "groups", "Conv2D")
        if self.filters % self.groups:
            raise LayerError(f"Conv2D: filters ({self.filters}) must be divisible by groups ({self.groups})")
        self.padding = _padding(padding, "Conv2D")
        self.activation = check_activation(activation, "Conv2D")
        self.use_bias = bool(use_bias)

    def weight_specs(self, s):
        if s[-1] % self.groups:
            raise LayerError(f"{describe(self)}: groups={self.groups} does not divide the {s[-1]} input channels; "
                             f"choose groups dividing both the input channels and filters ({self.filters})")
        kh, kw = self.kernel_size
        specs = {"kernel": glorot_kernel((kh, kw, s[-1] // self.groups, self.filters))}
        if self.use_bias:
            specs["bias"] = constant_weight((self.filters,), 0.0)
        return specs

    def call(self, ctx, x):
        _check_rank(self, x, (4,), "a 4-D input (batch, height, width, channels)",
                    "reshape the input or add an Input((H, W, C)) layer")
        groups = {"groups": self.groups} if self.groups != 1 else {}
        y = emit("conv2d", x, ctx.weight(self, "kernel"), stride=self.strides, padding=self.padding,
                 dilation=self.dilation_rate, **groups)
        if self.use_bias:
            y = emit("bias_add", y, ctx.weight(self, "bias"))
        return apply_activation(y, self.activation)


class DepthwiseConv2D(Layer):
    """Per-channel convolution; output channel c*depth_multiplier + m (TF/Keras order)."""
    kind = "depthwise_conv2d"

    def __init__(self, kernel_size, strides=1, padding="valid", depth_multiplier=1, dilation_rate=1,
                 activation=None, use_bias=True, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.kernel_size = _pair(kernel_size, "kernel_size", "DepthwiseConv2D")
        self.strides = _pair(strides, "strides", "DepthwiseConv2D")
        self.padding = _padding(padding, "DepthwiseConv2D")
        self.depth_multiplier = _positive_int(depth_multiplier, "depth_multiplier", "DepthwiseConv2D")
        self.dilation_rate = _pair(dilation_rate, "dilation_rate", "DepthwiseConv2D")
        self.activation = check_activation(activation, "DepthwiseConv2D")
        self.use_bias = bool(use_bias)

    def weight_specs(self, s):
        kh, kw = self.kernel_size
        specs = {"depthwise_kernel": glorot_kernel((kh, kw, s[-1], self.depth_multiplier))}
        if self.use_bias:
            specs["bias"] = constant_weight((s[-1] * self.depth_multiplier,), 0.0)
        return specs

    def depthwise(self, ctx, x):
        _check_rank(self, x, (4,), "a 4-D input (batch, height, width, channels)", "reshape the input first")
        return gops.depthwise_conv2d(x, ctx.weight(self, "depthwise_kernel"), stride=self.strides,
                                     padding=self.padding, dilation=self.dilation_rate)

    def call(self, ctx, x):
        y = self.depthwise(ctx, x)
        if self.use_bias:
            y = emit("bias_add", y, ctx.weight(self, "bias"))
        return apply_activation(y, self.activation)


class SeparableConv2D(DepthwiseConv2D):
    """Depthwise convolution (no bias) followed by a 1x1 convolution to `filters` (+ bias, activation)."""
    kind = "separable_conv2d"

    def __init__(self, filters, kernel_size, strides=1, padding="valid", depth_multiplier=1, dilation_rate=1,
                 activation=None, use_bias=True, name=None, input_shape=None):
        super().__init__(kernel_size, strides, padding, depth_multiplier, dilation_rate, activation, use_bias,
                         name, input_shape)
        self.filters = _positive_int(filters, "filters", "SeparableConv2D")

    def weight_specs(self, s):
        kh, kw = self.kernel_size
        specs = {"depthwise_kernel": glorot_kernel((kh, kw, s[-1], self.depth_multiplier)),
                 "pointwise_kernel": glorot_kernel((1, 1, s[-1] * self.depth_multiplier, self.filters))}
        if self.use_bias:
            specs["bias"] = constant_weight((self.filters,), 0.0)
        return specs

    def call(self, ctx, x):
        y = emit("conv2d", self.depthwise(ctx, x), ctx.weight(self, "pointwise_kernel"), stride=1, padding="valid")
        if self.use_bias:
            y = emit("bias_add", y, ctx.weight(self, "bias"))
        return apply_activation(y, self.activation)


class Dense(Layer):
    kind = "dense"

    def __init__(self, units, activation=None, use_bias=True, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.units = _positive_int(units, "units", "Dense")
        self.activation = check_activation(activation, "Dense")
        self.use_bias = bool(use_bias)

    def weight_specs(self, s):
        shape = (s[-1], self.units)
        specs = {"kernel": WeightSpec(shape, lambda rng: glorot_uniform(rng, shape, s[-1], self.units))}
        if self.use_bias:
            specs["bias"] = constant_weight((self.units,), 0.0)
        return specs

    def call(self, ctx, x):
        if x.type.rank != 2:
            raise LayerError(f"layer {self.name!r} (Dense) needs a 2-D input (batch, features), got "
                             f"{_shape(x)}; add a Flatten() layer before it")
        y = emit("dense", x, ctx.weight(self, "kernel"))
        if self.use_bias:
            y = emit("bias_add", y, ctx.weight(self, "bias"))
        return apply_activation(y, self.activation)


class BatchNormalization(Layer):
    """Keras BatchNormalization over the last axis: batch statistics while training (and the moving
    statistics updated as momentum*old + (1-momentum)*batch), moving statistics in inference."""
    kind = "batch_normalization"

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, name=None, input_shape=None):
        super().__init__(name, input_shape)
        if axis != -1:
            raise LayerError(f"BatchNormalization: only axis=-1 (channels last, NHWC) is supported, got axis={axis!r}")
        self.axis = -1
        self.momentum = _number(momentum, "momentum", "BatchNormalization", 0.0, 1.0)
        self.epsilon = _number(epsilon, "epsilon", "BatchNormalization", 0.0, None)
        if self.epsilon <= 0:
            raise LayerError(f"BatchNormalization: epsilon must be > 0, got {epsilon!r}")
        self.center, self.scale = bool(center), bool(scale)

    def weight_specs(self, s):
        c = (s[-1],)
        specs = {}
        if self.scale:
            specs["gamma"] = constant_weight(c, 1.0)
        if self.center:
            specs["beta"] = constant_weight(c, 0.0)
        specs["moving_mean"] = constant_weight(c, 0.0, trainable=False)
        specs["moving_variance"] = constant_weight(c, 1.0, trainable=False)
        return specs

    def call(self, ctx, x):
        _check_rank(self, x, (2, 3, 4), "an input (N, C), (N, L, C) or (N, H, W, C)",
                    "add a Flatten() or Reshape(...) layer before it")
        g, c = x.graph, x.shape[-1:]
        gamma = ctx.weight(self, "gamma") if self.scale else g.const(g.fresh_name("ones"), np.ones(c, np.float32))
        beta = ctx.weight(self, "beta") if self.center else g.const(g.fresh_name("zeros"), np.zeros(c, np.float32))
        mean, var = ctx.weight(self, "moving_mean"), ctx.weight(self, "moving_variance")
        if not ctx.training:
            return gops.batch_norm(x, gamma, beta, mean, var, epsilon=self.epsilon)
        y, batch_mean, batch_var = gops.batch_norm_train(x, gamma, beta, epsilon=self.epsilon)
        for moving, batch in ((mean, batch_mean), (var, batch_var)):
            ctx.add_update(moving, emit("add", emit("scale", moving, factor=self.momentum),
                                        emit("scale", batch, factor=1.0 - self.momentum)))
        return y


class _Merge(Layer):
    """Elementwise merge of two or more tensors of one shape (Add, Subtract, Multiply)."""
    op = ""
    arity = None

    def call(self, ctx, xs):
        xs = _merge_inputs(self, xs, self.arity)
        for v in xs[1:]:
            if v.shape != xs[0].shape:
                raise LayerError(f"{describe(self)}: inputs have shapes {[_shape(v) for v in xs]}; all must be equal "
                                 f"(give the shortcut branch the same shape, e.g. a 1x1 Conv2D with strides)")
        y = xs[0]
        for v in xs[1:]:
            y = emit(self.op, y, v)
        return y


class Add(_Merge):
    kind = "add"
    op = "add"


class Subtract(_Merge):
    kind = "subtract"
    op = "sub"
    arity = 2


class Multiply(_Merge):
    kind = "multiply"
    op = "mul"


class Concatenate(Layer):
    """Join tensors along `axis` (counted with the batch as axis 0, like Keras; -1 = channels)."""
    kind = "concatenate"

    def __init__(self, axis=-1, name=None, input_shape=None):
        super().__init__(name, input_shape)
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or axis == 0:
            raise LayerError(f"Concatenate: axis must be a non-batch axis (an int other than 0), got {axis!r}")
        self.axis = int(axis)

    def call(self, ctx, xs):
        xs = _merge_inputs(self, xs, None)
        rank = xs[0].type.rank
        axis = self.axis + rank if self.axis < 0 else self.axis
        if not 1 <= axis < rank or any(v.type.rank != rank for v in xs):
            raise LayerError(f"{describe(self)}: axis {self.axis} does not fit inputs {[_shape(v) for v in xs]} "
                             f"(all inputs need one rank and a non-batch axis)")
        rest = {tuple(d for i, d in enumerate(v.shape) if i != axis) for v in xs}
        if len(rest) != 1:
            raise LayerError(f"{describe(self)}: inputs {[_shape(v) for v in xs]} differ outside the concatenation "
                             f"axis {self.axis}; make the other dimensions equal (e.g. same padding and strides)")
        return gops.concat(xs, axis=axis)


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


class GlobalMaxPooling2D(Layer):
    kind = "global_max_pooling2d"

    def call(self, ctx, x):
        _check_rank(self, x, (4,), "a 4-D input (batch, height, width, channels)", "use it after a convolution")
        return gops.global_max_pool2d(x)


class ZeroPadding2D(Layer):
    """Zero rows/columns around the image: padding int, (h, w) or ((top, bottom), (left, right))."""
    kind = "zero_padding2d"

    def __init__(self, padding=(1, 1), name=None, input_shape=None):
        super().__init__(name, input_shape)
        try:
            if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
                p = ((int(padding),) * 2,) * 2
            elif all(isinstance(v, (int, np.integer)) for v in padding):
                h, w = padding
                p = ((int(h), int(h)), (int(w), int(w)))
            else:
                (t, b), (l, r) = padding
                p = ((int(t), int(b)), (int(l), int(r)))
        except (TypeError, ValueError):
            raise LayerError(f"ZeroPadding2D: padding must be an int, (h, w) or ((top, bottom), (left, right)), "
                             f"got {padding!r}") from None
        if min(min(p[0]), min(p[1])) < 0:
            raise LayerError(f"ZeroPadding2D: padding must be >= 0, got {padding!r}")
        self.padding = p

    def call(self, ctx, x):
        _check_rank(self, x, (4,), "a 4-D input (batch, height, width, channels)", "reshape the input first")
        return gops.pad(x, padding=self.padding, value=0.0)


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


class RandomFlip(Layer):
    """Seeded random flips of each training image (identity in inference), Keras semantics."""
    kind = "random_flip"
    MODES = ("horizontal", "vertical", "horizontal_and_vertical")

    def __init__(self, mode="horizontal_and_vertical", seed=None, name=None, input_shape=None):
        super().__init__(name, input_shape)
        if mode not in self.MODES:
            raise LayerError(f"RandomFlip: mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode, self.seed = mode, seed

    def call(self, ctx, x):
        _check_rank(self, x, (4,), "a 4-D input (batch, height, width, channels)", "use it on images")
        if not ctx.training:
            return x
        seed = ctx.layer_seed(self) if self.seed is None else int(self.seed)
        return gops.random_flip(x, mode=self.mode, seed=seed, step=ctx.step())


class RandomTranslation(Layer):
    """Seeded random shifts of each training image by up to a fraction of its size (Keras semantics)."""
    kind = "random_translation"
    FILL_MODES = ("reflect", "wrap", "constant", "nearest")

    def __init__(self, height_factor, width_factor, fill_mode="reflect", interpolation="bilinear", seed=None,
                 fill_value=0.0, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.height_factor = _factor(height_factor, "height_factor")
        self.width_factor = _factor(width_factor, "width_factor")
        if fill_mode not in self.FILL_MODES or interpolation not in ("bilinear", "nearest"):
            raise LayerError(f"RandomTranslation: fill_mode must be one of {', '.join(self.FILL_MODES)} and "
                             f"interpolation 'bilinear' or 'nearest', got {fill_mode!r}, {interpolation!r}")
        self.fill_mode, self.interpolation = fill_mode, interpolation
        self.seed, self.fill_value = seed, _number(fill_value, "fill_value", "RandomTranslation", None, None)

    def call(self, ctx, x):
        _check_rank(self, x, (4,), "a 4-D input (batch, height, width, channels)", "use it on images")
        if not ctx.training:
            return x
        seed = ctx.layer_seed(self) if self.seed is None else int(self.seed)
        return gops.random_translation(x, self.height_factor, self.width_factor, fill_mode=self.fill_mode,
                                       interpolation=self.interpolation, fill_value=self.fill_value, seed=seed,
                                       step=ctx.step())


class Activation(Layer):
    kind = "activation"

    def __init__(self, activation, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.activation = check_activation(activation, "Activation")

    def call(self, ctx, x):
        return apply_activation(x, self.activation)


class ReLU(Layer):
    """Keras ReLU: max(x, 0), slope `negative_slope` below 0, capped at `max_value` (ReLU(6.0) = relu6)."""
    kind = "re_lu"

    def __init__(self, max_value=None, negative_slope=0.0, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.max_value = None if max_value is None else _number(max_value, "max_value", "ReLU", 0.0, None)
        self.negative_slope = _number(negative_slope, "negative_slope", "ReLU", 0.0, None)

    def call(self, ctx, x):
        if self.negative_slope == 0.0:
            return emit("relu", x) if self.max_value is None else gops.clip(x, min_value=0.0, max_value=self.max_value)
        y = gops.leaky_relu(x, alpha=self.negative_slope)
        return y if self.max_value is None else gops.clip(y, min_value=None, max_value=self.max_value)


class LeakyReLU(Layer):
    """x for x >= 0, negative_slope * x below (Keras default 0.3)."""
    kind = "leaky_re_lu"

    def __init__(self, negative_slope=0.3, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.negative_slope = _number(negative_slope, "negative_slope", "LeakyReLU", 0.0, None)

    def call(self, ctx, x):
        return gops.leaky_relu(x, alpha=self.negative_slope)


class Softmax(Activation):
    kind = "softmax"

    def __init__(self, name=None, input_shape=None):
        super().__init__("softmax", name, input_shape)

    def config(self):
        return {}


class Rescaling(Layer):
    """x * scale + offset (e.g. Rescaling(1/255) for uint8 images)."""
    kind = "rescaling"

    def __init__(self, scale, offset=0.0, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.scale = _number(scale, "scale", "Rescaling", None, None)
        self.offset = _number(offset, "offset", "Rescaling", None, None)

    def call(self, ctx, x):
        y = emit("scale", x, factor=self.scale)
        if self.offset != 0.0:
            g = x.graph
            y = emit("add", y, g.const(g.fresh_name("offset"), np.float32(self.offset)))
        return y


class Identity(Layer):
    kind = "identity"

    def call(self, ctx, x):
        return x


class Reshape(Layer):
    kind = "reshape"

    def __init__(self, target_shape, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.target_shape = tuple(int(d) for d in target_shape)

    def call(self, ctx, x):
        return emit("reshape", x, shape=(None,) + self.target_shape)


MaxPooling2D = MaxPool2D
AveragePooling2D = AvgPool2D = AveragePool2D

LAYER_TYPES = {c.__name__: c for c in (
    Input, Conv2D, DepthwiseConv2D, SeparableConv2D, Dense, BatchNormalization, Add, Subtract, Multiply,
    Concatenate, MaxPool2D, AveragePool2D, GlobalAveragePooling2D, GlobalMaxPooling2D, ZeroPadding2D, Flatten,
    Dropout, RandomFlip, RandomTranslation, Activation, ReLU, LeakyReLU, Softmax, Rescaling, Identity, Reshape)}


def _merge_inputs(layer, xs, arity):
    if not isinstance(xs, list) or len(xs) < 2 or (arity and len(xs) != arity):
        want = f"exactly {arity}" if arity else "a list of at least 2"
        got = f"{len(xs)} tensors" if isinstance(xs, list) else "one tensor"
        raise LayerError(f"{describe(layer)} needs {want} tensors, got {got}: call it as {type(layer).__name__}()([a, b])")
    return xs


def _factor(f, what):
    """RandomTranslation's factor: f (= (-f, f)) or (lower, upper), fractions of the size in [-1, 1]."""
    lo, hi = (-f, f) if isinstance(f, (int, float, np.number)) and not isinstance(f, bool) else \
        (f if isinstance(f, (tuple, list)) and len(f) == 2 else (None, None))
    lo = _number(lo, what, "RandomTranslation", -1.0, 1.0) if lo is not None else None
    hi = _number(hi, what, "RandomTranslation", -1.0, 1.0) if hi is not None else None
    if lo is None or hi is None or lo > hi:
        raise LayerError(f"RandomTranslation: {what} must be a number or (lower, upper) in [-1, 1], got {f!r}")
    return f if not isinstance(f, (tuple, list)) else [lo, hi]


def _positive_int(v, what, layer):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise LayerError(f"{layer}: {what} must be a positive int, got {v!r}")
    return int(v)


def _number(v, what, layer, lo, hi):
    """A finite float in [lo, hi] (None = unbounded on that side); errors name the layer and argument."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v) \
            or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise LayerError(f"{layer}: {what} must be a finite number{rng}, got {v!r}")
    return float(v)


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
