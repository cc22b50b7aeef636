"""Elementwise, broadcasting, shape and activation ops, with their gradients."""
from __future__ import annotations

import numbers

import numpy as np

from ..types import IRError, TensorType
from . import REQUIRED, Op, emit, register


def broadcast_shapes(a: tuple, b: tuple, op: str) -> tuple:
    """NumPy broadcasting where None (the batch) matches None or 1."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise IRError(f"{op}: shapes {_fmt(a)} and {_fmt(b)} do not broadcast")
    return tuple(reversed(out))


def _fmt(shape):
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def _same_float(types, op):
    for t in types:
        if t.dtype != "f32":
            raise IRError(f"{op}: expects f32 inputs, got {t}")


class Unary(Op):
    inputs = ("x",)
    inplace = 0

    def infer(self, types, attrs):
        _same_float(types, self.name)
        return [types[0]]


class UnaryGrad(Op):
    """y, dy -> dx for an activation whose derivative is a function of its output y."""
    inputs = ("y", "dy")
    inplace = 1
    differentiable = False

    def infer(self, types, attrs):
        if types[0].shape != types[1].shape:
            raise IRError(f"{self.name}: y {types[0]} and dy {types[1]} differ")
        return [types[1]]


@register
class Relu(Unary):
    name = "relu"

    def grad(self, node, douts):
        return [emit("relu_grad", node.outputs[0], douts[0])]


@register
class Sigmoid(Unary):
    name = "sigmoid"

    def flops(self, node, batch):
        return 4 * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        return [emit("sigmoid_grad", node.outputs[0], douts[0])]


@register
class Tanh(Unary):
    name = "tanh"

    def flops(self, node, batch):
        return 4 * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        return [emit("tanh_grad", node.outputs[0], douts[0])]


@register
class ReluGrad(UnaryGrad):
    name = "relu_grad"


@register
class SigmoidGrad(UnaryGrad):
    name = "sigmoid_grad"


@register
class TanhGrad(UnaryGrad):
    name = "tanh_grad"


ACTIVATION_GRAD = {"relu": "relu_grad", "sigmoid": "sigmoid_grad", "tanh": "tanh_grad"}


def activation_grad(activation: str, y, dy):
    """Gradient through a (possibly fused) activation, given its output y."""
    return dy if activation == "linear" else emit(ACTIVATION_GRAD[activation], y, dy)


class AxisOp(Op):
    attrs = {"axis": -1}

    def normalize(self, types, attrs):
        r = types[0].rank
        ax = attrs["axis"]
        if not isinstance(ax, numbers.Integral) or isinstance(ax, bool):
            raise IRError(f"{self.name}: axis must be an int, got {ax!r}")
        ax = int(ax)
        if not -r <= ax < r:
            raise IRError(f"{self.name}: axis {ax} out of range for rank {r}")
        if (ax % r) == 0 and types[0].batched:
            raise IRError(f"{self.name}: cannot normalize over the batch axis")
        return {"axis": ax % r}


@register
class Softmax(AxisOp, Unary):
    name = "softmax"
    inplace = None

    def flops(self, node, batch):
        return 5 * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        return [emit("softmax_grad", node.outputs[0], douts[0], axis=node.attrs["axis"])]


@register
class LogSoftmax(AxisOp, Unary):
    name = "log_softmax"
    inplace = None

    def flops(self, node, batch):
        return 5 * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        return [emit("log_softmax_grad", node.outputs[0], douts[0], axis=node.attrs["axis"])]


@register
class SoftmaxGrad(AxisOp, UnaryGrad):
    name = "softmax_grad"
    inplace = None


@register
class LogSoftmaxGrad(AxisOp, UnaryGrad):
    name = "log_softmax_grad"
    inplace = None


class Binary(Op):
    inputs = ("a", "b")

    def infer(self, types, attrs):
        _same_float(types, self.name)
        return [TensorType(broadcast_shapes(types[0].shape, types[1].shape, self.name))]

    inplace = 0   # the output may reuse `a` when `a` is not broadcast (checked by the planner)


def sum_to(dy, like):
    """Reduce a broadcast gradient back to `like`'s shape (no-op when shapes agree)."""
    if dy.shape == like.shape:
        return dy
    return emit("sum_to", dy, shape=like.shape)


@register
class Add(Binary):
    name = "add"

    def grad(self, node, douts):
        a, b = node.inputs
        return [sum_to(douts[0], a), sum_to(douts[0], b)]


@register
class Sub(Binary):
    name = "sub"

    def grad(self, node, douts):
        a, b = node.inputs
        return [sum_to(douts[0], a), sum_to(emit("neg", douts[0]), b)]


@register
class Mul(Binary):
    name = "mul"

    def grad(self, node, douts):
        a, b = node.inputs
        dy = douts[0]
        return [sum_to(emit("mul", dy, b), a), sum_to(emit("mul", dy, a), b)]


@register
class Neg(Unary):
    name = "neg"

    def grad(self, node, douts):
        return [emit("neg", douts[0])]


@register
class Scale(Unary):
    """y = x * factor (a compile-time scalar)."""
    name = "scale"
    attrs = {"factor": REQUIRED}

    def normalize(self, types, attrs):
        return {"factor": float(attrs["factor"])}

    def grad(self, node, douts):
        return [emit("scale", douts[0], factor=node.attrs["factor"])]


@register
class SumTo(Op):
    """Sum a tensor down to a broadcast-compatible smaller shape (the gradient of broadcasting)."""
    name = "sum_to"
    inputs = ("x",)
    attrs = {"shape": REQUIRED}
    differentiable = False

    def infer(self, types, attrs):
        shape = tuple(attrs["shape"])
        broadcast_shapes(shape, types[0].shape, self.name)
        if broadcast_shapes(shape, types[0].shape, self.name) != types[0].shape:
            raise IRError(f"sum_to: {types[0]} does not broadcast from {_fmt(shape)}")
        return [TensorType(shape)]


@register
class BiasAdd(Op):
    """y = x + b, b broadcast over the last (channel) axis."""
    name = "bias_add"
    inputs = ("x", "b")
    inplace = 0

    def infer(self, types, attrs):
        x, b = types
        if b.rank != 1 or not x.shape or x.shape[-1] != b.shape[0]:
            raise IRError(f"bias_add: bias {b} must be 1-D with length = last dim of x {x}")
        return [x]

    def grad(self, node, douts):
        return [douts[0], emit("bias_add_grad", douts[0])]


@register
class BiasAddGrad(Op):
    name = "bias_add_grad"
    inputs = ("dy",)
    differentiable = False

    def infer(self, types, attrs):
        return [TensorType((types[0].shape[-1],))]


@register
class Reshape(Op):
    """Reshape; `shape` may hold one -1, and None (or -1 in front) for the batch dimension."""
    name = "reshape"
    inputs = ("x",)
    attrs = {"shape": REQUIRED}
    inplace = 0
    view = True

    def normalize(self, types, attrs):
        x = types[0]
        shape = [None if d is None else int(d) for d in attrs["shape"]]
        if x.batched and shape and shape[0] not in (None, -1):
            raise IRError(f"reshape: the batch dimension of {x} must stay first (use None), got {shape}")
        if x.batched:
            shape[0] = None
        rest = shape[1:] if x.batched else shape
        known = int(np.prod([d for d in rest if d != -1], dtype=np.int64))
        total = x.numel(1) if x.batched else x.numel()
        if rest.count(-1) > 1:
            raise IRError(f"reshape: at most one -1 in {shape}")
        if -1 in rest:
            if known == 0 or total % known:
                raise IRError(f"reshape: cannot reshape {x} to {shape}")
            rest[rest.index(-1)] = total // known
        elif known != total:
            raise IRError(f"reshape: {x} has {total} elements per sample, {shape} has {known}")
        return {"shape": tuple(([None] if x.batched else []) + rest)}

    def infer(self, types, attrs):
        return [TensorType(attrs["shape"], types[0].dtype)]

    def flops(self, node, batch):
        return 0

    def grad(self, node, douts):
        return [emit("reshape", douts[0], shape=node.inputs[0].shape)]


@register
class Flatten(Op):
    """(N, ...) -> (N, prod(...))."""
    name = "flatten"
    inputs = ("x",)
    inplace = 0
    view = True

    def infer(self, types, attrs):
        x = types[0]
        if x.rank < 1:
            raise IRError("flatten: needs at least a batch dimension")
        return [TensorType((x.shape[0], int(np.prod(x.shape[1:], dtype=np.int64))), x.dtype)]

    def flops(self, node, batch):
        return 0

    def grad(self, node, douts):
        return [emit("reshape", douts[0], shape=node.inputs[0].shape)]


@register
class Transpose(Op):
    name = "transpose"
    inputs = ("x",)
    attrs = {"perm": None}

    def normalize(self, types, attrs):
        r = types[0].rank
        perm = attrs["perm"]
        perm = tuple(reversed(range(r))) if perm is None else tuple(int(p) for p in perm)
        if sorted(perm) != list(range(r)):
            raise IRError(f"transpose: perm {perm} is not a permutation of 0..{r - 1}")
        if types[0].batched and perm[0] != 0:
            raise IRError(f"transpose: the dynamic batch dimension must stay first (perm {perm})")
        return {"perm": perm}

    def infer(self, types, attrs):
        return [TensorType(tuple(types[0].shape[p] for p in attrs["perm"]), types[0].dtype)]

    def flops(self, node, batch):
        return 0

    def grad(self, node, douts):
        inv = tuple(int(i) for i in np.argsort(node.attrs["perm"]))
        return [emit("transpose", douts[0], perm=inv)]


class DropoutBase(Op):
    """Inverted dropout with a counter-based mask: hash(seed, step, flat index) (see kernels)."""
    inputs = ("x", "step?")
    attrs = {"rate": REQUIRED, "seed": 0}
    inplace = 0

    def normalize(self, types, attrs):
        rate = float(attrs["rate"])
        if not 0.0 <= rate < 1.0:
            raise IRError(f"{self.name}: rate must be in [0, 1), got {rate}")
        if len(types) > 1 and types[1].shape != ():
            raise IRError(f"{self.name}: step must be a scalar, got {types[1]}")
        return {"rate": rate, "seed": int(attrs["seed"]) & 0xFFFFFFFF}

    def infer(self, types, attrs):
        return [types[0]]


@register
class Dropout(DropoutBase):
    name = "dropout"

    def grad(self, node, douts):
        return [emit("dropout_grad", douts[0], *node.inputs[1:], **node.attrs), None]


@register
class DropoutGrad(DropoutBase):
    name = "dropout_grad"
    differentiable = False
