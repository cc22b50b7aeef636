"""Reverse-mode autodiff as a graph transformation. Each op's gradient rule lives with the op
(ir/ops/*: `Op.grad`); this module only walks the graph backwards and sums fan-in."""
from __future__ import annotations

from .graph import Graph, Value
from .ops import emit, get_op
from .types import IRError


def append_backward(g: Graph, loss: Value, wrt: list[Value]) -> dict[str, Value]:
    """Add gradient nodes of scalar `loss` w.r.t. `wrt` to g (in place); return name -> gradient.

    A value that `loss` does not depend on gets an explicit zero gradient (a constant)."""
    if loss.type.shape != ():
        raise IRError(f"grad: the loss %{loss.name} must be a scalar, got {loss.type}")
    wrt_names = {v.name for v in wrt}
    # forward reachability from wrt; backward reachability from loss
    depends = set(wrt_names)
    for n in g.nodes:
        if any(v.name in depends for v in n.inputs):
            depends.update(v.name for v in n.outputs)
    needed = {loss.name}
    for n in reversed(g.nodes):
        if any(v.name in needed for v in n.outputs):
            needed.update(v.name for v in n.inputs)
    grads: dict[str, Value] = {loss.name: g.const(g.fresh_name("grad_seed"), 1.0)}
    for n in reversed(list(g.nodes)):
        if not any(v.name in grads for v in n.outputs):
            continue
        if not any(v.name in depends and v.name in needed for v in n.inputs):
            continue
        douts = [grads.get(v.name) for v in n.outputs]
        if any(d is None for d in douts):
            # an unused output of a multi-output op: its gradient is zero
            douts = [d if d is not None else _zeros_like(g, v) for d, v in zip(douts, n.outputs)]
        dins = get_op(n.op).grad(n, douts)
        for v, d in zip(n.inputs, dins):
            if d is None or v.name not in depends:
                continue
            if d.type != v.type:
                raise IRError(f"grad rule of {n.op} gave {d.type} for input %{v.name}: {v.type}")
            grads[v.name] = emit("add", grads[v.name], d) if v.name in grads else d
    return {v.name: grads[v.name] if v.name in grads else _zeros_like(g, v) for v in wrt}


def _zeros_like(g: Graph, v: Value) -> Value:
    import numpy as np
    if v.type.batched:
        return emit("scale", v, factor=0.0)
    return g.const(g.fresh_name("zeros"), np.zeros(v.shape, np.float32))


def grad(g: Graph, wrt: list, loss=None) -> Graph:
    """Gradients of a scalar output. Returns a new graph whose outputs are the original outputs
    followed by d loss / d w for each w in `wrt` (values or names). `loss` defaults to the only
    scalar output of g."""
    g2 = g.copy()
    if loss is None:
        scalars = [v for v in g2.outputs if v.type.shape == ()]
        if len(scalars) != 1:
            raise IRError(f"grad: graph {g.name!r} needs exactly one scalar output to differentiate "
                          f"(found {len(scalars)}); pass loss=")
        loss = scalars[0]
    else:
        loss = g2.value(loss if isinstance(loss, str) else loss.name)
    wrt_vals = [g2.value(w if isinstance(w, str) else w.name) for w in wrt]
    for v in wrt_vals:
        if v.type.dtype != "f32":
            raise IRError(f"grad: cannot differentiate w.r.t. %{v.name} of type {v.type}")
    gr = append_backward(g2, loss, wrt_vals)
    g2.output(*[gr[v.name] for v in wrt_vals])
    from .passes.dce import eliminate_dead_code
    return eliminate_dead_code(g2)
