"""gc.quantize: calibrated post-training int8 quantization of a trained model.

Runs the model's float inference graph on calibration images to find each activation's range, then the
IR pass ir/passes/quantize.py rewrites conv2d/dense into conv2d_q/dense_q (arithmetic: ir/ops/quant.py).
The result is an inference runtime (`predict`, `save` as a .gcnn that gc.load runs)."""
from __future__ import annotations

import numpy as np

from ir.passes.quantize import (calibration_targets, prepare_for_quantization, quantize_graph,
                                range_from_values)

from .artifact import Runtime, artifact_bytes, atomic_write_bytes
from .errors import GraphcnnError

METHODS = ("minmax", "percentile")


class QuantizedRuntime(Runtime):
    """The int8 model: `predict(x)` like gc.load's Runtime; `graph` is the quantized IR, `weights` its
    int8/int32 (and any remaining float) weights, `save(path)` writes a .gcnn file."""

    def __init__(self, graph, weights, meta, backend=None):
        super().__init__(graph, weights, meta, backend)
        self.weights = weights

    def save(self, path):
        """Write the quantized graph and weights as a .gcnn artifact (atomically); gc.load runs it."""
        atomic_write_bytes(path, artifact_bytes(self.graph, self.weights, self.meta))


def calibrate(graph, weights, batches, names, method="minmax", percentile=99.99) -> dict:
    """value name -> ValueRange of each of `names` over the float graph run on `batches` (input arrays,
    one per call) with the NumPy backend."""
    from .compiler import compile as compile_graph
    probe = graph.rebuild(graph.nodes, outputs=[graph.value(n) for n in names])
    fn = compile_graph(probe, backend="numpy", params=weights, passes="none")
    seen = {n: [] for n in names}
    for batch in batches:
        outs = fn(batch)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for n, a in zip(names, outs):
            # minmax needs only the extremes; percentile keeps the values
            seen[n].append(a if method == "percentile" else np.array([a.min(), a.max()]))
    return {n: range_from_values(seen[n], method, percentile) for n in names}


def quantize(model, calibration_x, method="minmax", percentile=99.99, calibration_images=None, batch_size=256,
             backend=None) -> QuantizedRuntime:
    """An int8 version of a trained single-input `model` (gc.Model / Sequential).

    calibration_x: representative inputs (any form model.predict accepts); the first `calibration_images`
    of them (all when None) are run through the float model. method: 'minmax' (observed extremes) or
    'percentile' (the `percentile`-th percentile at each end). Activations become per-tensor u8,
    weights per-channel symmetric i8, biases i32. backend: where the quantized graph runs ('llvm' by default:
    native int8 kernels, bit-identical to 'numpy')."""
    if method not in METHODS:
        raise GraphcnnError(f"quantize: method must be one of {', '.join(METHODS)}, got {method!r}")
    if len(model.inputs) != 1:
        raise GraphcnnError(f"quantize: model {model.name!r} has {len(model.inputs)} inputs; one is supported")
    if calibration_images is not None and (not isinstance(calibration_images, int)
                                           or isinstance(calibration_images, bool) or calibration_images < 1):
        raise GraphcnnError(f"quantize: calibration_images must be a positive int, got {calibration_images!r}")
    (x,) = model._prepare_x(calibration_x, "quantize").values()
    x = x[:calibration_images]
    graph, weights = prepare_for_quantization(model.inference_graph(), model.get_weights())
    names = calibration_targets(graph, weights)
    if not names:
        raise GraphcnnError(f"quantize: model {model.name!r} has no conv2d/dense layer to quantize")
    ranges = calibrate(graph, weights, (x[s:s + batch_size] for s in range(0, len(x), batch_size)),
                       names, method, percentile)
    qgraph, qweights = quantize_graph(graph, weights, ranges)
    # the float model's config travels along for its preprocess (the CLI scales images by it); gc.load_model
    # refuses the file (its graph is not the config's float graph): a quantized model is inference only
    meta = {"model": model.config(),
            "quantization": {"scheme": "int8 post-training: u8 per-tensor activations, i8 per-channel "
                                       "symmetric weights, i32 biases",
                             "method": method, "percentile": percentile if method == "percentile" else None,
                             "calibration_images": int(len(x))}}
    return QuantizedRuntime(qgraph, qweights, meta, backend)
