"""Well-formedness checker for graphs: every stage's output is verified with this one function."""
from __future__ import annotations

from .graph import Graph
from .ops import get_op
from .types import IRError


def verify_graph(g: Graph) -> Graph:
    """Check SSA order, unique names, op validity and re-inferred types; return g or raise IRError."""
    seen = {v.name for v in g.leaves}
    if len(seen) != len(g.leaves):
        raise IRError(f"graph {g.name!r}: duplicate leaf names")
    for i, n in enumerate(g.nodes):
        where = f"graph {g.name!r}, node {i} ({n.op} -> %{n.name})"
        for v in n.inputs:
            if v.name not in seen:
                raise IRError(f"{where}: input %{v.name} is used before it is defined")
        opdef = get_op(n.op)
        try:
            attrs = opdef.check(n.inputs, n.attrs)
            types = opdef.infer([v.type for v in n.inputs], attrs)
        except IRError as e:
            raise IRError(f"{where}: {e}") from None
        if attrs != n.attrs:
            raise IRError(f"{where}: attributes are not normalized: {n.attrs} vs {attrs}")
        if [v.type for v in n.outputs] != types:
            raise IRError(f"{where}: output types {[str(v.type) for v in n.outputs]} != inferred {[str(t) for t in types]}")
        for v in n.outputs:
            if v.name in seen:
                raise IRError(f"{where}: value %{v.name} defined twice")
            if v.producer is not n:
                raise IRError(f"{where}: %{v.name} does not point back to its producer")
            seen.add(v.name)
    for v in g.outputs:
        if v.name not in seen:
            raise IRError(f"graph {g.name!r}: output %{v.name} is not defined")
    params = {p.name: p for p in g.params}
    for k, v in g.updates.items():
        if k not in params:
            raise IRError(f"graph {g.name!r}: update target %{k} is not a param")
        if v.name not in seen or params[k].type != v.type:
            raise IRError(f"graph {g.name!r}: update %{k} <- %{v.name} is undefined or mistyped")
    return g
