"""Batch-coupling analysis: may a batch be split into chunks that run independently?

A graph is *per-sample* when the output for sample i is a function of sample i alone (and of values that
do not depend on the batch): then running chunks of the batch separately and concatenating gives the
unsplit result exactly, whatever the number of chunks. This analysis proves it from the ops instead of
assuming it from the shapes: a node *couples* the batch when

- its op says so (`Op.couples_batch(node)`: matmul reducing over the batch axis, sum_to / bias_add_grad
  over the batch, losses, batch statistics ...), or
- it reads a batched value and produces no batched output (it must have reduced over the batch; an op that
  forgot to override couples_batch is caught here rather than trusted).

A graph without coupling nodes is per-sample (`is_per_sample`).

A training step is split differently (ir.training.split_training_step): each chunk computes its loss mean
and the gradients of that mean, and the chunks combine with weights n_i / n. That is exact when the
forward part (everything the graph's outputs and its losses depend on) is per-sample up to the losses'
batch means (`Op.batch_mean`), and the loss values reach the outputs only through affine maps (add, sub,
neg, scale, mul by a batch-independent value), which commute with a weighted mean whose weights sum to 1.
The backward part may reduce over the batch freely: the gradient of a mean of per-sample terms is the
weighted sum of the chunk gradients. `training_split_blockers` lists what breaks that rule."""
from __future__ import annotations

from ..graph import Graph, Node
from ..ops import get_op, in_place_update_ops

# ops through which a batch mean stays a (weighted-mean-compatible) affine function of the batch means
AFFINE_OPS = frozenset({"add", "sub", "neg", "scale"})


def coupling_reason(node: Node) -> str | None:
    """Why `node` makes one sample's output depend on other samples, or None when it does not."""
    if get_op(node.op).couples_batch(node):
        return f"%{node.name} ({node.op}) combines samples of the batch"
    if any(v.type.batched for v in node.inputs) and not any(v.type.batched for v in node.outputs):
        return f"%{node.name} ({node.op}) reads batched values and drops the batch axis"
    return None


def coupling_nodes(g: Graph) -> list[tuple[Node, str]]:
    """Every node of g that couples the batch, with the reason."""
    found = []
    for n in g.nodes:
        reason = coupling_reason(n)
        if reason is not None:
            found.append((n, reason))
    return found


def is_per_sample(g: Graph) -> bool:
    """True when each sample's outputs depend on that sample alone, so any split of the batch across
    threads gives the unsplit result exactly."""
    return not coupling_nodes(g)


def _forward_nodes(g: Graph) -> list[Node]:
    """Nodes the graph's outputs or its loss values depend on (the forward part of a training graph)."""
    roots = {v.name for v in g.outputs}
    roots.update(n.outputs[0].name for n in g.nodes if get_op(n.op).batch_mean)
    needed, part = set(roots), []
    for n in reversed(g.nodes):
        if any(v.name in needed for v in n.outputs):
            needed.update(v.name for v in n.inputs)
            part.append(n)
    return part[::-1]


def training_split_blockers(g: Graph) -> list[str]:
    """Reasons why running g's gradient half on batch chunks and combining them with weights n_i / n
    would differ from one unsplit step (empty list: the split is exact up to rounding)."""
    blockers = []
    if not any(v.type.batched for v in g.inputs):
        blockers.append("no input carries the batch axis (nothing to split)")
    updated = set()                   # values computed by or from the optimizer updates
    for n in g.nodes:
        if n.op in in_place_update_ops() or any(v.name in updated for v in n.inputs):
            updated.update(v.name for v in n.outputs)
    blockers += [f"output %{v.name} is computed by the state update" for v in g.outputs if v.name in updated]
    mean_like: set[str] = set()       # values that are affine functions of batch means
    batch_dependent = {v.name for v in g.inputs if v.type.batched}
    for n in _forward_nodes(g):
        ins = [v.name for v in n.inputs]
        op = get_op(n.op)
        if any(i in mean_like for i in ins):
            others_fixed = all(i in mean_like or i not in batch_dependent for i in ins)
            affine = n.op in AFFINE_OPS or (n.op == "mul" and sum(i in mean_like for i in ins) == 1)
            if others_fixed and affine and not any(v.type.batched for v in n.outputs):
                mean_like.update(v.name for v in n.outputs)
                batch_dependent.update(v.name for v in n.outputs)
                continue
            blockers.append(f"%{n.name} ({n.op}) uses a batch mean in a way that chunk means cannot reproduce")
        elif op.batch_mean:
            mean_like.update(v.name for v in n.outputs)
        else:
            reason = coupling_reason(n)
            if reason is not None:
                blockers.append(reason)
        if any(i in batch_dependent for i in ins):
            batch_dependent.update(v.name for v in n.outputs)
    for v in g.outputs:
        if not v.type.batched and v.name in batch_dependent and v.name not in mean_like:
            blockers.append(f"output %{v.name} depends on the batch but is not a batch mean")
    return blockers
