"""Fuse conv2d/dense + bias_add [+ residual add] + activation into one node.

    conv2d(x, w) [-> bias_add(., b)] [-> add(., skip)] [-> any activation of the table]
        =>   conv2d(x, w, b[, skip], activation=NAME, activation_params=((param, value), ...))

and the same for dense and depthwise_conv2d, without the residual add (conv2d only: the ResNet block's
tail, conv -> BN (folded into the bias) -> add(skip) -> relu; it needs the bias, which a folded BN gives,
and groups = 1). The add is absorbed only when its other operand has exactly the conv output's type (no
broadcasting) and is not the conv's own output. The kernels add the bias and apply the activation on the accumulator before
the store, so the intermediate tensors are never written. Every activation of the table
(ir/ops/activations.py) fuses, parametric ones (leaky_relu's alpha, clip's bounds) with their parameters.

Fusion rule (ONNX Runtime conv_activation_fusion, Glow fuseActivation): a value is absorbed only when
it has exactly one use and is not a graph output or update source — otherwise someone still needs
the pre-bias / pre-activation tensor. The fused node takes the name of the last node it replaces, so
every downstream reference (including relu_grad(y, dy) in training graphs, which reads the
activation's OUTPUT) stays valid."""
from __future__ import annotations

from ..graph import Graph, Node
from ..ops import activations, get_op
from .rewrite import sole_reader

FUSABLE_OPS = ("conv2d", "dense", "depthwise_conv2d")
FUSABLE_ACTIVATIONS = tuple(name for name in activations.NAMES if name != "linear")


def fuse_bias_activation(g: Graph) -> Graph:
    """Fold bias_add and a following table activation into conv2d/dense nodes (see module doc).

    The result carries `fused`: names of all fused nodes so far (this pass's added to the input
    graph's), and a `pass_note` counting fusions per pattern."""
    users = g.users()
    results = {v.name for v in g.result_values()}
    replace: dict[int, Node] = {}      # id(last node of a chain) -> the fused node
    absorbed: set[int] = set()         # ids of the other nodes of each chain
    patterns: dict[str, int] = {}
    fused_names = []
    for n in g.nodes:
        if n.op not in FUSABLE_OPS or n.attrs["activation"] != "linear" or id(n) in absorbed:
            continue
        chain = [n]
        x, w, *bias = n.inputs
        user = sole_reader(n.outputs[0], users, results)
        if not bias and user is not None and user.op == "bias_add" and user.inputs[0] is n.outputs[0]:
            bias = [user.inputs[1]]
            chain.append(user)
            user = sole_reader(user.outputs[0], users, results)
        residual = []
        # an add has two producers: the first conv to reach it takes it (claimed), the other stays apart
        if (n.op == "conv2d" and bias and n.attrs.get("groups", 1) == 1 and user is not None
                and user.op == "add" and id(user) not in absorbed and id(user) not in replace):
            y = chain[-1].outputs[0]
            skip = [v for v in user.inputs if v is not y]
            if len(skip) == 1 and skip[0].type == y.type:
                residual = skip
                chain.append(user)
                user = sole_reader(user.outputs[0], users, results)
        activation, params = "linear", ()
        if user is not None and user.op in FUSABLE_ACTIVATIONS:
            activation = user.op
            params = activations.TABLE[user.op].normalize(user.attrs, user.op)
            chain.append(user)
        if len(chain) == 1:
            continue
        inputs = [x, w] + bias + residual
        attrs = get_op(n.op).check(inputs, dict(n.attrs, activation=activation, activation_params=params))
        last = chain[-1]
        # the fused node reuses the last node's output value: same name, same type
        replace[id(last)] = Node(n.op, inputs, attrs, last.outputs)
        absorbed.update(id(c) for c in chain[:-1])
        pattern = "+".join(c.op for c in chain)
        patterns[pattern] = patterns.get(pattern, 0) + 1
        fused_names.append(last.name)
    nodes = [replace.get(id(n), n) for n in g.nodes if id(n) not in absorbed]
    out = g.rebuild(nodes)
    out.fused = list(getattr(g, "fused", [])) + fused_names
    out.pass_note = ("(fused " + ", ".join(f"{k} x{v}" for k, v in patterns.items()) + ")") if patterns else ""
    return out
