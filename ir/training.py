"""Training graph = forward + loss + backward + optimizer update, one graph, so one call of the
compiled function runs one whole training step."""
from __future__ import annotations

import numpy as np

from .autodiff import append_backward
from .passes.batch_coupling import training_split_blockers
from .passes.dce import eliminate_dead_code
from .graph import Graph
from .ops import emit, get_op, in_place_update_ops
from .ops.optim import check_setting
from .types import IRError

STEP = "step"   # f32 scalar param: number of completed steps (dropout counter, Adam's t - 1)
LR = "lr"       # f32 scalar: the learning rate of this step (an input fed every call, or a constant)

# optimizer name -> (update op, default learning rate). Every other setting and its default is an
# attribute of the update op (ir/ops/optim.py); AdamW is "adam" with weight_decay.
OPTIMIZERS = {"sgd": ("sgd_update", 0.01), "adam": ("adam_update", 1e-3), "rmsprop": ("rmsprop_update", 1e-3)}


def optimizer_config(optimizer: str, config: dict | None = None, owner: str | None = None) -> dict:
    """The validated, complete settings of `optimizer` (defaults filled in): the one validation of
    optimizer settings, shared by both backends and by graphcnn.optimizers.

    `lr` is a number (a fixed rate, the default when absent) or None: the rate is then the training
    graph's input LR, fed every call (what learning-rate schedules use). Errors are IRErrors naming
    `owner` (default: the optimizer) and the setting."""
    if optimizer not in OPTIMIZERS:
        raise IRError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    owner = owner or optimizer
    op_name, default_lr = OPTIMIZERS[optimizer]
    defaults = dict(get_op(op_name).attrs, lr=default_lr)
    config = dict(config or {})
    unknown = set(config) - set(defaults)
    if unknown:
        raise IRError(f"{owner}: unknown setting(s) {sorted(unknown)}; known: {sorted(defaults)}")
    cfg = dict(defaults, **config)
    return {k: (None if k == "lr" and v is None else check_setting(owner, k, v)) for k, v in cfg.items()}


def optimizer_slots(name: str, config: dict) -> tuple:
    """Names of the per-weight state slots an optimizer keeps (params `<weight>/<slot>`)."""
    cfg = optimizer_config(name, config)
    cfg.pop("lr")
    return get_op(OPTIMIZERS[name][0]).slot_names(cfg)


def make_training_graph(forward: Graph, loss: str, optimizer: str = "adam", config: dict | None = None,
                        trainable: list[str] | None = None) -> Graph:
    """Extend a copy of `forward` (which computes scalar value `loss`) with gradients of every
    trainable param and the optimizer's in-place updates. New params: `step` (if absent) and the
    optimizer slots `<weight>/<slot>`, zero-initialised by the caller.

    The learning rate: config `lr` = None makes it the scalar f32 graph input LR ("lr"), fed every call
    (so a schedule never recompiles); a number (or no `lr`: the optimizer's default) makes it a
    constant named LR — the fixed-rate form of the string API, `("adam", {"lr": 0.01})`."""
    cfg = optimizer_config(optimizer, config)
    op_name = OPTIMIZERS[optimizer][0]
    g = forward.copy()
    if g.has_value(LR):
        raise IRError(f"make_training_graph: graph {g.name!r} already has a value named {LR!r} "
                      "(reserved for the learning rate)")
    rate = cfg.pop("lr")
    lr = g.input(LR, ()) if rate is None else g.const(LR, np.float32(rate))
    step = g.value(STEP) if g.has_value(STEP) else g.param(STEP, ())
    weights = [p for p in g.params if p.name != STEP and (trainable is None or p.name in trainable)]
    grads = append_backward(g, g.value(loss), weights)
    t1 = emit("add", step, g.const(g.fresh_name("one"), np.float32(1.0)))
    opdef = get_op(op_name)
    for w in weights:
        slots = [g.param(f"{w.name}/{s}", w.shape) for s in opdef.slot_names(cfg)]
        scalars = {"t": t1}                       # Adam's step number after this step
        operands = [w, grads[w.name], lr] + [scalars[n] for n in opdef.scalars] + slots
        outs = g.add_node(op_name, operands, cfg)
        for target, new in zip([w] + slots, outs):
            g.set_update(target, new)
    g.set_update(step, t1)
    return eliminate_dead_code(g)


UPDATE_OPS = tuple(in_place_update_ops())


def split_training_step(g: Graph, whole_chunks: bool = False) -> tuple:
    """Split a training graph into (gradients, update) for data-parallel execution.

    gradients: the forward + backward part; outputs = g's outputs followed by every weight gradient the
    optimizer reads (named as in g); no state updates, so it can run on several batch chunks at once.
    update: inputs = those gradients (then any input of g the updates read, e.g. LR), params = g's params; the optimizer nodes (and what they need that is
    not a gradient, e.g. the step increment); carries all of g's updates.
    Gradients of chunk means combine as sum_i (n_i / n) * grad_i, the losses likewise. That is exact only
    when the forward part is per-sample up to the losses' batch means (ir.passes.batch_coupling); a graph
    that couples samples otherwise is refused (IRError) and must run as one unsplit step.

    whole_chunks=True accepts such a graph for callers that accept chunk-local semantics (data-parallel
    ranks with per-rank BatchNormalization statistics): the state updates that are not the optimizer's
    (moving statistics) then stay in the gradients graph, as its updates, computed from its chunk."""
    blockers = training_split_blockers(g)
    if blockers and not whole_chunks:
        raise IRError(f"split_training_step: graph {g.name!r} cannot be split across batch chunks: "
                      + "; ".join(blockers))
    opt_nodes = [n for n in g.nodes if n.op in UPDATE_OPS]
    if not opt_nodes:
        raise IRError(f"split_training_step: graph {g.name!r} has no optimizer updates")
    grad_vals, seen = [], set()
    for n in opt_nodes:
        if n.inputs[1].name not in seen:
            seen.add(n.inputs[1].name)
            grad_vals.append(n.inputs[1])
    keep = [n for n in g.nodes if n.op not in UPDATE_OPS]
    optimizer_out = {o.name for n in opt_nodes for o in n.outputs}
    chunk_updates = {k: v for k, v in g.updates.items()
                     if whole_chunks and k != STEP and v.name not in optimizer_out}
    grads_g = eliminate_dead_code(g.rebuild(keep, outputs=list(g.outputs) + grad_vals, updates=chunk_updates))
    grads_g.name = g.name + "_grads"
    # update part: walk back from the update sources, stopping at gradients
    needed, stack = set(), [v.name for k, v in g.updates.items() if k not in chunk_updates]
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
    for v in g.inputs:          # per-call scalars the update reads (the learning rate LR)
        if v.name in needed:
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
        if k not in chunk_updates:
            up.set_update(up.value(k), up.value(v.name))
    return grads_g, up
