"""gc.onnx.import_model: an ONNX file as a trainable gc.Model.

The imported graph becomes ONE layer, `OnnxGraph`, whose weights are the file's float initializers
(rearranged once for graphcnn: conv kernels HWIO, dense kernels (in, out), alpha/beta folded in). The
layer's config holds the imported graph's IR JSON (params only, no data), so a saved .gcnn rebuilds the
same layer from meta.json and takes the weights from weights.npz like any other model; loading
re-validates every op and shape through the registry (ir.serialize.graph_from_json).

Batch-normalization statistics, the constants the importer made (folded shapes, composed activations'
slopes) and weights used only through ops without a gradient rule (ConvTranspose) are non-trainable
weights: fine-tuning keeps inference-mode batch norm (the moving
statistics are used and left unchanged), which is what fine-tuning an imported classifier usually wants.
"""
from __future__ import annotations

import numpy as np

from ir.serialize import graph_from_json, graph_to_json
from ir.types import IRError

from .. import layers as L
from ..errors import LayerError
from ..functional import WeightSpec
from .importer import CHANNELS_LAST, PLAIN, Importer, OnnxImportError, load_model_proto

LAYER_NAME = "onnx"


class OnnxGraph(L.Layer):
    """A graph imported from ONNX, as one layer: `graph` is its IR JSON (inputs = the layer's inputs in
    order, params = the layer's weights by name, one output), `frozen` the params training leaves alone."""
    kind = "onnx_graph"

    def __init__(self, graph, frozen=(), name=None, input_shape=None):
        super().__init__(name, input_shape)
        try:
            g = graph_from_json(graph)
        except IRError as e:
            raise LayerError(f"OnnxGraph: the stored graph is invalid: {e}") from None
        if g.const_values:
            raise LayerError(f"OnnxGraph: the stored graph holds constants ({g.const_values[0].name!r}); "
                             f"its arrays must be params (weights)")
        if len(g.outputs) != 1:
            raise LayerError(f"OnnxGraph: the stored graph has {len(g.outputs)} outputs; a layer has one")
        if not g.inputs or any(v.shape[:1] != (None,) for v in g.inputs):
            raise LayerError("OnnxGraph: every input of the stored graph needs the dynamic batch as its first axis")
        names = {v.name for v in g.params}
        frozen = list(frozen)
        if not all(isinstance(f, str) and f in names for f in frozen):
            raise LayerError(f"OnnxGraph: frozen names {str(frozen)[:80]} are not all params of the graph")
        self.graph, self.frozen = graph, sorted(frozen)
        self._g = g

    def _check_inputs(self, shapes):
        many = len(self._g.inputs) > 1
        if many != isinstance(shapes, list):
            raise LayerError(f"{L.describe(self)}: the ONNX graph has {len(self._g.inputs)} input(s); call it on "
                             f"{'a list of that many tensors' if many else 'one tensor'}")
        shapes = shapes if many else [shapes]
        want = [tuple(v.shape[1:]) for v in self._g.inputs]
        if [tuple(s) for s in shapes] != want:
            raise LayerError(f"{L.describe(self)}: called on per-sample shape(s) {shapes}; the ONNX graph's "
                             f"inputs are {want}")

    def weight_specs(self, input_shape) -> dict:
        self._check_inputs(input_shape)
        zeros = lambda shape: (lambda rng: np.zeros(shape, np.float32))  # noqa: E731  (the file's arrays replace them)
        return {v.name: WeightSpec(tuple(v.shape), zeros(tuple(v.shape)), v.name not in self.frozen)
                for v in self._g.params}

    def call(self, ctx, x):
        """Copy the imported nodes into the model's graph: inputs -> x, params -> this layer's weights."""
        xs = x if isinstance(x, list) else [x]
        env = {v.name: xv for v, xv in zip(self._g.inputs, xs)}
        for p in self._g.params:
            env[p.name] = ctx.weight(self, p.name)
        for n in self._g.nodes:
            outs = ctx.graph.add_node(n.op, [env[v.name] for v in n.inputs], dict(n.attrs))
            for o, v in zip(n.outputs, outs):
                env[o.name] = v
        return env[self._g.outputs[0].name]


L.LAYER_TYPES.setdefault("OnnxGraph", OnnxGraph)     # so .gcnn files holding one load (model_from_config)


def _reach_outputs_differentiably(g) -> set:
    """Names of the values with a path to an output through ops that have a gradient rule: a weight
    used only through others (ConvTranspose's conv2d_grad_input) would get no gradient, so it is frozen
    instead of silently never changing."""
    from ir.ops import get_op
    live = {v.name for v in g.outputs}
    for n in reversed(g.nodes):
        if get_op(n.op).differentiable and any(o.name in live for o in n.outputs):
            live.update(v.name for v in n.inputs)
    return live


def _model_name(name):
    ok = name and name.replace("_", "a").isascii() and name.replace("_", "a").isalnum()
    return name if ok else "onnx_model"


def import_model(path_or_bytes, static_inputs=None, name=None, layout="nchw"):
    """Import an ONNX file as a trainable gc.Model: predicts like import_graph (NCHW inputs, as in the
    file), fine-tunes with compile + fit (float initializers are its weights; batch-norm statistics stay
    fixed), saves to .gcnn and compiles to .so like any model. Needs a dynamic first (batch) axis on
    every input and exactly one output.

    layout="nhwc": image inputs (rank 3 and more) are taken channels last, graphcnn's convention (what
    the CLI's image readers give); the importer's layout tracking then needs no input transpose at all."""
    from ..model import Model
    if layout not in ("nchw", "nhwc"):
        raise OnnxImportError(f"import_model: layout must be 'nchw' or 'nhwc', got {layout!r}")
    model, src = load_model_proto(path_or_bytes)
    imp = Importer(model, static_inputs, src, weights=True,
                   input_layout=CHANNELS_LAST if layout == "nhwc" else PLAIN)
    g = imp.convert()
    if len(g.outputs) != 1:
        raise OnnxImportError(f"{src}: import_model needs a model with one output, this one has "
                              f"{len(g.outputs)} ({', '.join(v.name for v in g.outputs)}); use import_graph")
    for v in g.inputs:
        if v.shape[:1] != (None,):
            raise OnnxImportError(f"{src}: input {v.name!r} has the fixed first axis {v.shape[0]}; import_model "
                                  f"needs a dynamic batch (torch.onnx.export(..., dynamic_axes={{{v.name!r}: "
                                  f"{{0: 'N'}}}})) or use import_graph")
    learnable = _reach_outputs_differentiably(g)
    frozen = sorted(p.name for p in g.params if p.name in imp.frozen or p.name not in learnable)
    layer = OnnxGraph(graph_to_json(g), frozen=frozen, name=LAYER_NAME)
    inputs = [L.Input(tuple(v.shape[1:]), name=f"input_{i}" if len(g.inputs) > 1 else "input")
              for i, v in enumerate(g.inputs)]
    out = layer([t.output for t in inputs] if len(inputs) > 1 else inputs[0].output)
    m = Model([t.output for t in inputs] if len(inputs) > 1 else inputs[0].output, out,
              name=_model_name(name or g.name))
    m.build()
    # own, writable copies: the arrays may be read-only views of the file's bytes, and training updates in place
    m.weights.update({f"{LAYER_NAME}/{k}": np.array(a, np.float32) for k, a in imp.param_arrays.items()})
    m._user_weights = True          # fit keeps the file's weights instead of initializing new ones
    return m
