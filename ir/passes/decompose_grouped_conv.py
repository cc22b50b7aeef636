"""Split grouped convolutions into what every backend already has.

    conv2d(x, w, b?, groups=G)  =>  concat([conv2d(slice(x, group k), slice(w, group k), slice(b, k)?)
                                            for k in 0..G-1], axis=3)
    conv2d(x, w, b?, groups=C) with one input channel per group  =>  depthwise_conv2d(x, reshape(w))

A decomposition instead of grouped kernels: the per-group convs reuse the tuned conv2d kernels of both
backends (GEMM-based, efficient once a group has a few channels), and the common extreme (groups ==
channels, MobileNet-style) becomes the memory-bound depthwise kernel, whose output channel order
(c * multiplier + m) is exactly the grouped conv's (group c, filter m). Each per-group conv keeps the
fused activation (elementwise, so it commutes with the concat). The last node of a replacement reuses
the grouped conv's output value, so every reader stays valid. Runs after autodiff (conv2d's gradient rule
handles groups itself) and before fusion."""
from __future__ import annotations

from ..graph import Graph
from .rewrite import NodeBuilder


def decompose_grouped_conv(g: Graph) -> Graph:
    """Replace every conv2d with groups > 1 (see module doc)."""
    nb = NodeBuilder(g)
    split = depthwise = 0
    for n in g.nodes:
        groups = n.attrs.get("groups", 1) if n.op == "conv2d" else 1
        if groups == 1:
            nb.nodes.append(n)
            continue
        x, w, *bias = n.inputs
        kh, kw, cg, f = w.shape
        geom = {k: n.attrs[k] for k in ("stride", "padding", "dilation", "activation")}
        if cg == 1:
            wd = nb.emit1("reshape", w, shape=(kh, kw, groups, f // groups))
            nb.emit1("depthwise_conv2d", x, wd, *bias, outputs=n.outputs, **geom)
            depthwise += 1
            continue
        fg = f // groups
        parts = []
        for k in range(groups):
            xk = nb.emit1("slice", x, axis=3, start=k * cg, stop=(k + 1) * cg)
            wk = nb.emit1("slice", w, axis=3, start=k * fg, stop=(k + 1) * fg)
            bk = [nb.emit1("slice", bias[0], axis=0, start=k * fg, stop=(k + 1) * fg)] if bias else []
            parts.append(nb.emit1("conv2d", xk, wk, *bk, **geom))
        nb.emit1("concat", *parts, outputs=n.outputs, axis=3)
        split += 1
    out = g.rebuild(nb.nodes)
    notes = [f"{split} split into groups"] * bool(split) + [f"{depthwise} to depthwise"] * bool(depthwise)
    out.pass_note = f"(grouped conv2d: {', '.join(notes)})" if notes else ""
    return out
