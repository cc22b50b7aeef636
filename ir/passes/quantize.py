"""Post-training int8 quantization: a float inference graph -> a graph of quantize / conv2d_q / dense_q /
dequantize nodes (arithmetic defined in ir/ops/quant.py).

    x ─quantize─▶ u8 ─conv2d_q(relu)─▶ u8 ─max_pool2d─▶ u8 ─flatten─▶ u8 ─dense_q─▶ u8 ─dequantize─▶ softmax

Scheme: activations per-tensor u8 (asymmetric, zero exactly representable), weights per output channel
symmetric i8 in [-127, 127], biases i32 in units of x_scale * w_scale[c]. A conv2d (groups=1) or dense
whose weights are params, with its fused bias (and, for conv2d, fused residual) and a linear/relu/clip
activation, becomes conv2d_q / dense_q; the activation becomes the output clamp. max_pool2d,
global_max_pool2d, global_avg_pool2d (the mean rounded half to even), flatten and reshape run on the u8
values, keeping their scale. Every other op gets float inputs: a quantized value is dequantized once, where a float consumer
(softmax, an output) first needs it.

Activation ranges come from calibration: the caller runs the float graph on calibration batches
(the IR cannot run graphs: graphcnn/quantize.py does it with a backend) and hands `ValueRange`s for the
values `calibration_targets` lists. This pass is pure: it builds a new graph and new weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph import Graph
from ..ops.quant import QUANT_RANGES
from ..types import IRError
from . import run_pipeline
from .fold_constants import FOLDERS

# the float pipeline a graph goes through before quantization: bias and activations fused into conv/dense
PREPARE_PASSES = ["verify", "drop_dropout", "fold_batch_norm", "fold_constants", "cse",
                  "fuse_bias_activation", "dce"]
QUANTIZABLE_OPS = ("conv2d", "dense")
QUANTIZABLE_ACTIVATIONS = ("linear", "relu", "clip")
# the same op on the u8 values, same scale and zero point (they commute with the quantization map)
PASS_THROUGH_OPS = ("max_pool2d", "global_max_pool2d", "global_avg_pool2d", "flatten", "reshape")
ACTIVATION_DTYPE = "u8"
WEIGHT_QMAX = 127          # symmetric weights use [-127, 127] (no -128: w and -w quantize alike)


@dataclass(frozen=True)
class ValueRange:
    """Calibrated [lo, hi] of a float value (the observed min/max, or percentiles of the values)."""
    lo: float
    hi: float


@dataclass(frozen=True)
class QuantParams:
    """r = scale * (q - zero_point) for a per-tensor quantized activation."""
    scale: float
    zero_point: int
    dtype: str = ACTIVATION_DTYPE


def prepare_for_quantization(graph: Graph, weights: dict) -> tuple:
    """(the float graph quantize_graph expects, its weights): dropout dropped, batch norm folded, the
    nodes computed from weights alone evaluated (fold_params), bias and activations fused."""
    g = run_pipeline(graph, PREPARE_PASSES[:-2]).graph
    g, weights = fold_params(g, weights)
    return run_pipeline(g, PREPARE_PASSES[-2:]).graph, weights


def fold_params(graph: Graph, weights: dict) -> tuple:
    """(graph, weights) with every node of fold_constants.FOLDERS whose inputs are params and constants
    replaced by a new param holding its value for these weights — fold_batch_norm's scaled kernels and
    shifted biases, so their conv2d becomes quantizable (its weights are params). Quantization specializes
    a graph to its weights anyway; folding cascades; params nothing reads any more are dropped."""
    values = dict(graph.consts)
    values.update((p.name, np.asarray(weights[p.name], np.float32)) for p in graph.params if p.name in weights)
    results = {v.name for v in graph.result_values()}
    folded, kept = {}, []
    for n in graph.nodes:
        fold = FOLDERS.get(n.op)
        if fold is None or not all(v.name in values for v in n.inputs) or n.outputs[0].name in results:
            kept.append(n)
            continue
        out = n.outputs[0]
        values[out.name] = folded[out.name] = np.ascontiguousarray(
            np.asarray(fold([values[v.name] for v in n.inputs], n.attrs), dtype=out.type.np_dtype))
    if not folded:
        return graph, weights
    used = {v.name for n in kept for v in n.inputs} | results
    base = Graph(graph.name)
    for v in graph.inputs:
        base.input(v.name, v.shape, v.dtype)
    for v in graph.params:
        if v.name in used:
            base.param(v.name, v.shape, v.dtype)
    for v in graph.const_values:
        if v.name in used:
            base.const(v.name, graph.consts[v.name])
    new_weights = {k: w for k, w in weights.items() if k in used}
    for name, arr in folded.items():
        if name in used:
            base.param(name, arr.shape, graph.value(name).dtype)
            new_weights[name] = arr
    base._counter = graph._counter
    return base.rebuild(kept, outputs=graph.outputs, updates=graph.updates), new_weights


def _quantizable(node, weights) -> bool:
    if node.op not in QUANTIZABLE_OPS or node.attrs["activation"] not in QUANTIZABLE_ACTIVATIONS:
        return False
    if node.op == "conv2d" and node.attrs.get("groups", 1) != 1:
        return False          # grouped: conv2d_q has no groups; stays float
    return all(v.kind == "param" and v.name in weights for v in node.inputs[1:3])


def calibration_targets(graph: Graph, weights: dict) -> list:
    """Names of the float values whose range quantize_graph needs: the inputs (a fused residual
    included) and outputs of every conv2d/dense it will quantize."""
    names = []
    for n in graph.nodes:
        if _quantizable(n, weights):
            for v in (n.inputs[0], *n.inputs[3:], n.outputs[0]):
                if v.name not in names:
                    names.append(v.name)
    return names


def range_from_values(arrays, method: str = "minmax", percentile: float = 99.99) -> ValueRange:
    """The calibration range of one value from its observed arrays: 'minmax' (the extremes) or
    'percentile' (the `percentile` and 100 - `percentile` percentiles: ignores rare outliers)."""
    flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    if flat.size == 0 or not np.isfinite(flat).all():
        raise IRError("quantize: calibration values must be finite and not empty")
    if method == "minmax":
        return ValueRange(float(flat.min()), float(flat.max()))
    if method == "percentile":
        if not 50 < percentile <= 100:
            raise IRError(f"quantize: percentile must be in (50, 100], got {percentile!r}")
        lo, hi = np.percentile(flat, [100 - percentile, percentile])
        return ValueRange(float(lo), float(hi))
    raise IRError(f"quantize: unknown calibration method {method!r}; use 'minmax' or 'percentile'")


def activation_params(r: ValueRange, dtype: str = ACTIVATION_DTYPE) -> QuantParams:
    """Asymmetric per-tensor parameters covering [min(lo, 0), max(hi, 0)] (0 exactly representable,
    so zero padding and relu's floor are exact)."""
    qlo, qhi = QUANT_RANGES[dtype]
    lo, hi = min(r.lo, 0.0), max(r.hi, 0.0)
    scale = float(np.float32((hi - lo) / (qhi - qlo))) if hi > lo else 1.0
    zero_point = int(np.clip(round(qlo - lo / scale), qlo, qhi))
    return QuantParams(scale, zero_point, dtype)


def quantize_weights(w: np.ndarray) -> tuple:
    """(i8 weights, per-output-channel float32 scales) of a float kernel whose last axis is the output
    channel: scale[c] = max|w[..., c]| / 127 (1.0 for an all-zero channel), w_q = rint(w / scale)."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w.reshape(-1, w.shape[-1])).max(axis=0)
    scale = np.where(amax > 0, amax / WEIGHT_QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
    return q, scale


def quantize_bias(b: np.ndarray, x_scale: float, w_scale: np.ndarray) -> np.ndarray:
    """i32 bias in accumulator units: rint(b / (x_scale * w_scale[c])), saturated to int32."""
    q = np.rint(np.asarray(b, np.float64) / (np.float64(x_scale) * w_scale.astype(np.float64)))
    return np.clip(q, -2 ** 31, 2 ** 31 - 1).astype(np.int32)


def output_clamp(activation: str, params, qp: QuantParams) -> tuple:
    """(y_min, y_max) in the output's integers for a fused activation: relu clamps at the zero point,
    clip(min, max) at its quantized bounds."""
    lo, hi = QUANT_RANGES[qp.dtype]
    if activation == "relu":
        return max(lo, qp.zero_point), hi
    if activation == "clip":
        bounds = dict(params)
        # a bound of None is no bound; a bound is the quantized value of that float (rounded half to even)
        q = lambda r, none: none if r is None else int(np.clip(round(r / qp.scale) + qp.zero_point, lo, hi))  # noqa: E731
        return q(bounds["min_value"], lo), q(bounds["max_value"], hi)
    return lo, hi


def quantize_graph(graph: Graph, weights: dict, ranges: dict) -> tuple:
    """(quantized graph, its weights) for a prepared float graph (prepare_for_quantization), its float
    weights and `ranges` (value name -> ValueRange for every calibration_targets name; see module doc)."""
    missing = [n for n in calibration_targets(graph, weights) if n not in ranges]
    if missing:
        raise IRError(f"quantize: no calibration range for values {missing[:5]}")
    q = Graph(graph.name)
    new_weights = {}
    fval = {}          # float value name -> its float value in q (when it exists there)
    qval = {}          # float value name -> (its quantized value in q, QuantParams)
    for v in graph.inputs:
        fval[v.name] = q.input(v.name, v.shape, v.dtype)
    for v in graph.const_values:
        fval[v.name] = q.const(v.name, graph.consts[v.name])

    def float_of(v):
        if v.name not in fval:
            if v.kind == "param":
                fval[v.name] = q.param(v.name, v.shape, v.dtype)
                new_weights[v.name] = weights[v.name]
            else:
                qv, qp = qval[v.name]
                fval[v.name] = q.add_node("dequantize", [qv], {"scale": qp.scale, "zero_point": qp.zero_point},
                                          [q.fresh_name(f"{v.name}/dequantized")])[0]
        return fval[v.name]

    def quantized_of(v):
        if v.name not in qval:
            qp = activation_params(ranges[v.name])
            qv = q.add_node("quantize", [float_of(v)],
                            {"scale": qp.scale, "zero_point": qp.zero_point, "dtype": qp.dtype},
                            [q.fresh_name(f"{v.name}/quantized")])[0]
            qval[v.name] = (qv, qp)
        return qval[v.name]

    for n in graph.nodes:
        out = n.outputs[0]
        if _quantizable(n, weights):
            xq, xp = quantized_of(n.inputs[0])
            yp = activation_params(ranges[out.name])
            wq, w_scale = quantize_weights(weights[n.inputs[1].name])
            operands = [xq, q.param(n.inputs[1].name, wq.shape, "i8")]
            new_weights[n.inputs[1].name] = wq
            if len(n.inputs) > 2:
                bq = quantize_bias(weights[n.inputs[2].name], xp.scale, w_scale)
                operands.append(q.param(n.inputs[2].name, bq.shape, "i32"))
                new_weights[n.inputs[2].name] = bq
            elif len(n.inputs) > 3:
                raise IRError(f"quantize: conv2d %{out.name} has a residual but no bias operand")
            y_min, y_max = output_clamp(n.attrs["activation"], n.attrs["activation_params"], yp)
            attrs = {"x_scale": xp.scale, "x_zero_point": xp.zero_point, "w_scale": tuple(float(s) for s in w_scale),
                     "y_scale": yp.scale, "y_zero_point": yp.zero_point, "dtype": yp.dtype,
                     "y_min": y_min, "y_max": y_max}
            if len(n.inputs) > 3:     # the fused residual: added in the requantization (ir/ops/quant.py)
                rq, rp = quantized_of(n.inputs[3])
                operands.append(rq)
                attrs.update(r_scale=rp.scale, r_zero_point=rp.zero_point)
            if n.op == "conv2d":
                attrs.update({k: n.attrs[k] for k in ("stride", "padding", "dilation")})
            qval[out.name] = (q.add_node(f"{n.op}_q", operands, attrs, [out.name])[0], yp)
        elif n.op in PASS_THROUGH_OPS and n.inputs[0].name in qval:
            xq, xp = qval[n.inputs[0].name]
            qval[out.name] = (q.add_node(n.op, [xq], dict(n.attrs), [out.name])[0], xp)
        else:
            made = q.add_node(n.op, [float_of(v) for v in n.inputs], dict(n.attrs), [v.name for v in n.outputs])
            for v, m in zip(n.outputs, made):
                fval[v.name] = m
    if graph.updates:
        raise IRError("quantize: a training graph (with parameter updates) cannot be quantized")
    q.output(*[float_of(v) for v in graph.outputs])
    return q, new_weights
