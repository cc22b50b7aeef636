"""Symbolic tensors and the layer graph behind gc.Model (Keras's functional API).

Calling a layer on symbolic tensors (`Conv2D(8, 3)(Input((28, 28, 1)))`) records a LayerNode and returns
a new SymbolicTensor whose shape is checked right away: the layer is emitted into a scratch ir.Graph, so
shape errors come from the op registry's shape rules (one mechanism) and name the layer at build time.

A model's layer graph is every node between its inputs and outputs, in creation order (a topological
order: a node's inputs exist before it). `layer_graph_config` / `nodes_from_config` turn it into the
JSON-able description stored in .gcnn files and back, refusing unknown, cyclic or disconnected graphs.
"""
from __future__ import annotations

import itertools
from collections import namedtuple

import ir

from .errors import GraphcnnError, LayerError

_serial = itertools.count()

WeightSpec = namedtuple("WeightSpec", "shape init trainable", defaults=(True,))
WeightSpec.__doc__ = "A layer weight: shape, init(rng) -> array, trainable (False: moving statistics)."


class SymbolicTensor:
    """A layer's output before any data flows: `shape` includes the batch (None), like a Keras tensor."""
    __slots__ = ("shape", "node", "index")

    def __init__(self, shape, node, index=0):
        self.shape, self.node, self.index = tuple(shape), node, index

    @property
    def layer(self):
        return self.node.layer

    def __repr__(self):
        return f"<SymbolicTensor shape={self.shape} from {describe(self.node.layer)}>"


class LayerNode:
    """One call of a layer: its input tensors (`is_list`: the layer was given a list) and output tensor."""
    __slots__ = ("layer", "inputs", "is_list", "output", "serial")

    def __init__(self, layer, inputs, is_list, out_shape):
        self.layer, self.inputs, self.is_list = layer, list(inputs), is_list
        self.output = SymbolicTensor(out_shape, self)
        self.serial = next(_serial)


def describe(layer) -> str:
    """'layer 'conv2d_1' (Conv2D)', or 'a Conv2D layer' before the model names it."""
    kind = type(layer).__name__
    return f"layer {layer.name!r} ({kind})" if layer.name else f"a {kind} layer"


def as_tensor(obj, who):
    """A SymbolicTensor from a tensor or an Input layer; anything else is refused with the reason."""
    from .layers import Input
    if isinstance(obj, SymbolicTensor):
        return obj
    if isinstance(obj, Input):
        return obj.output
    if isinstance(obj, ir.graph.Value):
        raise LayerError(f"{who}: was called on %{obj.name}, a value of the gc.Graph {obj.graph.name!r}; layers are "
                         f"called on symbolic tensors (layers.Input(...) or another layer's output) - for graphs "
                         f"built with gc.Graph use gc.ops")
    raise LayerError(f"{who}: expected a symbolic tensor (layers.Input(...) or a layer's output), got "
                     f"{type(obj).__name__}; to run a model on data use model.predict(x)")


def call_layer(layer, inputs) -> SymbolicTensor:
    """Record `layer(inputs)` and return its output tensor (shapes checked now, errors name the layer)."""
    from .layers import Input
    who = describe(layer)
    if isinstance(layer, Input):
        raise LayerError(f"{who}: an Input is not callable; use it as the first tensor: x = layers.Input(shape)")
    is_list = isinstance(inputs, (list, tuple))
    if is_list and not inputs:
        raise LayerError(f"{who}: called on an empty list")
    tensors = [as_tensor(t, who) for t in (inputs if is_list else [inputs])]
    shapes = [t.shape[1:] for t in tensors]
    out_shape = infer_output_shape(layer, shapes if is_list else shapes[0])
    return LayerNode(layer, tensors, is_list, out_shape).output


class ShapeContext:
    """The build context of a scratch graph (inference mode), used only to learn a layer's output shape."""
    training = False

    def __init__(self, graph, weights):
        self.graph, self._weights = graph, weights

    def weight(self, layer, suffix):
        return self._weights[suffix]

    def step(self):
        return self.graph.param("step", ())

    def layer_seed(self, layer):
        return 0

    def add_update(self, param, value):
        pass


def infer_output_shape(layer, shape) -> tuple:
    """Per-sample input shape(s) -> the batched output shape, by emitting the layer into a scratch graph.
    A layer called again (shared weights) must see the input shape it was first built for."""
    who = describe(layer)
    first = getattr(layer, "_built_input_shape", None)
    if first is not None and first != shape:
        raise LayerError(f"{who}: was built for input shape {_fmt_shapes(first)} and is now called on "
                         f"{_fmt_shapes(shape)}; a layer shares its weights across calls, so create a new layer "
                         f"for the new shape")
    g = ir.Graph("shape_check")
    many = isinstance(shape, list)
    xs = [g.input(f"in{i}", (None,) + tuple(s)) for i, s in enumerate(shape if many else [shape])]
    specs = layer.weight_specs(shape)
    weights = {k: g.param(f"w/{k}", spec.shape) for k, spec in specs.items()}
    try:
        y = layer.call(ShapeContext(g, weights), xs if many else xs[0])
    except ir.IRError as e:
        raise LayerError(f"{who} called on {_fmt_shapes(shape)}: {e}") from None
    layer._built_input_shape = shape
    return tuple(y.shape)


def _fmt_shapes(shape):
    if isinstance(shape, list):
        return "[" + ", ".join(_fmt_shapes(s) for s in shape) + "]"
    return "(None, " + ", ".join(map(str, shape)) + ")"


def collect_nodes(inputs, outputs, model_name):
    """The LayerNodes between `inputs` and `outputs`, in creation order. Refuses outputs that need an Input
    not listed in `inputs` (a disconnected graph), inputs no output uses, and outputs that are inputs."""
    input_ids = {id(t) for t in inputs}
    found, stack, seen = [t.node for t in inputs], [t.node for t in outputs], {id(t.node) for t in inputs}
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        found.append(node)
        for t in node.inputs:
            if id(t) in input_ids:
                continue
            if not t.node.inputs:             # an Input that is not one of the model's inputs
                raise GraphcnnError(
                    f"model {model_name!r}: the graph is disconnected: {describe(node.layer)} reads the tensor of "
                    f"{describe(t.node.layer)} with shape {t.shape}, which is not among the model's inputs; add it "
                    f"to gc.Model(inputs=[...]) or build that branch from one of the model's inputs")
            stack.append(t.node)
    used = set()
    for node in found:
        used.update(id(t) for t in node.inputs)
    used.update(id(t) for t in outputs)
    for t in inputs:
        if id(t) not in used:
            raise GraphcnnError(f"model {model_name!r}: no output depends on input {describe(t.node.layer)} with "
                                f"shape {t.shape}; remove it from the inputs or connect it")
    return sorted(found, key=lambda n: n.serial)


def layer_graph_config(layers, nodes, inputs, outputs) -> dict:
    """JSON-able description of a layer graph: each layer once (class, name, config) and each call
    ('nodes': layer name + inbound [layer name, call index] pairs), the model's inputs and outputs."""
    calls = {}          # id(node) -> (layer name, call index within this model)
    node_docs = []
    for node in nodes:
        k = sum(1 for key in calls.values() if key[0] == node.layer.name)
        calls[id(node)] = (node.layer.name, k)
        if node.inputs:
            node_docs.append({"layer": node.layer.name, "inbound": [list(calls[id(t.node)]) for t in node.inputs],
                              "list": node.is_list})
    return {"layers": [layer_config(layer) for layer in layers], "nodes": node_docs,
            "inputs": [list(calls[id(t.node)]) for t in inputs], "outputs": [list(calls[id(t.node)]) for t in outputs]}


def layer_config(layer) -> dict:
    from .layers import Input
    doc = {"class": type(layer).__name__, "name": layer.name, "config": layer.config()}
    if not isinstance(layer, Input):
        doc["input_shape"] = list(layer.input_shape) if layer.input_shape else None
    else:
        doc["input_shape"] = list(layer.shape)
    return doc


def layer_from_config(doc, where):
    """One layer from its config (classes from layers.LAYER_TYPES only; never arbitrary code)."""
    from . import layers as L
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise GraphcnnError(f"{where}: a layer entry must be an object with a string 'name', got {str(doc)[:80]}")
    cls = L.LAYER_TYPES.get(doc.get("class"))
    if cls is None:
        raise GraphcnnError(f"{where}: layer {doc['name']!r} has an unknown class {str(doc.get('class'))[:40]!r}")
    kwargs = doc.get("config") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise GraphcnnError(f"{where}: layer {doc['name']!r} has a malformed config")
    try:
        if cls is L.Input:
            return L.Input(doc.get("input_shape"), name=doc["name"])
        shape = doc.get("input_shape")
        return cls(**kwargs, name=doc["name"], **({"input_shape": shape} if shape else {}))
    except (TypeError, ValueError, KeyError) as e:
        raise GraphcnnError(f"{where}: layer {doc['name']!r} ({cls.__name__}) has a bad configuration: {e}") from None


def nodes_from_config(doc, where):
    """Rebuild (inputs, outputs) tensors from layer_graph_config's description, calling the layers again in
    the saved order (so every shape is re-checked). Refuses duplicate names, unknown references and cycles."""
    from .layers import Input
    if not isinstance(doc.get("layers"), list) or not isinstance(doc.get("nodes"), list):
        raise GraphcnnError(f"{where}: the model config has no 'layers'/'nodes' lists")
    layers = {}
    for d in doc["layers"]:
        layer = layer_from_config(d, where)
        if layer.name in layers:
            raise GraphcnnError(f"{where}: two layers are named {layer.name!r}")
        layers[layer.name] = layer
    produced = {}      # (layer name, call index) -> tensor
    for name, layer in layers.items():
        if isinstance(layer, Input):
            produced[(name, 0)] = layer.output
    pending, counts = [], {}       # (node entry, its (layer name, call index))
    for d in doc["nodes"]:
        if not isinstance(d, dict) or d.get("layer") not in layers or isinstance(layers[d["layer"]], Input) \
                or not isinstance(d.get("inbound"), list):
            raise GraphcnnError(f"{where}: bad node entry {str(d)[:80]}")
        pending.append((d, (d["layer"], counts.get(d["layer"], 0))))
        counts[d["layer"]] = pending[-1][1][1] + 1
    # the entries are in creation order, a topological order: calling them in that order rebuilds the same
    # graph (node order included); an entry whose inputs do not exist yet is a cycle or a dangling reference
    for d, k in pending:
        refs = [_key(r, where) for r in d["inbound"]]
        missing = [r for r in refs if r not in produced]
        if missing:
            raise GraphcnnError(f"{where}: the layer graph is cyclic or refers to missing layers: call {list(k)} "
                                f"of layer {k[0]!r} reads {[list(r) for r in missing]}, which no earlier entry "
                                f"produces")
        ins = [produced[r] for r in refs]
        produced[k] = layers[d["layer"]](ins if d.get("list") else ins[0])

    def tensors(refs, what):
        if not isinstance(refs, list) or not refs:
            raise GraphcnnError(f"{where}: the model config's {what} must be a non-empty list")
        out = []
        for r in refs:
            k = _key(r, where)
            if k not in produced:
                raise GraphcnnError(f"{where}: the model config's {what} refer to an unknown layer call {r!r}")
            out.append(produced[k])
        return out
    return tensors(doc.get("inputs"), "inputs"), tensors(doc.get("outputs"), "outputs")


def _key(ref, where):
    if not (isinstance(ref, list) and len(ref) == 2 and isinstance(ref[0], str) and isinstance(ref[1], int)):
        raise GraphcnnError(f"{where}: bad layer reference {str(ref)[:60]} (expected [layer name, call index])")
    return (ref[0], ref[1])
