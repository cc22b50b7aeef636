"""Common-subexpression elimination: merge nodes that compute the same thing.

Two nodes are the same when they have the same op, the same inputs (after earlier merges) and equal
attributes. Dropout nodes compare their `seed` like any attribute, so masks with different seeds are
never merged. Optimizer updates are never merged: each one writes its own state in place."""
from __future__ import annotations

import numpy as np

from ..graph import Graph, Node

# ops with side effects (in-place state writes in the backends): every node is distinct
NEVER_MERGE = frozenset({"adam_update", "sgd_update"})
# ops whose result does not depend on input order (IEEE + and * are commutative exactly)
COMMUTATIVE = frozenset({"add", "mul"})


def _attrs_key(attrs: dict) -> str:
    # repr keeps types apart (1 vs 1.0 vs True), which plain == / hash would conflate
    return repr(sorted(attrs.items()))


def _const_key(arr: np.ndarray):
    return (arr.dtype.str, arr.shape, arr.tobytes())


def eliminate_common_subexpressions(g: Graph) -> Graph:
    """Merge identical constants, then identical nodes (first occurrence wins; later users are
    rewired to it). A duplicate whose outputs are graph outputs or update sources is kept, so the
    graph's result names never change."""
    results = {v.name for v in g.result_values()}
    subst = {}                                    # removed value name -> the value replacing it
    first_const = {}
    for v in g.const_values:
        key = _const_key(g.consts[v.name])
        if key in first_const and v.name not in results:
            subst[v.name] = first_const[key]
        else:
            first_const.setdefault(key, v)
    seen: dict[tuple, Node] = {}
    kept: list[Node] = []
    merged = 0
    for n in g.nodes:
        ins = [subst.get(v.name, v) for v in n.inputs]
        node = n if all(a is b for a, b in zip(ins, n.inputs)) else Node(n.op, ins, n.attrs, n.outputs)
        if n.op in NEVER_MERGE:
            kept.append(node)
            continue
        names = [v.name for v in ins]
        if n.op in COMMUTATIVE:
            names.sort()
        key = (n.op, tuple(names), _attrs_key(n.attrs))
        other = seen.get(key)
        if other is not None and not any(v.name in results for v in n.outputs):
            for old, new in zip(n.outputs, other.outputs):
                subst[old.name] = new
            merged += 1
            continue
        seen.setdefault(key, node)
        kept.append(node)
    out = g.rebuild(kept, keep_leaves={v.name for v in g.const_values if v.name not in subst})
    consts_merged = sum(1 for v in g.const_values if v.name in subst)
    parts = [f"{merged} nodes" if merged else "", f"{consts_merged} constants" if consts_merged else ""]
    out.pass_note = f"(merged {' and '.join(p for p in parts if p)})" if merged or consts_merged else ""
    return out
