"""Memory planning: a schedule, liveness, and one arena holding every intermediate value.

Regions. Params (weights, optimizer slots, the step counter), constants and graph inputs are not in
the arena: they are state or arguments the executable owns (`state_bytes` reports the params). Every
other value a kernel writes lives in the arena, weight gradients included (they are short-lived, so
sharing the arena lets them reuse dead activations' space).

Batch sizes. One plan serves every batch: values whose first dimension is the batch are planned per
sample (offsets and sizes in bytes per sample, multiplied by N at run time) in the *batched region*;
the other values go to a *fixed region* placed after it. So at batch N

    offset(batched value) = N * per_sample_offset
    offset(fixed value)   = N * batched_bytes + fixed_offset,    arena_bytes = N * batched_bytes + fixed_bytes

and two values that never overlap per sample never overlap at any N. Offsets and sizes are rounded up
to ALIGN bytes (the LLVM backend's vector alignment).

Aliasing. A view op (reshape, flatten) has no buffer: its output is its input's buffer, whose lifetime
grows to the view's last use. An op with `inplace = i` writes its output into input i's buffer when
that buffer dies at this node, has the same size and is an arena buffer (never a param, input or
constant). Optimizer updates write their param inputs in place and have no arena buffer.

Schedule. The given node order, or a greedy topological order (run the ready node that grows the live
set least) when that gives a smaller arena; the returned graph's nodes are in the chosen order.

Placement (TFLite's arena planner, XLA's heap simulator): for a given order of buffers, put each in the
best-fitting gap among the already placed buffers whose lifetimes overlap it. Several orders are tried
(size, start, size x duration, end); the smallest region wins. The lower bound is the largest live set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..graph import Graph
from ..ops import get_op, in_place_update_ops, view_ops
from ..types import DTYPES

ALIGN = 64
VIEW_OPS = view_ops()
UPDATE_OPS = in_place_update_ops()   # output k overwrites input UPDATE_OPS[op][k]


def align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass
class PlannedValue:
    """Where one node output lives. Batched values: offset and nbytes are per sample."""
    name: str
    batched: bool
    offset: int
    nbytes: int
    first_use: int             # schedule step that writes it
    last_use: int              # last step that reads it (or a view of it); the last step for results
    storage: str               # the value whose buffer this is (itself, unless it reuses an input in place)
    dtype: str

    def bytes(self, batch: int) -> int:
        return self.nbytes * batch if self.batched else self.nbytes


@dataclass
class MemoryPlan:
    """The plan for one graph: schedule (node names), per-value placement, region sizes, live-set sizes."""
    schedule: list
    values: dict                    # name -> PlannedValue (every value a kernel writes into the arena)
    aliases: dict                   # view value -> value whose buffer it is
    batched_bytes: int              # per-sample size of the batched region
    fixed_bytes: int
    live_batched: list              # per step: per-sample bytes live (unaligned)
    live_fixed: list
    naive_batched: int              # every node output its own buffer
    naive_fixed: int
    state_bytes: int                # params: weights, optimizer slots, step counter
    const_bytes: int
    strategy: str = ""              # which placement order won
    fused: list = field(default_factory=list)

    # -- sizes ------------------------------------------------------------------------------------
    def arena_bytes(self, batch: int) -> int:
        return batch * self.batched_bytes + self.fixed_bytes

    def naive_bytes(self, batch: int) -> int:
        return batch * self.naive_batched + self.naive_fixed

    def lower_bound_bytes(self, batch: int) -> int:
        """Largest sum of simultaneously live bytes over the schedule (no placement can do better)."""
        return max((batch * b + f for b, f in zip(self.live_batched, self.live_fixed)), default=0)

    def offset(self, name: str, batch: int) -> int:
        v = self.values[name]
        return batch * v.offset if v.batched else batch * self.batched_bytes + v.offset

    def offsets(self, batch: int) -> dict:
        """value name -> byte offset in the arena at this batch size."""
        return {k: self.offset(k, batch) for k in self.values}

    def to_json(self, batch: int) -> dict:
        return {"arena_bytes": self.arena_bytes(batch), "naive_bytes": self.naive_bytes(batch),
                "lower_bound_bytes": self.lower_bound_bytes(batch), "fused": list(self.fused),
                "values": [{"name": v.name, "offset": self.offset(v.name, batch), "bytes": v.bytes(batch),
                            "first_use": v.first_use, "last_use": v.last_use} for v in self.values.values()]}

    # -- backends ---------------------------------------------------------------------------------
    def llvm_slots(self) -> dict:
        """name -> (per_sample, fixed): the value's offset is batch * per_sample + fixed."""
        return {k: (v.offset, 0) if v.batched else (self.batched_bytes, v.offset) for k, v in self.values.items()}

    def llvm_arena(self) -> tuple:
        return self.batched_bytes, self.fixed_bytes

    def numpy_allocator(self, batch: int, arena=None, views=None):
        """`buf(value_name, shape)` -> a view into `arena` (a uint8 array of at least arena_bytes(batch);
        a fresh one if None) for this batch size. `views`: a dict kept with the arena so repeated calls
        reuse the views. The backends own the arenas (backends/executable.py ArenaCache: one per thread
        and batch size, so concurrent calls never share buffers)."""
        if arena is None:
            arena = np.empty(-(-self.arena_bytes(batch) // 4), np.float32).view(np.uint8)
        if arena.nbytes < self.arena_bytes(batch):
            raise ValueError(f"arena of {arena.nbytes} bytes is smaller than the plan's {self.arena_bytes(batch)}")
        views = {} if views is None else views

        def buf(name, shape):
            view = views.get(name)
            if view is None:
                if name not in self.values:
                    raise ValueError(f"memory plan has no buffer for %{name}: the plan belongs to another graph")
                v, start = self.values[name], self.offset(name, batch)
                dt = DTYPES[v.dtype]
                if int(np.prod(shape)) * dt.itemsize != v.bytes(batch):
                    raise ValueError(f"buf(%{name}, {shape}): plan has {v.bytes(batch)} bytes at batch {batch}")
                view = views[name] = arena[start:start + v.bytes(batch)].view(dt).reshape(shape)
            return view
        return buf


# -- the pass -----------------------------------------------------------------------------------------
def plan_memory(g: Graph) -> Graph:
    """Return a copy of g (nodes in the chosen schedule) with `g.memory_plan` attached."""
    candidates = []
    for graph in (g.copy(), g.rebuild(greedy_schedule(g))):
        graph.fused = list(getattr(g, "fused", []))
        plan = build_plan(graph)
        candidates.append(((plan.batched_bytes, plan.fixed_bytes), graph, plan))
    # the greedy order only when it shrinks the arena (per-sample bytes first, then fixed bytes)
    _, out, plan = min(candidates, key=lambda c: c[0])
    plan.strategy = f"{'given' if out is candidates[0][1] else 'greedy'} order; {plan.strategy}"
    from .verify_plan import verify_plan
    verify_plan(out, plan)                       # a planner bug must fail here, not corrupt results
    out.memory_plan = plan
    n = 128
    out.pass_note = (f"(arena {plan.arena_bytes(n) / 1e6:.2f} MB at batch {n}, lower bound "
                     f"{plan.lower_bound_bytes(n) / 1e6:.2f}, naive {plan.naive_bytes(n) / 1e6:.2f}; {plan.strategy})")
    return out


def greedy_schedule(g: Graph) -> list:
    """A topological order that, among ready nodes, runs first the one that grows the live set least
    (per-sample bytes, then fixed bytes; ties keep the given order). An optimizer update overwrites
    its params, so it waits for every other reader of them."""
    root, _ = liveness(g)
    results = {root[v.name] for v in g.result_values()}
    producer = {v.name: i for i, n in enumerate(g.nodes) for v in n.outputs}
    readers = {}                                 # buffer root -> indices of nodes reading it
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            readers.setdefault(root[v.name], set()).add(i)
    deps = []
    for i, n in enumerate(g.nodes):
        d = {producer[v.name] for v in n.inputs if v.name in producer}
        for k in UPDATE_OPS.get(n.op, ())[:len(n.outputs)]:
            d |= readers[root[n.inputs[k].name]] - {i}
        deps.append(d)
    pending = {r: set(users) for r, users in readers.items()}   # buffer root -> readers not yet run

    def growth(i):
        """(per-sample, fixed) bytes the live set grows by when node i runs now; then i (the tie-break)."""
        n, delta = g.nodes[i], [0, 0]
        if n.op not in VIEW_OPS:
            for v in n.outputs:
                if root[v.name] == v.name:
                    delta[not v.type.batched] += v.type.nbytes(1)
        for r in {root[v.name] for v in n.inputs}:
            if r in producer and r not in results and pending[r] == {i}:
                t = g.value(r).type
                delta[not t.batched] -= t.nbytes(1)
        return delta, i

    done, order = set(), []
    while len(order) < len(g.nodes):
        i = min((i for i in range(len(g.nodes)) if i not in done and deps[i] <= done), key=growth)
        done.add(i)
        order.append(g.nodes[i])
        for r in {root[v.name] for v in g.nodes[i].inputs}:
            pending[r].discard(i)
    return order


def _storage_roots(g: Graph):
    """value name -> name of the value owning its buffer (views follow their input; leaves own theirs)."""
    root = {v.name: v.name for v in g.leaves}
    for n in g.nodes:
        for k, v in enumerate(n.outputs):
            if n.op in VIEW_OPS:
                root[v.name] = root[n.inputs[0].name]
            elif n.op in UPDATE_OPS:
                root[v.name] = root[n.inputs[UPDATE_OPS[n.op][k]].name]
            else:
                root[v.name] = v.name
    return root


def liveness(g: Graph):
    """(root map, {buffer root: [first, last]}) for node-output buffers, views folded into their root."""
    root, end = _storage_roots(g), max(len(g.nodes) - 1, 0)
    live = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            if root[v.name] in live:
                live[root[v.name]][1] = i
        for v in n.outputs:
            if root[v.name] == v.name:
                live[v.name] = [i, i]
    for v in g.result_values():
        if root[v.name] in live:
            live[root[v.name]][1] = end
    return root, live


def build_plan(g: Graph) -> MemoryPlan:
    """Liveness, in-place reuse and best-fit placement for g's node order."""
    root, live = liveness(g)
    results = {root[v.name] for v in g.result_values()}
    vals = {v.name: v for n in g.nodes for v in n.outputs}
    storage = {name: name for name in live}      # buffer -> the buffer it reuses in place (transitively)
    for i, n in enumerate(g.nodes):
        if n.op in VIEW_OPS:
            continue
        for idx in get_op(n.op).inplace_inputs():
            if idx >= len(n.inputs):
                continue
            x, y = n.inputs[idx], n.outputs[0]
            src = root[x.name]
            if (src in live and src not in results and live[src][1] == i and vals[src].type.batched == y.type.batched
                    and vals[src].type.nbytes(1) == y.type.nbytes(1)
                    and all(u is x or root[u.name] != src for u in n.inputs)):
                storage[y.name] = storage[src]
                break
    groups = {}                                  # shared buffer -> [first, last]
    for name, (first, last) in live.items():
        s = groups.setdefault(storage[name], [first, last])
        s[0], s[1] = min(s[0], first), max(s[1], last)
    steps = max(len(g.nodes), 1)
    live_b, live_f = [0] * steps, [0] * steps
    for name, (first, last) in groups.items():
        t = vals[name].type
        for s in range(first, last + 1):
            (live_b if t.batched else live_f)[s] += t.nbytes(1)
    offsets, sizes, strategy = {}, [0, 0], []
    for region, batched in enumerate((True, False)):
        bufs = [(name, align(vals[name].type.nbytes(1)), first, last)
                for name, (first, last) in groups.items() if vals[name].type.batched == batched]
        best = min((_place(bufs, key) + (label,) for label, key in ORDERS.items()), key=lambda r: r[0])
        sizes[region] = best[0]
        offsets.update(best[1])
        strategy.append(f"{'batched' if batched else 'fixed'}: {best[2]}")
    planned = {name: PlannedValue(name, vals[name].type.batched, offsets[storage[name]], vals[name].type.nbytes(1),
                                  first, last, storage[name], vals[name].type.dtype)
               for name, (first, last) in live.items()}
    naive = [sum(v.type.nbytes(1) for v in vals.values() if v.name in live and v.type.batched == b) for b in (1, 0)]
    return MemoryPlan(
        schedule=[n.name for n in g.nodes], values=planned,
        aliases={k: r for k, r in root.items() if k != r and r in live},
        batched_bytes=sizes[0], fixed_bytes=sizes[1], live_batched=live_b, live_fixed=live_f,
        naive_batched=naive[0], naive_fixed=naive[1],
        state_bytes=sum(p.type.nbytes(1) for p in g.params),
        const_bytes=sum(int(a.nbytes) for a in g.consts.values()),
        strategy=", ".join(strategy), fused=list(getattr(g, "fused", [])))


# buffer orders tried by the placer: (name, size, first, last) -> sort key
ORDERS = {
    "size": lambda b: (-b[1], b[2]),
    "start": lambda b: (b[2], -b[1]),
    "size*duration": lambda b: (-b[1] * (b[3] - b[2] + 1), b[2]),
    "end": lambda b: (-b[3], -b[1]),
}


def _place(bufs, key):
    """Best-fit: each buffer (in `key` order) goes to the smallest gap between already placed buffers
    whose lifetimes overlap its own, or on top of them. Returns (region size, {name: offset})."""
    placed, offsets, top = [], {}, 0
    for name, size, first, last in sorted(bufs, key=key):
        busy = sorted((o, o + s) for o, s, f, l in placed if f <= last and first <= l)
        best, end = None, 0
        for lo, hi in busy:
            if lo - end >= size and (best is None or lo - end < best[1]):
                best = (end, lo - end)
            end = max(end, hi)
        offsets[name] = best[0] if best else end
        placed.append((offsets[name], size, first, last))
        top = max(top, offsets[name] + size)
    return top, offsets
