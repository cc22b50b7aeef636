"""Building replacement nodes for rewriting passes (fold_batch_norm, decompose_grouped_conv).

A rewrite builds a new node list and hands it to `Graph.rebuild`. `NodeBuilder` creates those nodes with
attributes validated and output types inferred by the op registry, and output names that are fresh in the
graph being rewritten, without touching that graph (passes are pure: the name counter lives in a copy)."""
from __future__ import annotations

from ..graph import Graph, Node, Value
from ..ops import get_op


def sole_reader(v: Value, users: dict, results: set) -> Node | None:
    """The only node reading v, or None when v has several readers (or none) or is a graph result: the
    fusion rule (ONNX Runtime, Glow) of every pass that absorbs a value into the node reading it."""
    readers = users[v.name]
    if v.name in results or len(readers) != 1:
        return None
    return readers[0]


class NodeBuilder:
    """Appends validated nodes to `self.nodes`; `emit` returns the new node's output values."""

    def __init__(self, g: Graph):
        self._names = g.copy()           # only its name counter and value names are used
        self.nodes: list[Node] = []

    def emit(self, op: str, inputs, attrs=None, outputs=None) -> list[Value]:
        """A node op(inputs) with `attrs`; outputs=None makes fresh values, else the given values are
        reused (the replacement keeps the name and type of the value it replaces)."""
        opdef = get_op(op)
        attrs = opdef.check(list(inputs), dict(attrs or {}))
        types = opdef.infer([v.type for v in inputs], attrs)
        node = Node(op, inputs, attrs, [])
        if outputs is None:
            first = self._names.fresh_name(op)
            outputs = [Value(None, first if i == 0 else f"{first}.{i}", t, "node", node, i)
                       for i, t in enumerate(types)]
        elif [v.type for v in outputs] != types:
            raise AssertionError(f"rewrite of %{outputs[0].name}: {op} gives {types}, the value has "
                                 f"{[v.type for v in outputs]}")
        node.outputs = list(outputs)
        self.nodes.append(node)
        return node.outputs

    def emit1(self, op: str, *inputs, outputs=None, **attrs) -> Value:
        """emit() for a single-output op, attributes as keywords."""
        return self.emit(op, list(inputs), attrs, outputs)[0]
