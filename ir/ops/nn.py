"""Convolution, pooling, dense and matmul ops (NHWC activations, HWIO kernels), with gradients."""
from __future__ import annotations

from ..types import IRError, TensorType
from . import REQUIRED, Op, check_activation, emit, pair, register
from .elementwise import activation_grad


def resolve_padding(padding, in_hw, extent_hw, stride, op):
    """'valid' | 'same' (TensorFlow: odd extra pad at bottom/right) | int | (ph, pw) |
    ((top, bottom), (left, right)) -> ((top, bottom), (left, right))."""
    if isinstance(padding, str):
        p = padding.lower()
        if p == "valid":
            return ((0, 0), (0, 0))
        if p == "same":
            pads = []
            for size, ext, s in zip(in_hw, extent_hw, stride):
                out = -(-size // s)
                total = max((out - 1) * s + ext - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise IRError(f"{op}: unknown padding {padding!r}; use 'valid', 'same' or ((top, bottom), (left, right))")
    try:
        if isinstance(padding, int):
            return ((padding, padding), (padding, padding))
        a, b = padding
        if isinstance(a, int) and isinstance(b, int):
            pads = ((a, a), (b, b))
        else:
            pads = ((int(a[0]), int(a[1])), (int(b[0]), int(b[1])))
    except (TypeError, ValueError, IndexError):
        raise IRError(f"{op}: bad padding {padding!r}; use 'valid', 'same' or ((top, bottom), (left, right))") from None
    if min(pads[0] + pads[1]) < 0:
        raise IRError(f"{op}: padding must be >= 0, got {padding!r}")
    return pads


def window_out(in_hw, extent_hw, stride, pads, op, what):
    """Output spatial size of a sliding window; error if the window is larger than the padded input."""
    out = []
    for size, ext, s, (p0, p1) in zip(in_hw, extent_hw, stride, pads):
        padded = size + p0 + p1
        if ext > padded:
            raise IRError(f"{op}: {what} ({ext}) is larger than the padded input ({size} + {p0} + {p1}); "
                          f"use padding='same' or a smaller {what}")
        out.append((padded - ext) // s + 1)
    return tuple(out)


def _nhwc(t, op, what="x"):
    if t.rank != 4:
        raise IRError(f"{op}: {what} must be 4-D NHWC (batch, height, width, channels), got {t}")


class ConvBase(Op):
    attrs = {"stride": 1, "padding": "valid", "dilation": 1}

    def _geom(self, x_hw, k_hw, attrs):
        stride = pair(attrs["stride"], "stride", self.name)
        dil = pair(attrs["dilation"], "dilation", self.name)
        ext = tuple((k - 1) * d + 1 for k, d in zip(k_hw, dil))
        pads = resolve_padding(attrs["padding"], x_hw, ext, stride, self.name)
        out = window_out(x_hw, ext, stride, pads, self.name, f"kernel extent {tuple(k_hw)}")
        return stride, dil, pads, out


@register
class Conv2D(ConvBase):
    """y = act(conv(x, w) + b); x (N,H,W,C), w (KH,KW,C,F)."""
    name = "conv2d"
    inputs = ("x", "w", "b?")
    attrs = dict(ConvBase.attrs, activation="linear")

    def normalize(self, types, attrs):
        x, w = types[0], types[1]
        _nhwc(x, self.name)
        if w.rank != 4:
            raise IRError(f"conv2d: kernel must be 4-D HWIO (kh, kw, in_ch, out_ch), got {w}")
        if x.shape[3] != w.shape[2]:
            raise IRError(f"conv2d: input has {x.shape[3]} channels but the kernel expects {w.shape[2]} "
                          f"(x {x}, w {w})")
        if len(types) > 2 and types[2].shape != (w.shape[3],):
            raise IRError(f"conv2d: bias must have shape ({w.shape[3]},), got {types[2]}")
        stride, dil, pads, _ = self._geom(x.shape[1:3], w.shape[:2], attrs)
        return {"stride": stride, "padding": pads, "dilation": dil,
                "activation": check_activation(attrs["activation"], self.name)}

    def infer(self, types, attrs):
        x, w = types[0], types[1]
        *_, out = self._geom(x.shape[1:3], w.shape[:2], attrs)
        return [TensorType((x.shape[0],) + out + (w.shape[3],))]

    def flops(self, node, batch):
        kh, kw, c, _ = node.inputs[1].shape
        return 2 * kh * kw * c * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        x, w = node.inputs[:2]
        a = {k: node.attrs[k] for k in ("stride", "padding", "dilation")}
        dz = activation_grad(node.attrs["activation"], node.outputs[0], douts[0])
        dx = emit("conv2d_grad_input", dz, w, input_shape=x.shape[1:], **a)
        dw = emit("conv2d_grad_filter", x, dz, kernel_hw=w.shape[:2], **a)
        grads = [dx, dw]
        if len(node.inputs) > 2:
            grads.append(emit("bias_add_grad", dz))
        return grads


@register
class Conv2DGradInput(ConvBase):
    name = "conv2d_grad_input"
    inputs = ("dy", "w")
    attrs = dict(ConvBase.attrs, input_shape=REQUIRED)
    differentiable = False

    def normalize(self, types, attrs):
        dy, w = types
        _nhwc(dy, self.name, "dy")
        h, wd, c = (int(d) for d in attrs["input_shape"])
        stride, dil, pads, out = self._geom((h, wd), w.shape[:2], attrs)
        if out != dy.shape[1:3] or c != w.shape[2] or dy.shape[3] != w.shape[3]:
            raise IRError(f"conv2d_grad_input: dy {dy} does not match input {(h, wd, c)} and kernel {w}")
        return {"stride": stride, "padding": pads, "dilation": dil, "input_shape": (h, wd, c)}

    def infer(self, types, attrs):
        return [TensorType((types[0].shape[0],) + tuple(attrs["input_shape"]))]

    def flops(self, node, batch):
        kh, kw, c, _ = node.inputs[1].shape
        return 2 * kh * kw * c * node.inputs[0].type.numel(batch)


@register
class Conv2DGradFilter(ConvBase):
    name = "conv2d_grad_filter"
    inputs = ("x", "dy")
    attrs = dict(ConvBase.attrs, kernel_hw=REQUIRED)
    differentiable = False

    def normalize(self, types, attrs):
        x, dy = types
        _nhwc(x, self.name)
        _nhwc(dy, self.name, "dy")
        k = pair(attrs["kernel_hw"], "kernel_hw", self.name)
        stride, dil, pads, out = self._geom(x.shape[1:3], k, attrs)
        if out != dy.shape[1:3]:
            raise IRError(f"conv2d_grad_filter: dy {dy} does not match x {x} and kernel {k}")
        return {"stride": stride, "padding": pads, "dilation": dil, "kernel_hw": k}

    def infer(self, types, attrs):
        x, dy = types
        return [TensorType(tuple(attrs["kernel_hw"]) + (x.shape[3], dy.shape[3]))]

    def flops(self, node, batch):
        kh, kw = node.attrs["kernel_hw"]
        return 2 * kh * kw * node.inputs[0].shape[3] * node.inputs[1].type.numel(batch)


class PoolBase(Op):
    attrs = {"pool": 2, "stride": None, "padding": "valid"}

    def _geom(self, x_hw, attrs):
        pool = pair(attrs["pool"], "pool size", self.name)
        stride = pool if attrs["stride"] is None else pair(attrs["stride"], "stride", self.name)
        pads = resolve_padding(attrs["padding"], x_hw, pool, stride, self.name)
        if any(p >= k for p, k in zip((max(pads[0]), max(pads[1])), pool)):
            raise IRError(f"{self.name}: padding {pads} must be smaller than the pool window {pool}")
        out = window_out(x_hw, pool, stride, pads, self.name, f"pool window {pool}")
        return pool, stride, pads, out

    def normalize(self, types, attrs):
        x = types[0]
        _nhwc(x, self.name)
        pool, stride, pads, _ = self._geom(x.shape[1:3], attrs)
        return dict(attrs, pool=pool, stride=stride, padding=pads)

    def infer(self, types, attrs):
        x = types[0]
        *_, out = self._geom(x.shape[1:3], attrs)
        return [TensorType((x.shape[0],) + out + (x.shape[3],))]

    def flops(self, node, batch):
        ph, pw = node.attrs["pool"]
        return ph * pw * node.outputs[0].type.numel(batch)


@register
class MaxPool2D(PoolBase):
    name = "max_pool2d"
    inputs = ("x",)

    def grad(self, node, douts):
        return [emit("max_pool2d_grad", node.inputs[0], douts[0], **node.attrs)]


@register
class MaxPool2DGrad(PoolBase):
    name = "max_pool2d_grad"
    inputs = ("x", "dy")
    differentiable = False

    def infer(self, types, attrs):
        if super().infer(types[:1], attrs)[0] != types[1]:
            raise IRError(f"max_pool2d_grad: dy {types[1]} does not match the pool of x {types[0]}")
        return [types[0]]


@register
class AvgPool2D(PoolBase):
    name = "avg_pool2d"
    inputs = ("x",)
    attrs = dict(PoolBase.attrs, count_include_pad=False)

    def normalize(self, types, attrs):
        return dict(super().normalize(types, attrs), count_include_pad=bool(attrs["count_include_pad"]))

    def grad(self, node, douts):
        return [emit("avg_pool2d_grad", douts[0], input_shape=node.inputs[0].shape[1:], **node.attrs)]


@register
class AvgPool2DGrad(PoolBase):
    name = "avg_pool2d_grad"
    inputs = ("dy",)
    attrs = dict(AvgPool2D.attrs, input_shape=REQUIRED)
    differentiable = False

    def normalize(self, types, attrs):
        shape = tuple(int(d) for d in attrs["input_shape"])
        xt = TensorType((types[0].shape[0],) + shape)
        a = super().normalize([xt], attrs)
        if super().infer([xt], a)[0] != types[0]:
            raise IRError(f"avg_pool2d_grad: dy {types[0]} does not match input shape {shape}")
        return dict(a, input_shape=shape, count_include_pad=bool(attrs["count_include_pad"]))

    def infer(self, types, attrs):
        return [TensorType((types[0].shape[0],) + tuple(attrs["input_shape"]))]


@register
class GlobalAvgPool2D(Op):
    name = "global_avg_pool2d"
    inputs = ("x",)

    def infer(self, types, attrs):
        _nhwc(types[0], self.name)
        return [TensorType((types[0].shape[0], types[0].shape[3]))]

    def flops(self, node, batch):
        return node.inputs[0].type.numel(batch)

    def grad(self, node, douts):
        return [emit("global_avg_pool2d_grad", douts[0], input_shape=node.inputs[0].shape[1:])]


@register
class GlobalAvgPool2DGrad(Op):
    name = "global_avg_pool2d_grad"
    inputs = ("dy",)
    attrs = {"input_shape": REQUIRED}
    differentiable = False

    def normalize(self, types, attrs):
        shape = tuple(int(d) for d in attrs["input_shape"])
        if len(shape) != 3 or types[0].rank != 2 or types[0].shape[1] != shape[2]:
            raise IRError(f"global_avg_pool2d_grad: dy {types[0]} does not match input shape {shape}")
        return {"input_shape": shape}

    def infer(self, types, attrs):
        return [TensorType((types[0].shape[0],) + tuple(attrs["input_shape"]))]


@register
class Dense(Op):
    """y = act(x @ w + b); x (N,K), w (K,M)."""
    name = "dense"
    inputs = ("x", "w", "b?")
    attrs = {"activation": "linear"}

    def normalize(self, types, attrs):
        x, w = types[0], types[1]
        if x.rank != 2:
            raise IRError(f"dense: input must be 2-D (batch, features), got {x}; add a Flatten first")
        if w.rank != 2 or w.shape[0] != x.shape[1]:
            raise IRError(f"dense: kernel {w} does not match input {x}: expected ({x.shape[1]}, units)")
        if len(types) > 2 and types[2].shape != (w.shape[1],):
            raise IRError(f"dense: bias must have shape ({w.shape[1]},), got {types[2]}")
        return {"activation": check_activation(attrs["activation"], self.name)}

    def infer(self, types, attrs):
        return [TensorType((types[0].shape[0], types[1].shape[1]))]

    def flops(self, node, batch):
        return 2 * node.inputs[1].shape[0] * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        x, w = node.inputs[:2]
        dz = activation_grad(node.attrs["activation"], node.outputs[0], douts[0])
        grads = [emit("matmul", dz, w, transpose_b=True), emit("matmul", x, dz, transpose_a=True)]
        if len(node.inputs) > 2:
            grads.append(emit("bias_add_grad", dz))
        return grads


@register
class MatMul(Op):
    """2-D matrix product with optional transposes of either operand."""
    name = "matmul"
    inputs = ("a", "b")
    attrs = {"transpose_a": False, "transpose_b": False}

    def normalize(self, types, attrs):
        a, b = types
        if a.rank != 2 or b.rank != 2:
            raise IRError(f"matmul: operands must be 2-D, got {a} and {b}")
        ta, tb = bool(attrs["transpose_a"]), bool(attrs["transpose_b"])
        ka = a.shape[0] if ta else a.shape[1]
        kb = b.shape[1] if tb else b.shape[0]
        if ka != kb:
            raise IRError(f"matmul: inner dimensions differ: {a}{'ᵀ' if ta else ''} @ {b}{'ᵀ' if tb else ''}")
        m = a.shape[1] if ta else a.shape[0]
        n = b.shape[0] if tb else b.shape[1]
        if n is None and m is not None or (m is None and n is None):
            raise IRError(f"matmul: only the first output dimension may be the dynamic batch ({a} @ {b})")
        return {"transpose_a": ta, "transpose_b": tb}

    def infer(self, types, attrs):
        a, b = types
        m = a.shape[1] if attrs["transpose_a"] else a.shape[0]
        n = b.shape[0] if attrs["transpose_b"] else b.shape[1]
        return [TensorType((m, n))]

    def flops(self, node, batch):
        a = node.inputs[0].type.concrete(batch)
        k = a[0] if node.attrs["transpose_a"] else a[1]
        return 2 * k * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        a, b = node.inputs
        dy = douts[0]
        ta, tb = node.attrs["transpose_a"], node.attrs["transpose_b"]
        mm = lambda x, y, tx=False, ty=False: emit("matmul", x, y, transpose_a=tx, transpose_b=ty)  # noqa: E731
        if not ta and not tb:
            return [mm(dy, b, ty=True), mm(a, dy, tx=True)]
        if not ta and tb:
            return [mm(dy, b), mm(dy, a, tx=True)]
        if ta and not tb:
            return [mm(b, dy, ty=True), mm(a, dy)]
        return [mm(b, dy, True, True), mm(dy, a, True, True)]
