"""Quantized (int8) inference ops: quantize, dequantize, conv2d_q, dense_q.

Number formats (the ONNX / TFLite affine scheme): a real value r is stored as an integer q with
r = scale * (q - zero_point). Activations are per-tensor u8 or i8 (scale, zero_point attributes);
weights are per-output-channel *symmetric* i8 (zero point 0, one scale per output channel); biases are
i32 in units of x_scale * w_scale[c] (zero point 0).

Arithmetic, defined exactly so that every backend gives bit-identical integers:

quantize (ONNX QuantizeLinear):
    q = clamp(rint(f32(x) / f32(scale)) + zero_point, lo, hi)
    where "/" is one IEEE float32 division, rint rounds half to even, NaN counts as 0 (so it maps to
    zero_point), +-inf saturate, and [lo, hi] is the dtype's range ([0, 255] or [-128, 127]).
dequantize (ONNX DequantizeLinear):
    r = f32(q - zero_point) * f32(scale)                 (one float32 multiply)
conv2d_q / dense_q:
    acc[c] = b[c] + sum_k (x_k - x_zero_point) * w[k, c]    int32, two's-complement wraparound
             (padding cells hold x_zero_point, i.e. a real 0; the op refuses shapes whose reduction
             could overflow int32 without the bias, so only an extreme bias can wrap)
    m[c]   = f32(f64(x_scale) * f64(w_scale[c]) / f64(y_scale))   (computed once, float64 then rounded)
    y[c]   = clamp(rint(f32(acc[c]) * m[c]) + y_zero_point, y_min, y_max)
    i.e. the float32-multiplier requantization (not gemmlowp's fixed-point rule): acc converts to
    float32 with round-to-nearest-even, one float32 multiply, rint half to even. A fused relu or clip
    is the output clamp [y_min, y_max] (the pass derives it: relu -> y_min = y_zero_point).
conv2d_q with a residual r (u8/i8, laid out like y, per-tensor r_scale / r_zero_point; needs the bias):
    mr     = f32(f64(r_scale) / f64(y_scale))
    y[c]   = clamp(rint(f32(acc[c]) * m[c] + f32(r - r_zero_point) * mr) + y_zero_point, y_min, y_max)
    (two float32 multiplies and one float32 add, never fused into an FMA): the residual block's
    relu(conv + b + r) in one kernel, activations int8 on both paths.
"""
from __future__ import annotations

import math
import numbers

from ..types import IRError, TensorType
from . import REQUIRED, Op, register
from .nn import ConvBase, _nhwc, kernel_or_bias_batched

# the integer range of each quantized activation dtype
QUANT_RANGES = {"u8": (0, 255), "i8": (-128, 127)}
WEIGHT_DTYPE = "i8"
BIAS_DTYPE = "i32"
INT32_MAX = 2 ** 31 - 1


def check_scale(value, what, op) -> float:
    """A positive finite scale, canonicalized to the float32 value the kernels use."""
    import numpy as np
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise IRError(f"{op}: {what} must be a positive number, got {value!r}")
    f = float(np.float32(value))
    if not math.isfinite(f) or f <= 0 or not math.isfinite(float(value)):
        raise IRError(f"{op}: {what} must be a positive finite float32 number, got {value!r}")
    return f


def check_quant_dtype(dtype, what, op) -> str:
    if dtype not in QUANT_RANGES:
        raise IRError(f"{op}: {what} must be one of {', '.join(QUANT_RANGES)}, got {dtype!r}")
    return dtype


def check_int_in(value, lo, hi, what, op) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise IRError(f"{op}: {what} must be an int in [{lo}, {hi}], got {value!r}")
    return int(value)


def requant_bounds(attrs, op) -> tuple:
    """(y_min, y_max) of a conv2d_q/dense_q output: the given clamp (None = the dtype's end), checked."""
    lo, hi = QUANT_RANGES[attrs["dtype"]]
    y_min = lo if attrs["y_min"] is None else check_int_in(attrs["y_min"], lo, hi, "y_min", op)
    y_max = hi if attrs["y_max"] is None else check_int_in(attrs["y_max"], lo, hi, "y_max", op)
    if y_min > y_max:
        raise IRError(f"{op}: y_min {y_min} is larger than y_max {y_max}")
    return y_min, y_max


@register
class Quantize(Op):
    """q = clamp(rint(x / scale) + zero_point) as u8/i8 (ONNX QuantizeLinear; see the module doc)."""
    name = "quantize"
    inputs = ("x",)
    attrs = {"scale": REQUIRED, "zero_point": 0, "dtype": "u8"}
    differentiable = False

    def normalize(self, types, attrs):
        if types[0].dtype != "f32":
            raise IRError(f"quantize: x must be f32, got {types[0]}")
        dtype = check_quant_dtype(attrs["dtype"], "dtype", self.name)
        return {"scale": check_scale(attrs["scale"], "scale", self.name), "dtype": dtype,
                "zero_point": check_int_in(attrs["zero_point"], *QUANT_RANGES[dtype], "zero_point", self.name)}

    def infer(self, types, attrs):
        return [TensorType(types[0].shape, attrs["dtype"])]


@register
class Dequantize(Op):
    """r = (q - zero_point) * scale as f32 (ONNX DequantizeLinear; see the module doc)."""
    name = "dequantize"
    inputs = ("x",)
    attrs = {"scale": REQUIRED, "zero_point": 0}
    differentiable = False

    def normalize(self, types, attrs):
        dtype = check_quant_dtype(types[0].dtype, "x's dtype", self.name)
        return {"scale": check_scale(attrs["scale"], "scale", self.name),
                "zero_point": check_int_in(attrs["zero_point"], *QUANT_RANGES[dtype], "zero_point", self.name)}

    def infer(self, types, attrs):
        return [TensorType(types[0].shape, "f32")]


REQUANT_ATTRS = {"x_scale": REQUIRED, "x_zero_point": 0, "w_scale": REQUIRED, "y_scale": REQUIRED,
                 "y_zero_point": 0, "dtype": "u8", "y_min": None, "y_max": None}


def _check_requant(op, x, w_scale_len, types, attrs) -> dict:
    """The quantization attributes shared by conv2d_q and dense_q, checked against the operand types."""
    check_quant_dtype(x.dtype, "x's dtype", op)
    if types[1].dtype != WEIGHT_DTYPE:
        raise IRError(f"{op}: w must be {WEIGHT_DTYPE} (symmetric per-channel weights), got {types[1]}")
    if len(types) > 2 and types[2].dtype != BIAS_DTYPE:
        raise IRError(f"{op}: bias must be {BIAS_DTYPE}, got {types[2]}")
    dtype = check_quant_dtype(attrs["dtype"], "dtype", op)
    w_scale = attrs["w_scale"]
    if isinstance(w_scale, (str, bytes)) or not hasattr(w_scale, "__len__") or len(w_scale) != w_scale_len:
        raise IRError(f"{op}: w_scale must hold one scale per output channel ({w_scale_len}), got {w_scale!r:.80}")
    out = dict(attrs, dtype=dtype,
               x_scale=check_scale(attrs["x_scale"], "x_scale", op),
               x_zero_point=check_int_in(attrs["x_zero_point"], *QUANT_RANGES[x.dtype], "x_zero_point", op),
               w_scale=tuple(check_scale(s, f"w_scale[{i}]", op) for i, s in enumerate(w_scale)),
               y_scale=check_scale(attrs["y_scale"], "y_scale", op),
               y_zero_point=check_int_in(attrs["y_zero_point"], *QUANT_RANGES[dtype], "y_zero_point", op))
    out["y_min"], out["y_max"] = requant_bounds(out, op)
    return out


def _check_reduction(op, k):
    # |x - x_zero_point| <= 255 and |w| <= 128: k terms must fit int32 so only the bias can wrap
    if k * 255 * 128 > INT32_MAX:
        raise IRError(f"{op}: reduction over {k} terms may overflow the int32 accumulator "
                      f"(at most {INT32_MAX // (255 * 128)})")


@register
class Conv2DQ(ConvBase):
    """y = requant(conv(x - x_zero_point, w) + b); x (N,H,W,C) u8/i8, w (KH,KW,C,F) i8, b (F,) i32,
    y (N,OH,OW,F) u8/i8. Arithmetic and rounding: see the module doc."""
    name = "conv2d_q"
    inputs = ("x", "w", "b?", "residual?")
    attrs = dict(ConvBase.attrs, **REQUANT_ATTRS, r_scale=None, r_zero_point=0)
    differentiable = False

    def couples_batch(self, node):
        return kernel_or_bias_batched(node)

    def normalize(self, types, attrs):
        x, w = types[0], types[1]
        _nhwc(x, self.name)
        if w.rank != 4 or w.shape[2] != x.shape[3]:
            raise IRError(f"conv2d_q: kernel must be HWIO (kh, kw, {x.shape[3]}, out_ch) for x {x}, got {w}")
        if len(types) > 2 and types[2].shape != (w.shape[3],):
            raise IRError(f"conv2d_q: bias must have shape ({w.shape[3]},), got {types[2]}")
        _check_reduction(self.name, w.shape[0] * w.shape[1] * w.shape[2])
        stride, dil, pads, out_hw = self._geom(x.shape[1:3], w.shape[:2], attrs)
        out = _check_requant(self.name, x, w.shape[3], types[:3], attrs)
        if len(types) > 3:
            r = types[3]
            check_quant_dtype(r.dtype, "residual's dtype", self.name)
            want = (x.shape[0],) + tuple(out_hw) + (w.shape[3],)
            if tuple(r.shape) != want:
                raise IRError(f"conv2d_q: residual must have the output's shape {want}, got {r}")
            if attrs["r_scale"] is None:
                raise IRError("conv2d_q: a residual operand needs r_scale (and r_zero_point)")
            out["r_scale"] = check_scale(attrs["r_scale"], "r_scale", self.name)
            out["r_zero_point"] = check_int_in(attrs["r_zero_point"], *QUANT_RANGES[r.dtype], "r_zero_point",
                                               self.name)
        elif attrs["r_scale"] is not None or attrs["r_zero_point"] != 0:
            raise IRError("conv2d_q: r_scale / r_zero_point given without a residual operand")
        return dict(out, stride=stride, padding=pads, dilation=dil)

    def infer(self, types, attrs):
        x, w = types[0], types[1]
        *_, out = self._geom(x.shape[1:3], w.shape[:2], attrs)
        return [TensorType((x.shape[0],) + out + (w.shape[3],), attrs["dtype"])]

    def flops(self, node, batch):          # integer multiply-accumulates, counted as 2 ops each
        kh, kw, c, _ = node.inputs[1].shape
        return 2 * kh * kw * c * node.outputs[0].type.numel(batch)


@register
class DenseQ(Op):
    """y = requant((x - x_zero_point) @ w + b); x (N,K) u8/i8, w (K,M) i8, b (M,) i32, y (N,M) u8/i8.
    Arithmetic and rounding: see the module doc."""
    name = "dense_q"
    inputs = ("x", "w", "b?")
    attrs = dict(REQUANT_ATTRS)
    differentiable = False

    def normalize(self, types, attrs):
        x, w = types[0], types[1]
        if x.rank != 2:
            raise IRError(f"dense_q: input must be 2-D (batch, features), got {x}")
        if w.rank != 2 or w.shape[0] != x.shape[1]:
            raise IRError(f"dense_q: kernel {w} does not match input {x}: expected ({x.shape[1]}, units)")
        if len(types) > 2 and types[2].shape != (w.shape[1],):
            raise IRError(f"dense_q: bias must have shape ({w.shape[1]},), got {types[2]}")
        _check_reduction(self.name, w.shape[0])
        return _check_requant(self.name, x, w.shape[1], types, attrs)

    def infer(self, types, attrs):
        return [TensorType((types[0].shape[0], types[1].shape[1]), attrs["dtype"])]

    def couples_batch(self, node):
        return any(v.type.batched for v in node.inputs[1:])

    def flops(self, node, batch):
        return 2 * node.inputs[1].shape[0] * node.outputs[0].type.numel(batch)
