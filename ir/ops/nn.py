"""Convolution, pooling, dense and matmul ops (NHWC activations, HWIO kernels), with gradients."""
from __future__ import annotations

import numbers

from ..types import IRError, TensorType
from . import REQUIRED, Op, check_activation, emit, get_op, pair, register
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


def window_out(in_hw, extent_hw, stride, pads, op, what, detail=""):
    """Output spatial size of a sliding window; error if the window (`what`: 'kernel', 'pool window') is
    larger than the padded input."""
    padded = tuple(size + p0 + p1 for size, (p0, p1) in zip(in_hw, pads))
    if any(ext > p for ext, p in zip(extent_hw, padded)):
        raise IRError(f"{op}: {what} extent {tuple(extent_hw)}{detail} is larger than the padded input {padded} "
                      f"(input {tuple(in_hw)}, padding {tuple(pads)}); use padding='same' or a smaller {what}")
    return tuple((p - ext) // s + 1 for p, ext, s in zip(padded, extent_hw, stride))


def check_conv_padding(pads, kernel_hw, dilation, in_hw, op):
    """Bound padding by the kernel, so a tiny model cannot declare a huge output (padding 4095 on a 28x28
    image is 2.4 GB per image). Each pad may be at most the dilated kernel extent: more only adds output
    rows/columns that see nothing but padding. TensorFlow's 'same' never pads more than extent - 1 in
    total, a "full" convolution needs extent - 1 per side, and ONNX Runtime and PyTorch bound pooling pads
    the same way (pad < kernel). With dilation the output may also not exceed what that rule allows an
    undilated kernel (input + kernel + 1): this bounds a 2-tap kernel with a huge dilation and a matching
    pad; 'same' and 'valid' never reach it."""
    for axis, ((p0, p1), k, d, size) in enumerate(zip(pads, kernel_hw, dilation, in_hw)):
        ext = (k - 1) * d + 1
        name = "height" if axis == 0 else "width"
        if max(p0, p1) > ext:
            raise IRError(f"{op}: padding {(p0, p1)} along the {name} is larger than the kernel extent {ext} "
                          f"(kernel {tuple(kernel_hw)}, dilation {tuple(dilation)}); pad the input explicitly "
                          f"if you need more")
        if size + p0 + p1 - ext + 1 > size + k + 1:
            raise IRError(f"{op}: padding {(p0, p1)} along the {name} with dilation {d} gives an output of "
                          f"{size + p0 + p1 - ext + 1} pixels, more than the {size + k + 1} an undilated "
                          f"{k}-tap kernel can give on the {size}-pixel input")


def check_groups(groups, c, f, op) -> int:
    """groups must be a positive int dividing both the input channels c and the filters f."""
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
        raise IRError(f"{op}: groups must be a positive int, got {groups!r}")
    if c % groups or f % groups:
        raise IRError(f"{op}: groups={groups} must divide the input channels ({c}) and the filters ({f})")
    return groups


def _nhwc(t, op, what="x"):
    if t.rank != 4:
        raise IRError(f"{op}: {what} must be 4-D NHWC (batch, height, width, channels), got {t}")


def weights_batched(node) -> bool:
    """For ops applying weights (inputs 1..) to per-sample data (input 0): weights that carry the
    batch axis mix samples."""
    return any(v.type.batched for v in node.inputs[1:])


def kernel_or_bias_batched(node) -> bool:
    """weights_batched for a conv with a fused residual (inputs x, w, b, residual): a batched kernel or
    bias mixes samples; the residual is per sample like x (output row i reads residual row i)."""
    return any(v.type.batched for v in node.inputs[1:3])


class ConvBase(Op):
    attrs = {"stride": 1, "padding": "valid", "dilation": 1}

    def couples_batch(self, node):
        return weights_batched(node)

    def _geom(self, x_hw, k_hw, attrs):
        stride = pair(attrs["stride"], "stride", self.name)
        dil = pair(attrs["dilation"], "dilation", self.name)
        ext = tuple((k - 1) * d + 1 for k, d in zip(k_hw, dil))
        pads = resolve_padding(attrs["padding"], x_hw, ext, stride, self.name)
        check_conv_padding(pads, k_hw, dil, x_hw, self.name)
        out = window_out(x_hw, ext, stride, pads, self.name, "kernel",
                         f" (kernel {tuple(k_hw)}, dilation {dil})")
        return stride, dil, pads, out


@register
class Conv2D(ConvBase):
    """y = act(conv(x, w) + b [+ residual]); x (N,H,W,C), w (KH,KW,C/groups,F). With groups > 1, input
    channels [g*C/groups, (g+1)*C/groups) feed output channels [g*F/groups, (g+1)*F/groups) only; the
    `decompose_grouped_conv` pass splits such a node into per-group convs + concat for the backends.
    `residual` (the output's type, only after a bias, groups = 1) is the ResNet block's skip value,
    added before the activation: fuse_bias_activation puts it there from conv -> add(., skip) -> act."""
    name = "conv2d"
    inputs = ("x", "w", "b?", "residual?")
    attrs = dict(ConvBase.attrs, activation="linear", activation_params=(), groups=1)

    def normalize(self, types, attrs):
        x, w = types[0], types[1]
        _nhwc(x, self.name)
        if w.rank != 4:
            raise IRError(f"conv2d: kernel must be 4-D HWIO (kh, kw, in_ch, out_ch), got {w}")
        groups = check_groups(attrs["groups"], x.shape[3], w.shape[3], self.name)
        if x.shape[3] != w.shape[2] * groups:
            raise IRError(f"conv2d: input has {x.shape[3]} channels but the kernel expects {w.shape[2] * groups} "
                          f"(x {x}, w {w}, groups={groups}; w must be (kh, kw, in_ch // groups, out_ch))")
        if len(types) > 2 and types[2].shape != (w.shape[3],):
            raise IRError(f"conv2d: bias must have shape ({w.shape[3]},), got {types[2]}")
        stride, dil, pads, out_hw = self._geom(x.shape[1:3], w.shape[:2], attrs)
        if len(types) > 3:
            want = TensorType((x.shape[0],) + out_hw + (w.shape[3],))
            if types[3] != want:
                raise IRError(f"conv2d: residual must have the output's type {want}, got {types[3]}")
            if groups != 1:
                raise IRError(f"conv2d: a residual operand needs groups=1, got groups={groups}")
        act, params = check_activation(attrs["activation"], attrs["activation_params"], self.name)
        return {"stride": stride, "padding": pads, "dilation": dil, "activation": act,
                "activation_params": params, "groups": int(groups)}

    def infer(self, types, attrs):
        x, w = types[0], types[1]
        *_, out = self._geom(x.shape[1:3], w.shape[:2], attrs)
        return [TensorType((x.shape[0],) + out + (w.shape[3],))]

    def couples_batch(self, node):
        return kernel_or_bias_batched(node)

    def flops(self, node, batch):
        kh, kw, c, _ = node.inputs[1].shape
        return 2 * kh * kw * c * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        x, w = node.inputs[:2]
        a = {k: node.attrs[k] for k in ("stride", "padding", "dilation")}
        dz = activation_grad(node.attrs["activation"], node.attrs["activation_params"], node.outputs[0], douts[0])
        groups = node.attrs.get("groups", 1)
        if groups == 1:
            dx = emit("conv2d_grad_input", dz, w, input_shape=x.shape[1:], **a)
            dw = emit("conv2d_grad_filter", x, dz, kernel_hw=w.shape[:2], **a)
        else:
            # per group: the plain conv gradients on the group's channel slices, concatenated
            cg, fg = w.shape[2], w.shape[3] // groups
            dxs, dws = [], []
            for k in range(groups):
                dz_k = emit("slice", dz, axis=3, start=k * fg, stop=(k + 1) * fg)
                w_k = emit("slice", w, axis=3, start=k * fg, stop=(k + 1) * fg)
                x_k = emit("slice", x, axis=3, start=k * cg, stop=(k + 1) * cg)
                dxs.append(emit("conv2d_grad_input", dz_k, w_k, input_shape=x.shape[1:3] + (cg,), **a))
                dws.append(emit("conv2d_grad_filter", x_k, dz_k, kernel_hw=w.shape[:2], **a))
            dx, dw = emit("concat", *dxs, axis=3), emit("concat", *dws, axis=3)
        grads = [dx, dw]
        if len(node.inputs) > 2:
            grads.append(emit("bias_add_grad", dz))
        if len(node.inputs) > 3:
            grads.append(dz)                 # d/d residual of (... + residual) is dz itself
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

    def couples_batch(self, node):
        return any(v.type.batched for v in node.inputs)     # sums x * dy over the batch

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
        out = window_out(x_hw, pool, stride, pads, self.name, "pool window")
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
    """The max of each window; f32, or u8/i8 quantized values (the max commutes with the monotone
    quantization map, so a quantized tensor keeps its scale and zero point)."""
    name = "max_pool2d"
    inputs = ("x",)
    DTYPES = ("f32", "u8", "i8")

    def normalize(self, types, attrs):
        if types[0].dtype not in self.DTYPES:
            raise IRError(f"max_pool2d: x must be one of {', '.join(self.DTYPES)}, got {types[0]}")
        return super().normalize(types, attrs)

    def infer(self, types, attrs):
        return [TensorType(super().infer(types, attrs)[0].shape, types[0].dtype)]

    def grad(self, node, douts):
        return [emit("max_pool2d_grad", node.inputs[0], douts[0], **node.attrs)]


@register
class Conv2DMaxPool(Op):
    """y = max_pool2d(conv2d(x, w, b?, residual?), pool, stride=pool): conv2d (groups 1, with its fused bias,
    residual and activation) and one non-overlapping, unpadded max-pool window, as one op — the
    inference-only fusion of ir/passes/fuse_conv_pool, so the conv's output is never stored. Conv pixels
    no window covers (an odd last row or column) are not computed. Output (N, OH // ph, OW // pw, F) for
    the conv's (OH, OW). No gradient: training graphs keep the conv output for relu_grad/max_pool2d_grad."""
    name = "conv2d_max_pool"
    inputs = Conv2D.inputs
    attrs = dict(Conv2D.attrs, pool=REQUIRED)
    differentiable = False

    def normalize(self, types, attrs):
        conv_attrs = {k: v for k, v in attrs.items() if k != "pool"}
        a = get_op("conv2d").normalize(types, conv_attrs)
        if a["groups"] != 1:
            raise IRError(f"conv2d_max_pool: groups must be 1, got {a['groups']}")
        if types[0].dtype != "f32":
            raise IRError(f"conv2d_max_pool: x must be f32, got {types[0]}")
        pool = pair(attrs["pool"], "pool size", self.name)
        conv_hw = get_op("conv2d").infer(types, a)[0].shape[1:3]
        if any(p > c for p, c in zip(pool, conv_hw)):
            raise IRError(f"conv2d_max_pool: pool window {pool} is larger than the conv output {conv_hw}")
        return dict(a, pool=pool)

    def infer(self, types, attrs):
        conv = get_op("conv2d").infer(types, attrs)[0].shape
        ph, pw = attrs["pool"]
        return [TensorType((conv[0], conv[1] // ph, conv[2] // pw, conv[3]))]

    def couples_batch(self, node):
        return kernel_or_bias_batched(node)

    def flops(self, node, batch):
        """The conv's multiply-adds on the pixels the windows cover, plus the window maxima."""
        kh, kw, c, _ = node.inputs[1].shape
        ph, pw = node.attrs["pool"]
        covered = node.outputs[0].type.numel(batch) * ph * pw
        return 2 * kh * kw * c * covered + covered


@register
class MaxPool2DGrad(PoolBase):
    """dx for max_pool2d: each window's dy goes to the first maximum of the window (row-major taps).
    relu_mask (the fold_relu_grad pass): then dx *= (x > 0), relu_grad's multiply, for x the output of a
    relu — one pass instead of two; only for windows that cannot overlap (each cell gets one share)."""
    name = "max_pool2d_grad"
    inputs = ("x", "dy")
    attrs = dict(PoolBase.attrs, relu_mask=False)
    differentiable = False

    def normalize(self, types, attrs):
        a = super().normalize(types, attrs)
        if not isinstance(attrs["relu_mask"], bool):
            raise IRError(f"max_pool2d_grad: relu_mask must be a bool, got {attrs['relu_mask']!r}")
        if attrs["relu_mask"] and (a["stride"][0] < a["pool"][0] or a["stride"][1] < a["pool"][1]):
            raise IRError(f"max_pool2d_grad: relu_mask needs windows that cannot overlap (stride >= pool), "
                          f"got pool {a['pool']}, stride {a['stride']}")
        return a

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
    """The mean over H and W; f32, or u8/i8 quantized values, which keep their scale and zero point
    (the mean commutes with the affine quantization map): y = rint(f32(int32 sum) / f32(H*W)), rounding
    half to even. The mean of bytes is a byte, so no clamp is needed."""
    name = "global_avg_pool2d"
    inputs = ("x",)
    DTYPES = ("f32", "u8", "i8")
    # the int32 sum of H*W bytes (|q| <= 255) must not overflow
    MAX_QUANTIZED_PIXELS = (2 ** 31 - 1) // 255

    def normalize(self, types, attrs):
        x = types[0]
        if x.dtype not in self.DTYPES:
            raise IRError(f"global_avg_pool2d: x must be one of {', '.join(self.DTYPES)}, got {x}")
        if x.dtype != "f32" and x.rank == 4 and x.shape[1] * x.shape[2] > self.MAX_QUANTIZED_PIXELS:
            raise IRError(f"global_avg_pool2d: {x} has more than {self.MAX_QUANTIZED_PIXELS} pixels; "
                          "their int32 sum could overflow")
        return attrs

    def infer(self, types, attrs):
        _nhwc(types[0], self.name)
        return [TensorType((types[0].shape[0], types[0].shape[3]), types[0].dtype)]

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
    attrs = {"activation": "linear", "activation_params": ()}

    def normalize(self, types, attrs):
        x, w = types[0], types[1]
        if x.rank != 2:
            raise IRError(f"dense: input must be 2-D (batch, features), got {x}; add a Flatten first")
        if w.rank != 2 or w.shape[0] != x.shape[1]:
            raise IRError(f"dense: kernel {w} does not match input {x}: expected ({x.shape[1]}, units)")
        if len(types) > 2 and types[2].shape != (w.shape[1],):
            raise IRError(f"dense: bias must have shape ({w.shape[1]},), got {types[2]}")
        act, params = check_activation(attrs["activation"], attrs["activation_params"], self.name)
        return {"activation": act, "activation_params": params}

    def infer(self, types, attrs):
        return [TensorType((types[0].shape[0], types[1].shape[1]))]

    def couples_batch(self, node):
        return weights_batched(node)

    def flops(self, node, batch):
        return 2 * node.inputs[1].shape[0] * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        x, w = node.inputs[:2]
        dz = activation_grad(node.attrs["activation"], node.attrs["activation_params"], node.outputs[0], douts[0])
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

    def couples_batch(self, node):
        a, b = node.inputs
        inner_a = a.shape[0] if node.attrs["transpose_a"] else a.shape[1]
        inner_b = b.shape[1] if node.attrs["transpose_b"] else b.shape[0]
        return inner_a is None or inner_b is None       # the reduction runs over the batch axis

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


# -- depthwise convolution -----------------------------------------------------------------------------

def _depthwise_kernel(x, w, op):
    if w.rank != 4:
        raise IRError(f"{op}: kernel must be 4-D (kh, kw, channels, depth_multiplier), got {w}")
    if x.shape[3] != w.shape[2]:
        raise IRError(f"{op}: input has {x.shape[3]} channels but the depthwise kernel {w} expects {w.shape[2]}")


@register
class DepthwiseConv2D(ConvBase):
    """y[..., c*M + m] = act(sum_taps x[..., c] * w[i, j, c, m] + b[c*M + m]); x (N,H,W,C), w (KH,KW,C,M)
    (TF/Keras channel order). Each channel is filtered on its own: memory-bound, its own kernels."""
    name = "depthwise_conv2d"
    inputs = ("x", "w", "b?")
    attrs = dict(ConvBase.attrs, activation="linear", activation_params=())

    def normalize(self, types, attrs):
        x, w = types[0], types[1]
        _nhwc(x, self.name)
        _depthwise_kernel(x, w, self.name)
        f = w.shape[2] * w.shape[3]
        if len(types) > 2 and types[2].shape != (f,):
            raise IRError(f"{self.name}: bias must have shape ({f},) (channels * depth_multiplier), got {types[2]}")
        stride, dil, pads, _ = self._geom(x.shape[1:3], w.shape[:2], attrs)
        act, params = check_activation(attrs["activation"], attrs["activation_params"], self.name)
        return {"stride": stride, "padding": pads, "dilation": dil, "activation": act,
                "activation_params": params}

    def infer(self, types, attrs):
        x, w = types[0], types[1]
        *_, out = self._geom(x.shape[1:3], w.shape[:2], attrs)
        return [TensorType((x.shape[0],) + out + (w.shape[2] * w.shape[3],))]

    def flops(self, node, batch):
        kh, kw = node.inputs[1].shape[:2]
        return 2 * kh * kw * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        x, w = node.inputs[:2]
        a = {k: node.attrs[k] for k in ("stride", "padding", "dilation")}
        dz = activation_grad(node.attrs["activation"], node.attrs["activation_params"], node.outputs[0], douts[0])
        grads = [emit("depthwise_conv2d_grad_input", dz, w, input_shape=x.shape[1:], **a),
                 emit("depthwise_conv2d_grad_filter", x, dz, kernel_shape=w.shape, **a)]
        if len(node.inputs) > 2:
            grads.append(emit("bias_add_grad", dz))
        return grads


@register
class DepthwiseConv2DGradInput(ConvBase):
    name = "depthwise_conv2d_grad_input"
    inputs = ("dy", "w")
    attrs = dict(ConvBase.attrs, input_shape=REQUIRED)
    differentiable = False

    def normalize(self, types, attrs):
        dy, w = types
        _nhwc(dy, self.name, "dy")
        h, wd, c = (int(d) for d in attrs["input_shape"])
        _depthwise_kernel(TensorType((None, h, wd, c)), w, self.name)
        stride, dil, pads, out = self._geom((h, wd), w.shape[:2], attrs)
        if out != dy.shape[1:3] or dy.shape[3] != c * w.shape[3]:
            raise IRError(f"{self.name}: dy {dy} does not match input {(h, wd, c)} and kernel {w}")
        return {"stride": stride, "padding": pads, "dilation": dil, "input_shape": (h, wd, c)}

    def infer(self, types, attrs):
        return [TensorType((types[0].shape[0],) + tuple(attrs["input_shape"]))]

    def flops(self, node, batch):
        kh, kw = node.inputs[1].shape[:2]
        return 2 * kh * kw * node.inputs[0].type.numel(batch)


@register
class DepthwiseConv2DGradFilter(ConvBase):
    name = "depthwise_conv2d_grad_filter"
    inputs = ("x", "dy")
    attrs = dict(ConvBase.attrs, kernel_shape=REQUIRED)
    differentiable = False

    def normalize(self, types, attrs):
        x, dy = types
        _nhwc(x, self.name)
        _nhwc(dy, self.name, "dy")
        try:
            kh, kw, c, m = (int(d) for d in attrs["kernel_shape"])
        except (TypeError, ValueError):
            raise IRError(f"{self.name}: kernel_shape must be (kh, kw, channels, multiplier), "
                          f"got {attrs['kernel_shape']!r}") from None
        if min(kh, kw, c, m) < 1 or c != x.shape[3]:
            raise IRError(f"{self.name}: kernel_shape {(kh, kw, c, m)} does not match x {x}")
        stride, dil, pads, out = self._geom(x.shape[1:3], (kh, kw), attrs)
        if out != dy.shape[1:3] or dy.shape[3] != c * m:
            raise IRError(f"{self.name}: dy {dy} does not match x {x} and kernel {(kh, kw, c, m)}")
        return {"stride": stride, "padding": pads, "dilation": dil, "kernel_shape": (kh, kw, c, m)}

    def infer(self, types, attrs):
        return [TensorType(tuple(attrs["kernel_shape"]))]

    def couples_batch(self, node) -> bool:
        return node.inputs[0].type.batched          # a sum over the batch

    def flops(self, node, batch):
        kh, kw = node.attrs["kernel_shape"][:2]
        return 2 * kh * kw * node.inputs[1].type.numel(batch)


# -- global max pooling, padding ---------------------------------------------------------------------------

@register
class GlobalMaxPool2D(Op):
    """(N,H,W,C) -> (N,C): the max over H and W; NaN propagates (like np.max). f32, or u8/i8 quantized
    values, which keep their scale and zero point (as in max_pool2d)."""
    name = "global_max_pool2d"
    inputs = ("x",)
    DTYPES = ("f32", "u8", "i8")

    def normalize(self, types, attrs):
        if types[0].dtype not in self.DTYPES:
            raise IRError(f"global_max_pool2d: x must be one of {', '.join(self.DTYPES)}, got {types[0]}")
        return attrs

    def infer(self, types, attrs):
        _nhwc(types[0], self.name)
        return [TensorType((types[0].shape[0], types[0].shape[3]), types[0].dtype)]

    def flops(self, node, batch):
        return node.inputs[0].type.numel(batch)

    def grad(self, node, douts):
        return [emit("global_max_pool2d_grad", node.inputs[0], node.outputs[0], douts[0])]


@register
class GlobalMaxPool2DGrad(Op):
    """dx: each (sample, channel)'s dy goes to the FIRST position (row-major over H, W) holding the max
    (the first NaN when the max is NaN); everything else is 0."""
    name = "global_max_pool2d_grad"
    inputs = ("x", "y", "dy")
    differentiable = False

    def infer(self, types, attrs):
        x, y, dy = types
        _nhwc(x, self.name)
        want = TensorType((x.shape[0], x.shape[3]))
        if y != want or dy != want:
            raise IRError(f"{self.name}: y {y} and dy {dy} must be {want} for x {x}")
        return [x]


def check_spatial_padding(padding, op) -> tuple:
    """((top, bottom), (left, right)) of non-negative ints; an int or (ph, pw) pads symmetrically."""
    if isinstance(padding, str):
        raise IRError(f"{op}: padding must be ((top, bottom), (left, right)) or ints, got {padding!r}")
    return resolve_padding(padding, None, None, None, op)


@register
class Pad(Op):
    """Constant padding of the spatial axes of an NHWC tensor."""
    name = "pad"
    inputs = ("x",)
    attrs = {"padding": REQUIRED, "value": 0.0}

    def normalize(self, types, attrs):
        _nhwc(types[0], self.name)
        pads = check_spatial_padding(attrs["padding"], self.name)
        try:
            value = float(attrs["value"])
        except (TypeError, ValueError):
            raise IRError(f"{self.name}: value must be a number, got {attrs['value']!r}") from None
        return {"padding": pads, "value": value}

    def infer(self, types, attrs):
        n, h, w, c = types[0].shape
        (t, b), (l, r) = attrs["padding"]
        return [TensorType((n, h + t + b, w + l + r, c))]

    def flops(self, node, batch):
        return 0

    def grad(self, node, douts):
        return [emit("pad_grad", douts[0], padding=node.attrs["padding"])]


@register
class PadGrad(Op):
    """The gradient of pad: dy cropped back to the unpadded window."""
    name = "pad_grad"
    inputs = ("dy",)
    attrs = {"padding": REQUIRED}
    differentiable = False

    def normalize(self, types, attrs):
        _nhwc(types[0], self.name, "dy")
        pads = check_spatial_padding(attrs["padding"], self.name)
        n, h, w, c = types[0].shape
        if h - sum(pads[0]) < 1 or w - sum(pads[1]) < 1:
            raise IRError(f"{self.name}: padding {pads} leaves nothing of dy {types[0]}")
        return {"padding": pads}

    def infer(self, types, attrs):
        n, h, w, c = types[0].shape
        (t, b), (l, r) = attrs["padding"]
        return [TensorType((n, h - t - b, w - l - r, c))]

    def flops(self, node, batch):
        return 0
