"""Compute cross-entropy from logits instead of from softmax (or sigmoid) probabilities.

    p = softmax(z); loss = crossentropy(p, y, from_logits=False)
        =>  loss = crossentropy(z, y, from_logits=True)     [p = softmax(z) kept only if it is a result]
    p = sigmoid(z); loss = binary_crossentropy(p, y)  =>  binary_crossentropy(z, y, from_logits=True)

log-sum-exp on the logits is numerically stable and its gradient is simply softmax(z) - y, where the
probability form clips p to [1e-7, 1 - 1e-7] and differentiates through softmax. Keras (TensorFlow
backend) computes the loss from the logits in both cases too, so results agree with Keras up to that clip.
A per-sample weight operand is kept as it is.

Runs on the forward + loss graph, before autodiff (pipeline "training_forward"): the softmax output
may be read by nothing but the loss (and may be a graph output, e.g. a training step's predictions);
any other reader — a metric, or an existing gradient — leaves the pattern alone."""
from __future__ import annotations

from ..graph import Graph, Node
from ..ops import get_op

# loss op -> the activation whose probabilities it can take as logits instead
PROBABILITY_OF = {"sparse_categorical_crossentropy": "softmax", "categorical_crossentropy": "softmax",
                  "binary_crossentropy": "sigmoid"}


def fold_softmax_cross_entropy(g: Graph) -> Graph:
    """Rewrite crossentropy(softmax(z), y) to crossentropy(z, y, from_logits=True), and likewise
    binary_crossentropy(sigmoid(z), y) (see module doc).

    The loss node keeps its name. The softmax node is dropped unless its output is a graph output or
    update source."""
    users = g.users()
    results = {v.name for v in g.result_values()}
    replace: dict[int, Node] = {}
    dropped: set[int] = set()
    for n in g.nodes:
        if n.op not in PROBABILITY_OF or n.attrs["from_logits"]:
            continue
        probs, *rest = n.inputs
        sm = probs.producer
        if probs.kind != "node" or sm.op != PROBABILITY_OF[n.op]:
            continue
        if sm.op == "softmax" and sm.attrs["axis"] != probs.type.rank - 1:
            continue
        if users[probs.name] != [n]:
            continue
        logits = sm.inputs[0]
        attrs = get_op(n.op).check([logits, *rest], dict(n.attrs, from_logits=True))
        replace[id(n)] = Node(n.op, [logits, *rest], attrs, n.outputs)
        if probs.name not in results:
            dropped.add(id(sm))
    nodes = [replace.get(id(n), n) for n in g.nodes if id(n) not in dropped]
    out = g.rebuild(nodes)
    out.pass_note = f"(loss from logits: {len(replace)})" if replace else ""
    return out
