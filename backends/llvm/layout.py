"""Where each value lives for the LLVM backend: an argument slot (inputs, params, constants), an arena
offset (node outputs), or an alias of another value (views; in-place optimizer updates).

Arena offsets have the form `n * per_sample + fixed` (bytes), so one layout serves every batch size.
With a memory plan from ir/passes/plan_memory the planned offsets are used; otherwise every node
output gets its own buffer (the naive layout)."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np

from ir.ops import in_place_update_ops, view_ops

VIEW_OPS = view_ops()
INPLACE_UPDATE_OPS = in_place_update_ops()
ALIGN = 64


@dataclass(frozen=True)
class Slot:
    kind: str            # 'arg' | 'arena' | 'alias'
    index: int = 0       # arg index
    per_sample: int = 0  # arena: bytes per sample
    fixed: int = 0       # arena: fixed bytes
    target: str = ""     # alias: the value whose storage this is


@dataclass(frozen=True)
class PackedLeaf:
    """A pre-packed weight buffer: the pack_only kernel `kernel` (n_ptrs pointer arguments, then i64 n),
    called as kernel(null, sources..., null..., out, null scratch, 0), writes `nbytes` bytes to out."""
    kernel: str
    sources: tuple
    nbytes: int
    n_ptrs: int

    def call_arguments(self, source_addresses, out_address) -> list:
        nulls = self.n_ptrs - 3 - len(self.sources)
        return [None, *source_addresses, *([None] * nulls), out_address, None, 0]

    def pack(self, address: int, sources) -> np.ndarray:
        """The bytes the pack kernel at `address` (its JIT address) writes for the C-contiguous `sources`
        arrays, in a fresh 64-byte-aligned array."""
        raw = np.empty(self.nbytes + ALIGN, np.uint8)
        off = -raw.ctypes.data % ALIGN
        out = raw[off:off + self.nbytes]
        fn = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * self.n_ptrs, ctypes.c_int64)(address)
        fn(*self.call_arguments([a.ctypes.data for a in sources], out.ctypes.data))
        return out


@dataclass
class Layout:
    """Value slots plus the arena: the planned values (`arena_per_sample * n + arena_fixed` bytes), then
    the kernels' shared scratch region (`scratch_per_sample * n + scratch_fixed` bytes, 64-byte aligned:
    kernels run one after another, so one region serves them all)."""
    slots: dict
    arena_per_sample: int
    arena_fixed: int
    arg_order: list
    scratch_per_sample: int = 0
    scratch_fixed: int = 0
    # pre-packed weights (codegen.lower_graph(prepack=True)): extra leaf arguments after the graph's own,
    # name -> PackedLeaf; the caller fills each by calling its pack kernel on the source leaves
    packed: dict = field(default_factory=dict)

    def add_packed(self, kernel, sources) -> str:
        """The argument holding `sources` (leaf names) packed by `kernel` (a pack_only kernel function),
        added on first use."""
        name = f"{kernel.name}({', '.join(sources)})"
        if name not in self.packed:
            self.slots[name] = Slot("arg", index=len(self.arg_order))
            self.arg_order.append(name)
            self.packed[name] = PackedLeaf(kernel.name, tuple(sources), int(kernel.packed_bytes),
                                           len(kernel.args) - 1)
        return name

    def scratch_offset(self) -> tuple[int, int]:
        """(per-sample, fixed) byte offset of the scratch region: after the planned values, aligned."""
        return _align(self.arena_per_sample), _align(self.arena_fixed)

    def arena_bytes(self, n: int) -> int:
        """Bytes of arena (planned values + scratch) one call with batch n needs."""
        ps, fx = self.scratch_offset()
        return n * (ps + self.scratch_per_sample) + fx + self.scratch_fixed

    def resolve(self, name):
        s = self.slots[name]
        while s.kind == "alias":
            s = self.slots[s.target]
        return s


def _align(x):
    return (x + ALIGN - 1) // ALIGN * ALIGN


def compute_layout(g) -> Layout:
    """Layout for graph g, from g.memory_plan when present, else naive."""
    slots, order = {}, []
    for v in g.leaves:
        slots[v.name] = Slot("arg", index=len(order))
        order.append(v.name)
    plan = getattr(g, "memory_plan", None)
    per_sample = fixed = 0
    planned = plan.llvm_slots() if plan is not None and hasattr(plan, "llvm_slots") else None
    for n in g.nodes:
        if n.op in VIEW_OPS:
            slots[n.outputs[0].name] = Slot("alias", target=n.inputs[0].name)
            continue
        if n.op in INPLACE_UPDATE_OPS:
            for v, i in zip(n.outputs, INPLACE_UPDATE_OPS[n.op]):
                slots[v.name] = Slot("alias", target=n.inputs[i].name)
            continue
        for v in n.outputs:
            if planned is not None and v.name in planned:
                ps, fx = planned[v.name]
                slots[v.name] = Slot("arena", per_sample=ps, fixed=fx)
            elif v.type.batched:
                slots[v.name] = Slot("arena", per_sample=per_sample, fixed=-1)
                per_sample += _align(v.type.nbytes(1))
            else:
                slots[v.name] = Slot("arena", per_sample=0, fixed=fixed)
                fixed += _align(v.type.nbytes(1))
    if planned is not None:
        return Layout(slots, plan.llvm_arena()[0], plan.llvm_arena()[1], order)
    # naive: batched region first (n * per_sample), then the fixed region after it
    for k, s in slots.items():
        if s.kind == "arena" and s.fixed == -1:
            slots[k] = Slot("arena", per_sample=s.per_sample, fixed=0)
        elif s.kind == "arena" and s.per_sample == 0:
            slots[k] = Slot("arena", per_sample=per_sample, fixed=s.fixed)   # after n * batched bytes
    return Layout(slots, per_sample, fixed, order)
