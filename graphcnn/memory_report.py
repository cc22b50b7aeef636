"""`graphcnn show MODEL --memory`: the memory plan of a model's inference (or training) graph as a text
table, JSON (MemoryPlan.to_json) or an SVG drawn here (one rectangle per value: x = the schedule steps
it is live, y = its bytes in the arena)."""
from __future__ import annotations

import json
import sys
from html import escape

from .errors import GraphcnnError

EXIT_OK = 0


def training_graph(model):
    """The optimized training-step graph of a model, as Model._executable('train') builds it (Keras
    defaults - Adam, sparse categorical cross-entropy - if the model is not compiled)."""
    from ir.passes import run_pipeline
    if model.compiled is None:
        model.compile()
    model._dropout_seed = model.seed
    return run_pipeline(model.training_graph(), "training").graph


def planned_graph(graph, args):
    """The graph whose plan to show: `graph` through the inference pipeline, or the training graph."""
    from ir.passes import run_pipeline
    if getattr(args, "training", False):
        from .cli import load_model_source
        return training_graph(load_model_source(args.model))
    return run_pipeline(graph, "inference").graph


def show_memory(graph, args, out=None) -> int:
    """Print the memory plan of `graph` (args: batch, format text|json|svg, training, model)."""
    out = out or sys.stdout
    batch = getattr(args, "batch", 128)
    if not isinstance(batch, int) or batch < 1:
        raise GraphcnnError(f"--batch must be an integer >= 1, got {batch!r}")
    fmt = getattr(args, "format", "text")
    if fmt not in ("text", "json", "svg"):
        raise GraphcnnError(f"--memory prints text, json or svg, not {fmt!r}")
    g = planned_graph(graph, args)
    plan = g.memory_plan
    if fmt == "json":
        out.write(json.dumps(plan.to_json(batch), indent=1) + "\n")
    elif fmt == "svg":
        out.write(plan_svg(g, plan, batch))
    else:
        out.write(plan_text(g, plan, batch))
    return EXIT_OK


def _ratio(a, b):
    return f"{a / b:.3f}" if b else "-"


def plan_text(g, plan, batch: int) -> str:
    """A summary (arena, lower bound, naive, state) and one row per arena value."""
    arena, lower, naive = plan.arena_bytes(batch), plan.lower_bound_bytes(batch), plan.naive_bytes(batch)
    region = batch * max(plan.live_batched, default=0) + max(plan.live_fixed, default=0)
    lines = [
        f"memory plan of {g.name!r} ({len(g.nodes)} nodes) at batch {batch}",
        f"  arena         {arena:>14,} bytes = {batch} x {plan.batched_bytes:,} per sample + {plan.fixed_bytes:,} fixed",
        f"  lower bound   {lower:>14,} bytes   (largest live set; arena / bound = {_ratio(arena, lower)})",
        f"  region bound  {region:>14,} bytes   (per-sample peak x {batch} + fixed peak: the best for one plan "
        f"serving every batch)",
        f"  naive         {naive:>14,} bytes   (one buffer per node output; arena / naive = {_ratio(arena, naive)})",
        f"  state         {plan.state_bytes:>14,} bytes   (params: weights, optimizer slots; not in the arena)",
        f"  constants     {plan.const_bytes:>14,} bytes",
        f"  placement     {plan.strategy}",
        f"  fused         {', '.join(plan.fused) if plan.fused else '-'}",
        "",
    ]
    vals = plan.values.values()
    w = max([len(v.name) for v in vals] + [5])
    lines.append(f"  {'value':<{w}}  {'type':<22} {'steps':>9} {'offset':>12} {'bytes':>12}  storage")
    types = {v.name: v.type for n in g.nodes for v in n.outputs}
    for v in sorted(vals, key=lambda v: (v.first_use, v.name)):
        shared = "" if v.storage == v.name else f"in place of %{v.storage}"
        lines.append(f"  {v.name:<{w}}  {str(types[v.name]):<22} {v.first_use:>4}-{v.last_use:<4} "
                     f"{plan.offset(v.name, batch):>12,} {v.bytes(batch):>12,}  {shared}")
    if plan.aliases:
        lines.append("")
        lines.append("  views (no buffer): " + ", ".join(f"%{k} -> %{r}" for k, r in plan.aliases.items()))
    return "\n".join(lines) + "\n"


PALETTE = ("#8ecae6", "#ffb703", "#90be6d", "#f28482", "#b5a6e8", "#f6bd60", "#84a59d", "#e5989b")


def plan_svg(g, plan, batch: int, width: int = 960, height: int = 560) -> str:
    """The plan as an SVG: a rectangle per value over its live steps and arena bytes, labelled."""
    left, right, top, bottom = 90, 20, 40, 110
    steps = max(len(g.nodes), 1)
    arena = max(plan.arena_bytes(batch), 1)
    sx = (width - left - right) / steps
    sy = (height - top - bottom) / arena
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="Helvetica,Arial,sans-serif" font-size="10">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="18" font-size="13">{escape(g.name)}: arena {plan.arena_bytes(batch):,} bytes '
             f'at batch {batch} (lower bound {plan.lower_bound_bytes(batch):,}, naive '
             f'{plan.naive_bytes(batch):,})</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             f'fill="#f4f4f4" stroke="#999"/>']
    colors = {}
    for v in plan.values.values():
        color = colors.setdefault(v.storage, PALETTE[len(colors) % len(PALETTE)])
        x, w = left + v.first_use * sx, (v.last_use - v.first_use + 1) * sx
        y, h = top + plan.offset(v.name, batch) * sy, max(v.bytes(batch) * sy, 0.5)
        tip = f"%{v.name}: {v.bytes(batch):,} bytes at offset {plan.offset(v.name, batch):,}, steps {v.first_use}-{v.last_use}"
        parts.append(f'<rect x="{x:.1f}" y="{y:.2f}" width="{w:.1f}" height="{h:.2f}" fill="{color}" '
                     f'stroke="#333" stroke-width="0.5"><title>{escape(tip)}</title></rect>')
        if h >= 11 and w >= 6 * min(len(v.name), 12):
            parts.append(f'<text x="{x + 3:.1f}" y="{y + min(h / 2 + 3, 12):.1f}">{escape(v.name[:24])}</text>')
    if plan.fixed_bytes and plan.batched_bytes:
        yb = top + batch * plan.batched_bytes * sy
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yb:.1f}" y2="{yb:.1f}" stroke="#c00" '
                     f'stroke-dasharray="4 3"/><text x="{width - right - 4}" y="{yb - 3:.1f}" text-anchor="end" '
                     f'fill="#c00">fixed region</text>')
    for frac in (0, 0.25, 0.5, 0.75, 1):
        y = top + frac * (height - top - bottom)
        parts.append(f'<text x="{left - 6}" y="{y + 3:.1f}" text-anchor="end">{int(frac * arena):,}</text>')
    for i, n in enumerate(g.nodes):
        x = left + (i + 0.5) * sx
        parts.append(f'<text transform="translate({x:.1f},{height - bottom + 8}) rotate(60)" font-size="9">'
                     f'{i} {escape(n.op)}</text>')
    parts.append(f'<text x="{left + (width - left - right) / 2:.0f}" y="{height - 6}" text-anchor="middle">'
                 f'schedule step</text>')
    parts.append(f'<text transform="translate(14,{top + (height - top - bottom) / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">arena offset (bytes)</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
