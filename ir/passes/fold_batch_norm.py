"""Fold inference batch normalization into the preceding conv2d / depthwise_conv2d / dense (what ONNX
Runtime and TVM do):

    batch_norm(conv(x, w) [+ b], gamma, beta, mean, var)
        =>  conv(x, w * s, (b - mean) * s + beta),   s = batch_norm_scale(gamma, var) = gamma / sqrt(var + eps)

(s scales the conv's output channels: the last axis of w, or (C, multiplier) for depthwise). A following
activation then fuses into the conv as usual (fuse_bias_activation runs later).

Where the folded weights are computed: by small param-only nodes (batch_norm_scale, mul, sub, add) placed
before the conv. Their cost is O(weights) per call, N*OH*OW times less than the conv itself; when the
weights and statistics are constants, fold_constants (which runs after this pass) evaluates them at compile
time, so an artifact with constant weights carries the folded ones. Params stay params: the executable
owns them, and a model whose moving statistics change after compilation (training, then predict) keeps
giving the right answer.

Folded only when the conv's result (and the bias_add's) has exactly one use, is not a graph result, the
conv has no fused activation yet, and the BN's per-channel inputs are leaves (so the new nodes can sit
where the conv was)."""
from __future__ import annotations

from ..graph import Graph
from .rewrite import NodeBuilder

FOLDABLE = ("conv2d", "depthwise_conv2d", "dense")


def _sole_reader(v, users, results):
    readers = users[v.name]
    return readers[0] if len(readers) == 1 and v.name not in results else None


def fold_batch_norm(g: Graph) -> Graph:
    """Fold every foldable batch_norm (see module doc) into its producer."""
    users = g.users()
    results = {v.name for v in g.result_values()}
    plans = {}                   # id(conv node) -> (conv, bias_add or None, batch_norm)
    for n in g.nodes:
        if n.op not in FOLDABLE or n.attrs["activation"] != "linear" or len(n.inputs) > 3:
            continue                     # (a conv with a residual: BN scales the skip value too)
        bias_add, reader = None, _sole_reader(n.outputs[0], users, results)
        if reader is not None and reader.op == "bias_add" and len(n.inputs) == 2 \
                and reader.inputs[0] is n.outputs[0]:
            bias_add, reader = reader, _sole_reader(reader.outputs[0], users, results)
        if reader is None or reader.op != "batch_norm" or reader.inputs[0] is not (bias_add or n).outputs[0]:
            continue
        if any(v.producer is not None for v in reader.inputs[1:]) or \
                (bias_add is not None and bias_add.inputs[1].producer is not None):
            continue
        plans[id(n)] = (n, bias_add, reader)
    dropped = {id(part) for _, ba, bn in plans.values() for part in (ba, bn) if part is not None}
    nb = NodeBuilder(g)
    for n in g.nodes:
        if id(n) in dropped:
            continue
        if id(n) not in plans:
            nb.nodes.append(n)
            continue
        conv, bias_add, bn = plans[id(n)]
        x, w, *bias = conv.inputs
        if bias_add is not None:
            bias = [bias_add.inputs[1]]
        gamma, beta, mean, var = bn.inputs[1:]
        s = nb.emit1("batch_norm_scale", gamma, var, epsilon=bn.attrs["epsilon"])
        s_w = nb.emit1("reshape", s, shape=w.shape[2:]) if conv.op == "depthwise_conv2d" else s
        w_folded = nb.emit1("mul", w, s_w)
        shift = nb.emit1("sub", bias[0], mean) if bias else nb.emit1("neg", mean)
        b_folded = nb.emit1("add", nb.emit1("mul", shift, s), beta)
        nb.emit1(conv.op, x, w_folded, b_folded, outputs=bn.outputs, **conv.attrs)
    out = g.rebuild(nb.nodes)
    out.pass_note = f"(folded {len(plans)} batch_norm nodes)" if plans else ""
    return out
