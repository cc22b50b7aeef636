"""Elementwise, broadcasting, shape and activation ops, with their gradients."""
from __future__ import annotations

import numbers

import numpy as np

from ..types import IRError, TensorType
from . import REQUIRED, Op, activations, emit, register


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


class Activation(Unary):
    """An elementwise activation from the activation table (ir/ops/activations.py); its parameters are
    its attributes. Subclasses are generated per table entry below."""
    spec: activations.ActivationSpec

    def normalize(self, types, attrs):
        return dict(self.spec.normalize(attrs, self.name))

    def flops(self, node, batch):
        return self.spec.flops * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        return [emit(self.spec.grad_op, node.outputs[0], douts[0], **node.attrs)]


class ActivationGrad(UnaryGrad):
    """dx = dy * slope(y) for a table activation, y its output; same attributes as the forward op."""
    spec: activations.ActivationSpec

    def normalize(self, types, attrs):
        return dict(self.spec.normalize(attrs, self.name))


def _register_activation(spec: activations.ActivationSpec) -> None:
    attrs = dict(spec.params)
    register(type(spec.name.title().replace("_", ""), (Activation,), {"name": spec.name, "spec": spec,
                                                                       "attrs": attrs}))
    register(type(spec.name.title().replace("_", "") + "Grad", (ActivationGrad,),
                  {"name": spec.grad_op, "spec": spec, "attrs": attrs}))


for _spec in activations.TABLE.values():
    if _spec.name != "linear":
        _register_activation(_spec)


def activation_grad(activation: str, params, y, dy):
    """Gradient through a (possibly fused) activation with parameters `params` ((name, value) pairs),
    given its output y."""
    spec = activations.get(activation, "activation_grad")
    return dy if spec.grad_op is None else emit(spec.grad_op, y, dy, **dict(params))


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

    def inplace_inputs(self) -> tuple:
        # either operand: the kernels read both before writing (so a residual add can overwrite the skip
        # value where it dies, whichever side it is on)
        return (0, 1)


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
class Div(Binary):
    """a / b with broadcasting (IEEE division: x/0 is ±inf, 0/0 NaN), for imported ONNX Div."""
    name = "div"
    inplace = 0

    def grad(self, node, douts):
        a, b = node.inputs
        da = emit("div", douts[0], b)
        return [sum_to(da, a), sum_to(emit("neg", emit("mul", da, node.outputs[0])), b)]


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

    def couples_batch(self, node):
        return node.inputs[0].type.batched and not node.outputs[0].type.batched


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

    def couples_batch(self, node):
        return node.inputs[0].type.batched


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
    identity_in_inference = True

    def grad(self, node, douts):
        return [emit("dropout_grad", douts[0], *node.inputs[1:], **node.attrs), None]


@register
class DropoutGrad(DropoutBase):
    name = "dropout_grad"
    differentiable = False


@register
class Rsqrt(Unary):
    """y = 1 / sqrt(x) (float32 sqrt then division: correctly rounded steps, the same in every backend)."""
    name = "rsqrt"

    def flops(self, node, batch):
        return 2 * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        y = node.outputs[0]
        # d/dx x^-1/2 = -1/2 y^3
        return [emit("mul", douts[0], emit("scale", emit("mul", y, emit("mul", y, y)), factor=-0.5))]


def _axis_index(axis, rank, op) -> int:
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise IRError(f"{op}: axis must be an int, got {axis!r}")
    if not -rank <= axis < rank:
        raise IRError(f"{op}: axis {axis} out of range for rank {rank}")
    return int(axis) % rank


@register
class Concat(Op):
    """Join tensors along one axis; all other dimensions must agree. A batched concat along the batch
    axis is refused: it would change the batch size (and couple samples)."""
    name = "concat"
    inputs = ("values",)          # variadic: one or more
    attrs = {"axis": -1}

    def check(self, ins, attrs):
        if len(ins) < 1:
            raise IRError("concat: needs at least one value")
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRError(f"concat: unknown attribute(s) {sorted(unknown)}; known: ['axis']")
        from . import _canon
        full = self.normalize([v.type for v in ins], {"axis": attrs.get("axis", -1)})
        return {k: _canon(v) for k, v in full.items()}

    def normalize(self, types, attrs):
        first = types[0]
        if first.rank < 1:
            raise IRError(f"concat: values must have rank >= 1, got {first}")
        ax = _axis_index(attrs["axis"], first.rank, self.name)
        for i, t in enumerate(types):
            if t.dtype != first.dtype or t.rank != first.rank or any(
                    a != b for k, (a, b) in enumerate(zip(t.shape, first.shape)) if k != ax):
                raise IRError(f"concat: value {i} {t} does not match value 0 {first} outside axis {ax}")
        if ax == 0 and first.batched:
            raise IRError("concat: cannot concatenate along the batch axis (axis 0) of batched values")
        return {"axis": ax}

    def infer(self, types, attrs):
        ax = attrs["axis"]
        shape = list(types[0].shape)
        shape[ax] = sum(t.shape[ax] for t in types)
        return [TensorType(tuple(shape), types[0].dtype)]

    def couples_batch(self, node) -> bool:
        return False

    def flops(self, node, batch):
        return 0

    def grad(self, node, douts):
        ax, start, grads = node.attrs["axis"], 0, []
        for v in node.inputs:
            stop = start + v.shape[ax]
            grads.append(emit("slice", douts[0], axis=ax, start=start, stop=stop))
            start = stop
        return grads


@register
class Slice(Op):
    """x[..., start:stop, ...] along one non-batch axis (a copy)."""
    name = "slice"
    inputs = ("x",)
    attrs = {"axis": REQUIRED, "start": REQUIRED, "stop": REQUIRED}

    def normalize(self, types, attrs):
        x = types[0]
        ax = _axis_index(attrs["axis"], x.rank, self.name)
        if ax == 0 and x.batched:
            raise IRError("slice: cannot slice the batch axis of a batched value")
        try:
            start, stop = int(attrs["start"]), int(attrs["stop"])
        except (TypeError, ValueError):
            raise IRError(f"slice: start and stop must be ints, got {attrs['start']!r}, {attrs['stop']!r}") from None
        if not 0 <= start < stop <= x.shape[ax]:
            raise IRError(f"slice: need 0 <= start < stop <= {x.shape[ax]} on axis {ax} of {x}, "
                          f"got [{start}, {stop})")
        return {"axis": ax, "start": start, "stop": stop}

    def infer(self, types, attrs):
        shape = list(types[0].shape)
        shape[attrs["axis"]] = attrs["stop"] - attrs["start"]
        return [TensorType(tuple(shape), types[0].dtype)]

    def flops(self, node, batch):
        return 0

    def grad(self, node, douts):
        a = node.attrs
        return [emit("slice_grad", douts[0], axis=a["axis"], start=a["start"], size=node.inputs[0].shape[a["axis"]])]


@register
class SliceGrad(Op):
    """The gradient of slice: dy placed at [start, start + len) along axis of a zero tensor of `size` there."""
    name = "slice_grad"
    inputs = ("dy",)
    attrs = {"axis": REQUIRED, "start": REQUIRED, "size": REQUIRED}
    differentiable = False

    def normalize(self, types, attrs):
        dy = types[0]
        ax = _axis_index(attrs["axis"], dy.rank, self.name)
        if ax == 0 and dy.batched:
            raise IRError("slice_grad: the batch axis cannot be sliced")
        try:
            start, size = int(attrs["start"]), int(attrs["size"])
        except (TypeError, ValueError):
            raise IRError(f"slice_grad: start and size must be ints, got {attrs['start']!r}, {attrs['size']!r}") from None
        if start < 0 or start + dy.shape[ax] > size:
            raise IRError(f"slice_grad: dy {dy} at offset {start} does not fit in {size} along axis {ax}")
        return {"axis": ax, "start": start, "size": size}

    def infer(self, types, attrs):
        shape = list(types[0].shape)
        shape[attrs["axis"]] = attrs["size"]
        return [TensorType(tuple(shape), types[0].dtype)]

    def flops(self, node, batch):
        return 0


def reduce_axes(axis, rank, op) -> tuple:
    """None -> every axis; an int or a tuple of ints -> sorted distinct non-negative axes."""
    if axis is None:
        return tuple(range(rank))
    axes = (axis,) if isinstance(axis, numbers.Integral) and not isinstance(axis, bool) else axis
    try:
        out = tuple(sorted({_axis_index(a, rank, op) for a in axes}))
    except TypeError:
        raise IRError(f"{op}: axis must be None, an int or a tuple of ints, got {axis!r}") from None
    if len(out) != len(tuple(axes)):
        raise IRError(f"{op}: repeated axis in {axis!r}")
    return out


def reduced_shape(shape, axes, keepdims) -> tuple:
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


class Reduce(Op):
    inputs = ("x",)
    attrs = {"axis": None, "keepdims": False}
    mean = False

    def normalize(self, types, attrs):
        if types[0].rank < 1:
            raise IRError(f"{self.name}: x must have rank >= 1, got {types[0]}")
        if not isinstance(attrs["keepdims"], (bool, np.bool_)):
            raise IRError(f"{self.name}: keepdims must be a bool, got {attrs['keepdims']!r}")
        return {"axis": reduce_axes(attrs["axis"], types[0].rank, self.name), "keepdims": bool(attrs["keepdims"])}

    def infer(self, types, attrs):
        _same_float(types, self.name)
        return [TensorType(reduced_shape(types[0].shape, attrs["axis"], attrs["keepdims"]))]

    def couples_batch(self, node) -> bool:
        return node.inputs[0].type.batched and 0 in node.attrs["axis"]

    def flops(self, node, batch):
        return node.inputs[0].type.numel(batch)

    def grad(self, node, douts):
        x = node.inputs[0]
        return [emit("reduce_grad", douts[0], shape=x.shape, axis=node.attrs["axis"], mean=self.mean)]


@register
class ReduceSum(Reduce):
    name = "reduce_sum"


@register
class ReduceMean(Reduce):
    name = "reduce_mean"
    mean = True


@register
class ReduceGrad(Op):
    """The gradient of reduce_sum / reduce_mean: dy broadcast back to `shape` over the reduced axes
    (divided by the number of reduced elements for a mean, the batch counted at run time)."""
    name = "reduce_grad"
    inputs = ("dy",)
    attrs = {"shape": REQUIRED, "axis": REQUIRED, "mean": False}
    differentiable = False

    def normalize(self, types, attrs):
        shape = tuple(None if d is None else int(d) for d in attrs["shape"])
        axes = reduce_axes(attrs["axis"], len(shape), self.name)
        dy = types[0].shape
        if dy not in (reduced_shape(shape, axes, True), reduced_shape(shape, axes, False)):
            raise IRError(f"{self.name}: dy {types[0]} is not {_fmt(shape)} reduced over axes {axes}")
        return {"shape": shape, "axis": axes, "mean": bool(attrs["mean"])}

    def infer(self, types, attrs):
        return [TensorType(tuple(attrs["shape"]))]

    def couples_batch(self, node) -> bool:
        return node.outputs[0].type.batched and 0 in node.attrs["axis"]
