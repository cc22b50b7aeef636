"""Training graph = forward + loss + backward + optimizer update, one graph, so one call of the
compiled function runs one whole training step."""
from __future__ import annotations

import numpy as np

from .autodiff import append_backward
from .passes.dce import eliminate_dead_code
from .graph import Graph
from .ops import emit, in_place_update_ops
from .types import IRError

STEP = "step"   # f32 scalar param: number of completed steps (dropout counter, Adam's t - 1)
OPTIMIZERS = {"sgd": {"lr": 0.01, "momentum": 0.0, "nesterov": False},
              "adam": {"lr": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}}


def optimizer_slots(name: str, config: dict) -> tuple:
    """Names of the per-weight state slots an optimizer keeps."""
    if name == "adam":
        return ("m", "v")
    return ("velocity",) if config.get("momentum", 0.0) else ()


def make_training_graph(forward: Graph, loss: str, optimizer: str = "adam", config: dict | None = None,
                        trainable: list[str] | None = None) -> Graph:
    """Extend a copy of `forward` (which computes scalar value `loss`) with gradients of every
    trainable param and the optimizer's in-place updates. New params: `step` (if absent) and the
    optimizer slots `<weight>/<slot>`, zero-initialised by the caller."""
    if optimizer not in OPTIMIZERS:
        raise IRError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    cfg = dict(OPTIMIZERS[optimizer])
    unknown = set(config or {}) - set(cfg)
    if unknown:
        raise IRError(f"optimizer {optimizer}: unknown setting(s) {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(config or {})
    g = forward.copy()
    step = g.value(STEP) if g.has_value(STEP) else g.param(STEP, ())
    weights = [p for p in g.params if p.name != STEP and (trainable is None or p.name in trainable)]
    grads = append_backward(g, g.value(loss), weights)
    t1 = emit("add", step, g.const(g.fresh_name("one"), np.float32(1.0)))
    for w in weights:
        slots = [g.param(f"{w.name}/{s}", w.shape) for s in optimizer_slots(optimizer, cfg)]
        if optimizer == "adam":
            outs = emit("adam_update", w, grads[w.name], *slots, t1, **cfg)
        else:
            outs = emit("sgd_update", w, grads[w.name], *slots, **cfg)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for target, new in zip([w] + slots, outs):
            g.set_update(target, new)
    g.set_update(step, t1)
    return eliminate_dead_code(g)


UPDATE_OPS = tuple(in_place_update_ops())


def split_training_step(g: Graph) -> tuple:
    """Split a training graph into (gradients, update) for data-parallel execution.

    gradients: the forward + backward part; outputs = g's outputs followed by every weight gradient the
    optimizer reads (named as in g); no state updates, so it can run on several batch chunks at once.
    update: inputs = those gradients, params = g's params; the optimizer nodes (and what they need that is
    not a gradient, e.g. the step increment); carries all of g's updates.
    Gradients of chunk means combine as sum_i (n_i / n) * grad_i, the losses likewise."""
    opt_nodes = [n for n in g.nodes if n.op in UPDATE_OPS]
    if not opt_nodes:
        raise IRError(f"split_training_step: graph {g.name!r} has no optimizer updates")
    grad_vals, seen = [], set()
    for n in opt_nodes:
        if n.inputs[1].name not in seen:
            seen.add(n.inputs[1].name)
            grad_vals.append(n.inputs[1])
    keep = [n for n in g.nodes if n.op not in UPDATE_OPS]
    grads_g = eliminate_dead_code(g.rebuild(keep, outputs=list(g.outputs) + grad_vals, updates={}))
    grads_g.name = g.name + "_grads"
    # update part: walk back from the update sources, stopping at gradients
    needed, stack = set(), [v.name for v in g.updates.values()]
    while stack:
        name = stack.pop()
        if name in needed or name in seen:
            continue
        needed.add(name)
        v = g.value(name)
        if v.producer is not None:
            stack.extend(i.name for i in v.producer.inputs)
    up = Graph(g.name + "_update")
    for v in grad_vals:
        up.input(v.name, v.shape, v.dtype)
    for p in g.params:
        up.param(p.name, p.shape, p.dtype)
    for c in g.const_values:
        if c.name in needed:
            up.const(c.name, g.consts[c.name])
    for n in g.nodes:
        if any(o.name in needed for o in n.outputs):
            if any(i.type.batched for i in n.inputs if i.name not in seen):
                raise IRError(f"split_training_step: update node %{n.name} reads batch data")
            up.add_node(n.op, [up.value(i.name) for i in n.inputs], n.attrs, [o.name for o in n.outputs])
    for k, v in g.updates.items():
        up.set_update(up.value(k), up.value(v.name))
    return grads_g, up
