"""Fold a relu's gradient into the max-pool gradient before it (training graphs).

    g = max_pool2d_grad(y, dy)  ->  relu_grad(y, g)      (y: a relu's output, the pool's input)
        =>   max_pool2d_grad(y, dy, relu_mask=True)

The backward pass of conv(relu) -> max_pool reads and writes the conv-sized gradient twice: once to
route each window's gradient to its maximum, once to mask it by (y > 0). The folded kernel masks each
share as it stores it (max_pool2d_grad's relu_mask: the same multiply as relu_grad, so the bits agree),
halving that traffic. Only windows that cannot overlap qualify (each cell gets one share); the pool
gradient must have no other reader and not be a graph result. The folded node takes relu_grad's output
value, so the gradient ops reading it are unchanged."""
from __future__ import annotations

from ..graph import Graph, Node
from ..ops import get_op
from .rewrite import sole_reader


def _disjoint(node: Node) -> bool:
    (ph, pw), (sh, sw) = node.attrs["pool"], node.attrs["stride"]
    return sh >= ph and sw >= pw


def fold_relu_grad(g: Graph) -> Graph:
    """Replace each max_pool2d_grad -> relu_grad pair of the module doc by one masked max_pool2d_grad.
    The result carries a `pass_note` with the count."""
    users = g.users()
    results = {v.name for v in g.result_values()}
    producer = {v.name: n for n in g.nodes for v in n.outputs}
    replace: dict[int, Node] = {}       # id(relu_grad node) -> the folded node
    absorbed: set[int] = set()          # ids of the folded max_pool2d_grad nodes
    for n in g.nodes:
        if n.op != "relu_grad":
            continue
        y, grad = n.inputs
        pool = producer.get(grad.name)
        if (pool is None or pool.op != "max_pool2d_grad" or pool.attrs["relu_mask"] or pool.inputs[0] is not y
                or not _disjoint(pool) or sole_reader(grad, users, results) is not n
                or id(pool) in absorbed):
            continue
        attrs = get_op("max_pool2d_grad").check(pool.inputs, dict(pool.attrs, relu_mask=True))
        replace[id(n)] = Node("max_pool2d_grad", list(pool.inputs), attrs, n.outputs)
        absorbed.add(id(pool))
    nodes = [replace.get(id(n), n) for n in g.nodes if id(n) not in absorbed]
    out = g.rebuild(nodes)
    out.pass_note = f"(folded relu_grad into max_pool2d_grad x{len(replace)})" if replace else ""
    return out
