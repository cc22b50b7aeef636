"""Inference-time dropout removal: dropout and the other training-only ops (`identity_in_inference`:
random_flip, random_translation) are the identity outside training (Keras semantics)."""
from __future__ import annotations

from collections import Counter

from ..graph import Graph, Node
from ..ops import get_op


def drop_dropout(g: Graph) -> Graph:
    """Rewire every reader of dropout(x) (or any identity_in_inference op) to x and drop the node.

    When the dropout's output is a graph output or update source, it becomes scale(x, factor=1.0)
    (an exact copy) instead, so result names do not change. A training graph (one with updates or
    dropout_grad nodes) is returned unchanged: dropping the forward mask while the backward pass
    still applies it would be wrong."""
    if g.updates or any(n.op == "dropout_grad" for n in g.nodes):
        out = g.rebuild(g.nodes)
        out.pass_note = "(training graph: dropout kept)" if any(n.op == "dropout" for n in g.nodes) else ""
        return out
    results = {v.name for v in g.result_values()}
    subst = {}                                   # dropout output name -> its input value
    nodes: list[Node] = []
    for n in g.nodes:
        ins = [subst.get(v.name, v) for v in n.inputs]
        if get_op(n.op).identity_in_inference:
            x = ins[0]
            if n.outputs[0].name in results:
                attrs = get_op("scale").check([x], {"factor": 1.0})
                nodes.append(Node("scale", [x], attrs, n.outputs))
            else:
                subst[n.outputs[0].name] = x
            continue
        nodes.append(n if all(a is b for a, b in zip(ins, n.inputs)) else Node(n.op, ins, n.attrs, n.outputs))
    removed = Counter(n.op for n in g.nodes if get_op(n.op).identity_in_inference)
    out = g.rebuild(nodes)
    out.pass_note = f"(removed {', '.join(f'{c} {op}' for op, c in sorted(removed.items()))} nodes)" if removed else ""
    return out
