"""Compute cross-entropy from logits instead of from softmax probabilities.

    p = softmax(z); loss = crossentropy(p, y, from_logits=False)
        =>  loss = crossentropy(z, y, from_logits=True)     [p = softmax(z) kept only if it is a result]

log-sum-exp on the logits is numerically stable and its gradient is simply softmax(z) - y, where the
probability form clips p to [1e-7, 1 - 1e-7] and differentiates through softmax. Keras computes the
loss from the logits in this case too, so results agree with Keras up to that clip.

Runs on the forward + loss graph, before autodiff (pipeline "training_forward"): the softmax output
may be read by nothing but the loss (and may be a graph output, e.g. a training step's predictions);
any other reader — a metric, or an existing gradient — leaves the pattern alone."""
from __future__ import annotations

from ..graph import Graph, Node
from ..ops import get_op

CROSSENTROPY_OPS = ("sparse_categorical_crossentropy", "categorical_crossentropy")


def fold_softmax_cross_entropy(g: Graph) -> Graph:
    """Rewrite crossentropy(softmax(z), y) to crossentropy(z, y, from_logits=True) (see module doc).

    The loss node keeps its name. The softmax node is dropped unless its output is a graph output or
    update source."""
    users = g.users()
    results = {v.name for v in g.result_values()}
    replace: dict[int, Node] = {}
    dropped: set[int] = set()
    for n in g.nodes:
        if n.op not in CROSSENTROPY_OPS or n.attrs["from_logits"]:
            continue
        probs, target = n.inputs
        sm = probs.producer
        if probs.kind != "node" or sm.op != "softmax" or sm.attrs["axis"] != probs.type.rank - 1:
            continue
        if users[probs.name] != [n]:
            continue
        logits = sm.inputs[0]
        attrs = get_op(n.op).check([logits, target], dict(n.attrs, from_logits=True))
        replace[id(n)] = Node(n.op, [logits, target], attrs, n.outputs)
        if probs.name not in results:
            dropped.add(id(sm))
    nodes = [replace.get(id(n), n) for n in g.nodes if id(n) not in dropped]
    out = g.rebuild(nodes)
    out.pass_note = f"(loss from logits: {len(replace)})" if replace else ""
    return out
