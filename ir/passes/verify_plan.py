"""Check a MemoryPlan against its graph, independently of how the planner computed it.

Liveness is recomputed here from the graph. Two arena values may share bytes only when their
lifetimes are disjoint, or when one legally overwrites the other in place: the writer's op declares
`inplace = i`, input i (or a view of it) is the reused value, that value dies at this node and is no
result, both have the same size and offset, and no other input of the node reads the same buffer.

Batched values are checked per sample and fixed values in the fixed region; with
offset = N * per_sample_offset (batched) or N * batched_bytes + fixed_offset (fixed) that is exact
for every batch size N >= 1.
"""
from __future__ import annotations

from ..graph import Graph
from ..ops import get_op
from ..types import IRError
from .plan_memory import UPDATE_OPS, VIEW_OPS


def _arena_lifetimes(g: Graph):
    """(root map, {arena value: (first step, last step)}, results): views extend their root's life."""
    root, life = {v.name: v.name for v in g.leaves}, {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            if root[v.name] in life:
                life[root[v.name]] = (life[root[v.name]][0], i)
        for k, v in enumerate(n.outputs):
            if n.op in VIEW_OPS:
                root[v.name] = root[n.inputs[0].name]
            elif n.op in UPDATE_OPS:
                root[v.name] = root[n.inputs[UPDATE_OPS[n.op][k]].name]
            else:
                root[v.name] = v.name
                life[v.name] = (i, i)
    results = {root[v.name] for v in g.result_values()}
    for r in results & set(life):
        life[r] = (life[r][0], max(len(g.nodes) - 1, 0))
    return root, life, results


def _legal_inplace(g, root, life, results, x, y) -> bool:
    """True when y's producer may write y over x's buffer."""
    step = life[y][0]
    node = g.nodes[step]
    if node.outputs[0].name != y or node.op in VIEW_OPS:
        return False
    for idx in get_op(node.op).inplace_inputs():
        src = node.inputs[idx] if idx < len(node.inputs) else None
        if (src is not None and root[src.name] == x and x not in results and life[x][1] == step
                and all(u is src or root[u.name] != x for u in node.inputs)):
            return True
    return False


def verify_plan(graph: Graph, plan) -> None:
    """Raise IRError (naming the values) if `plan` is not a safe memory plan for `graph`."""
    order = [n.name for n in graph.nodes]
    if list(plan.schedule) != order:
        raise IRError(f"memory plan of graph {graph.name!r}: its schedule differs from the graph's node order")
    root, life, results = _arena_lifetimes(graph)
    missing = sorted(set(life) - set(plan.values))
    extra = sorted(set(plan.values) - set(life))
    if missing or extra:
        raise IRError(f"memory plan of graph {graph.name!r}: no buffer for {missing}, "
                      f"buffers for values that need none {extra}")
    region = {True: plan.batched_bytes, False: plan.fixed_bytes}
    for name, pv in plan.values.items():
        t = graph.value(name).type
        if pv.batched != t.batched or pv.nbytes != t.nbytes(1):
            raise IRError(f"memory plan: %{name} is planned as {pv.nbytes} bytes "
                          f"{'per sample' if pv.batched else 'fixed'}, but its type is {t}")
        if pv.offset < 0 or pv.offset + pv.nbytes > region[pv.batched]:
            raise IRError(f"memory plan: %{name} at [{pv.offset}, {pv.offset + pv.nbytes}) lies outside its "
                          f"{'batched' if pv.batched else 'fixed'} region of {region[pv.batched]} bytes")
        for batch in (1, 3):
            want = batch * pv.offset if pv.batched else batch * plan.batched_bytes + pv.offset
            if plan.offset(name, batch) != want:
                raise IRError(f"memory plan: offset of %{name} at batch {batch} is {plan.offset(name, batch)}, "
                              f"expected {want}")
    names = sorted(plan.values, key=lambda k: life[k])
    for i, a in enumerate(names):
        pa, (fa, la) = plan.values[a], life[a]
        for b in names[i + 1:]:
            pb, (fb, lb) = plan.values[b], life[b]
            if fb > la:
                break                             # sorted by first use: no later value overlaps a in time
            if pa.batched != pb.batched or pb.offset >= pa.offset + pa.nbytes or pa.offset >= pb.offset + pb.nbytes:
                continue
            same_slot = pa.offset == pb.offset and pa.nbytes == pb.nbytes
            if same_slot and _legal_inplace(graph, root, life, results, a, b):
                continue
            raise IRError(f"memory plan of graph {graph.name!r}: %{a} (steps {fa}-{la}, bytes "
                          f"[{pa.offset}, {pa.offset + pa.nbytes})) and %{b} (steps {fb}-{lb}, bytes "
                          f"[{pb.offset}, {pb.offset + pb.nbytes})) {'per sample ' if pa.batched else ''}"
                          f"are live at the same time and overlap in the arena"
                          + (" (an illegal in-place reuse)" if same_slot else ""))
