"""The graph IR: plain classes. A Graph holds inputs, params, constants, nodes (in a valid
topological order), outputs and `updates` (param -> new value, how a training step writes state).

Values are named ('%name' in the text form) and unique within a graph, also after NFKC normalisation
(ir.types.check_name is the naming rule, checked here for every graph and value name, whichever entry
point built the graph). A node's name is the name of its first output.
"""
from __future__ import annotations

import numpy as np

from .types import IRError, TensorType, check_name, dtype_name, name_key

LEAF_KINDS = ("input", "param", "const")


class Value:
    """A typed SSA value: a graph input, a param (state), a constant, or a node output."""
    __slots__ = ("graph", "name", "type", "kind", "producer", "index")

    def __init__(self, graph, name, type_, kind, producer=None, index=0):
        self.graph, self.name, self.type, self.kind = graph, name, type_, kind
        self.producer, self.index = producer, index

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype

    def __repr__(self):
        return f"%{self.name}: {self.type}"


class Node:
    """One op application: op name, input values, validated attributes, output values."""
    __slots__ = ("op", "inputs", "attrs", "outputs")

    def __init__(self, op, inputs, attrs, outputs):
        self.op, self.inputs, self.attrs, self.outputs = op, list(inputs), dict(attrs), list(outputs)

    @property
    def name(self) -> str:
        return self.outputs[0].name

    @property
    def opdef(self):
        from .ops import get_op
        return get_op(self.op)

    def __repr__(self):
        return f"Node({self.op}: {', '.join(v.name for v in self.inputs)} -> " \
               f"{', '.join(v.name for v in self.outputs)})"


class Graph:
    """A dataflow graph of tensor ops. Build with input/param/const and graphcnn.ops / ir.ops.emit."""

    def __init__(self, name: str = "graph"):
        self.name = name          # checked by the setter below
        self.inputs: list[Value] = []
        self.params: list[Value] = []
        self.consts: dict[str, np.ndarray] = {}
        self.const_values: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.updates: dict[str, Value] = {}
        self._values: dict[str, Value] = {}
        self._keys: dict[str, str] = {}       # name_key(name) -> name, to refuse look-alike names
        self._counter = 0

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, name: str) -> None:
        self._name = check_name(name, "graph name")

    # -- construction -------------------------------------------------------------------------
    def _new_value(self, name, type_, kind, producer=None, index=0) -> Value:
        check_name(name, f"graph {self.name!r}: value name")
        if name in self._values:
            raise IRError(f"graph {self.name!r} already has a value named {name!r}")
        key = name_key(name)
        if key in self._keys:
            raise IRError(f"graph {self.name!r}: value name {name!r} is the same name as {self._keys[key]!r} "
                          f"after Unicode NFKC normalisation (as Python compares identifiers); rename one")
        v = Value(self, name, type_, kind, producer, index)
        self._values[name] = v
        self._keys[key] = name
        return v

    def fresh_name(self, hint: str = "v") -> str:
        """A value name not yet used in this graph (nor a look-alike of one)."""
        while True:
            self._counter += 1
            name = f"{hint}{self._counter}" if not hint[-1:].isdigit() else f"{hint}_{self._counter}"
            if name_key(name) not in self._keys:
                return name

    def input(self, name: str, shape, dtype="f32") -> Value:
        """Declare a graph input (fed per call). shape[0] may be None for the dynamic batch."""
        v = self._new_value(name, TensorType(tuple(shape), dtype_name(dtype) if not isinstance(dtype, str) else dtype), "input")
        self.inputs.append(v)
        return v

    def param(self, name: str, shape, dtype="f32") -> Value:
        """Declare a parameter: state the executable owns (weights, optimizer slots)."""
        v = self._new_value(name, TensorType(tuple(shape), dtype if isinstance(dtype, str) else dtype_name(dtype)), "param")
        self.params.append(v)
        return v

    def const(self, name: str, array) -> Value:
        """Embed a constant array in the graph."""
        arr = np.asarray(array)
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        elif arr.dtype.kind in "iub" and arr.dtype not in (np.int8, np.uint8):
            arr = arr.astype(np.int32)      # int8/uint8 are types of their own (quantized tensors)
        if name is None:
            name = self.fresh_name("c")
        v = self._new_value(name, TensorType(arr.shape, dtype_name(arr.dtype)), "const")
        self.consts[name] = arr
        self.const_values.append(v)
        return v

    def add_node(self, op: str, inputs, attrs=None, out_names=None) -> list[Value]:
        """Append a node: validates attributes and infers output types via the op registry."""
        from .ops import get_op
        opdef = get_op(op)
        inputs = list(inputs)
        for v in inputs:
            if not isinstance(v, Value):
                raise IRError(f"{op}: inputs must be graph values, got {type(v).__name__}")
            if v.graph is not self:
                raise IRError(f"{op}: input %{v.name} belongs to graph {v.graph.name!r}, not {self.name!r}")
        try:
            attrs = opdef.check(inputs, dict(attrs or {}))
            types = opdef.infer([v.type for v in inputs], attrs)
        except IRError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError,
                RecursionError) as e:
            # an op's check that assumed a well-typed attribute (e.g. axis=None, padding={}): the input is
            # bad, not the compiler, and whoever supplied it (user, JSON, text) needs to hear which node
            raise IRError(f"{op}: malformed attribute or input ({type(e).__name__}: {e})") from None
        node = Node(op, inputs, attrs, [])
        if out_names is None:
            first = self.fresh_name(op)
            out_names = [first] + [f"{first}.{i}" for i in range(1, len(types))]
        if len(out_names) != len(types):
            raise IRError(f"{op}: produces {len(types)} outputs, got {len(out_names)} names")
        node.outputs = [self._new_value(n, t, "node", node, i) for i, (n, t) in enumerate(zip(out_names, types))]
        self.nodes.append(node)
        return node.outputs

    def output(self, *values: Value) -> None:
        """Mark values as graph outputs (in order)."""
        for v in values:
            if not isinstance(v, Value) or v.graph is not self:
                raise IRError(f"graph {self.name!r}: output must be a value of this graph, got {v!r}")
            self.outputs.append(v)

    def set_update(self, param: Value, new_value: Value) -> None:
        """After each call, `param` takes `new_value` (a training step's state write)."""
        if param.kind != "param":
            raise IRError(f"update target %{param.name} is a {param.kind}, not a param")
        if param.type != new_value.type:
            raise IRError(f"update of %{param.name}: type {new_value.type} != {param.type}")
        self.updates[param.name] = new_value

    # -- queries ------------------------------------------------------------------------------
    def value(self, name: str) -> Value:
        """The value called `name`; IRError if there is none (or `name` is not a str)."""
        if not isinstance(name, str):
            raise IRError(f"graph {self.name!r}: a value reference must be a name (str), got {type(name).__name__}")
        try:
            return self._values[name]
        except KeyError:
            raise IRError(f"graph {self.name!r} has no value %{name}") from None

    def has_value(self, name: str) -> bool:
        return name in self._values

    @property
    def leaves(self) -> list[Value]:
        return self.inputs + self.params + self.const_values

    def values(self):
        """Every value: leaves first, then node outputs in node order."""
        yield from self.leaves
        for n in self.nodes:
            yield from n.outputs

    def users(self) -> dict[str, list[Node]]:
        """value name -> nodes that read it (in node order)."""
        use: dict[str, list[Node]] = {v.name: [] for v in self.values()}
        for n in self.nodes:
            for v in n.inputs:
                use[v.name].append(n)
        return use

    def result_values(self) -> list[Value]:
        """Values that must survive the call: outputs and update sources."""
        return list(self.outputs) + list(self.updates.values())

    # -- transformation support ------------------------------------------------------------------
    def copy(self, name: str | None = None) -> "Graph":
        """A deep structural copy (constant arrays shared, they are never mutated)."""
        g = Graph(name or self.name)
        g._counter = self._counter
        for v in self.inputs:
            g.input(v.name, v.shape, v.dtype)
        for v in self.params:
            g.param(v.name, v.shape, v.dtype)
        for v in self.const_values:
            g.const(v.name, self.consts[v.name])
        for n in self.nodes:
            node = Node(n.op, [g._values[v.name] for v in n.inputs], n.attrs, [])
            node.outputs = [g._new_value(v.name, v.type, "node", node, i) for i, v in enumerate(n.outputs)]
            g.nodes.append(node)
        g.outputs = [g._values[v.name] for v in self.outputs]
        g.updates = {k: g._values[v.name] for k, v in self.updates.items()}
        return g

    def rebuild(self, nodes, outputs=None, updates=None, keep_leaves=None) -> "Graph":
        """A new graph with the same leaves and the given nodes (from this or another graph whose
        value names are compatible). Used by passes that drop or replace nodes."""
        g = Graph(self.name)
        g._counter = self._counter
        keep = keep_leaves
        for v in self.inputs:
            g.input(v.name, v.shape, v.dtype)
        for v in self.params:
            g.param(v.name, v.shape, v.dtype)
        for v in self.const_values:
            if keep is None or v.name in keep:
                g.const(v.name, self.consts[v.name])
        for n in nodes:
            node = Node(n.op, [g._values[v.name] for v in n.inputs], n.attrs, [])
            node.outputs = [g._new_value(v.name, v.type, "node", node, i) for i, v in enumerate(n.outputs)]
            g.nodes.append(node)
        g.outputs = [g._values[v.name] for v in (self.outputs if outputs is None else outputs)]
        ups = self.updates if updates is None else updates
        g.updates = {k: g._values[v.name] for k, v in ups.items()}
        return g

    # -- views --------------------------------------------------------------------------------
    def to_networkx(self):
        """A networkx DiGraph: one vertex per value and per node (bipartite), for algorithms/drawing."""
        import networkx as nx
        G = nx.DiGraph(name=self.name)
        for v in self.leaves:
            G.add_node(v.name, kind=v.kind, type=str(v.type))
        for n in self.nodes:
            nid = "node:" + n.name
            G.add_node(nid, kind="op", op=n.op, attrs=n.attrs)
            for v in n.inputs:
                G.add_edge(v.name, nid)
            for v in n.outputs:
                G.add_node(v.name, kind="value", type=str(v.type))
                G.add_edge(nid, v.name)
        return G

    def __str__(self) -> str:
        from .text import print_graph
        return print_graph(self)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        from .text import print_graph
        if print_graph(self, inline_consts=False) != print_graph(other, inline_consts=False):
            return False
        return self.consts.keys() == other.consts.keys() and all(
            self.consts[k].dtype == other.consts[k].dtype and np.array_equal(self.consts[k], other.consts[k])
            for k in self.consts)

    __hash__ = None
