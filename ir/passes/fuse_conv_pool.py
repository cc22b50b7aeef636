"""Fuse a convolution and the max pool that reads it into one node (inference graphs).

    conv2d(x, w[, b[, skip]], activation=A) -> max_pool2d(., pool=P, stride=P, padding=valid)
        =>   conv2d_max_pool(x, w[, b[, skip]], activation=A, pool=P)

Runs after fuse_bias_activation, so the conv already carries its bias, residual and activation. The
kernel keeps the conv's tile in registers, applies the epilogue and takes each window's maximum before
the one store, so the conv output (4x the pooled size for 2x2 windows) is never written nor read back:
the stem of a CNN is store-bound, and the inference arena loses its largest value.

Fusion rule (as fuse_bias_activation's): the conv output has exactly one use, the pool, and is not a
graph output or update source; the pool is float, non-overlapping (stride = window) and unpadded, with a
window of at most MAX_WINDOW pixels (one register tile row group per window); the conv has groups 1.
Training graphs are left alone (their conv outputs feed relu_grad and max_pool2d_grad too). The fused
node takes the pool's output value, so downstream references stay valid."""
from __future__ import annotations

from ..graph import Graph, Node
from ..ops import get_op
from .rewrite import sole_reader

# pixels of one pool window the fused kernel keeps in one register tile (2x2, 1x2, 2x1 ...)
MAX_WINDOW = 4


def _fusable_pool(pool: Node) -> bool:
    if pool.op != "max_pool2d":
        return False
    a = pool.attrs
    window = tuple(a["pool"])
    return (tuple(a["stride"]) == window
            and all(p == 0 for side in a["padding"] for p in side)
            and window[0] * window[1] <= MAX_WINDOW and pool.inputs[0].dtype == "f32")


def fuse_conv_pool(g: Graph) -> Graph:
    """Replace each conv2d -> max_pool2d pair of the module doc by one conv2d_max_pool node.

    The result carries `fused` (as fuse_bias_activation's) and a `pass_note` with the count."""
    if g.updates:
        out = g.rebuild(g.nodes)
        out.pass_note = "(training graph: not fused)"
        return out
    users = g.users()
    results = {v.name for v in g.result_values()}
    replace: dict[int, Node] = {}       # id(pool node) -> fused node
    absorbed: set[int] = set()          # ids of the fused conv nodes
    for n in g.nodes:
        if n.op != "conv2d" or n.attrs.get("groups", 1) != 1 or n.inputs[0].dtype != "f32":
            continue
        pool = sole_reader(n.outputs[0], users, results)
        if pool is None or not _fusable_pool(pool):
            continue
        attrs = get_op("conv2d_max_pool").check(n.inputs, dict(n.attrs, pool=pool.attrs["pool"]))
        replace[id(pool)] = Node("conv2d_max_pool", list(n.inputs), attrs, pool.outputs)
        absorbed.add(id(n))
    nodes = [replace.get(id(n), n) for n in g.nodes if id(n) not in absorbed]
    out = g.rebuild(nodes)
    out.fused = list(getattr(g, "fused", [])) + [n.outputs[0].name for n in replace.values()]
    out.pass_note = f"(fused conv2d+max_pool2d x{len(replace)})" if replace else ""
    return out
