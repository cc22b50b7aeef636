"""Dead-code elimination: drop nodes whose outputs reach no graph output or update."""
from __future__ import annotations

from ..graph import Graph


def eliminate_dead_code(g: Graph) -> Graph:
    """Keep only nodes that (transitively) feed an output or an update; drop unused constants."""
    live = {v.name for v in g.result_values()}
    kept = []
    for n in reversed(g.nodes):
        if any(v.name in live for v in n.outputs):
            kept.append(n)
            live.update(v.name for v in n.inputs)
    kept.reverse()
    out = g.rebuild(kept, keep_leaves=live)
    removed = len(g.nodes) - len(kept)
    out.pass_note = f"(removed {removed} dead nodes)" if removed else ""
    return out
