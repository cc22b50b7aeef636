"""Lower an optimized ir.Graph to one LLVM function:
`void gc_<name>(ptr args, i64 n, ptr arena, i64 first)`.

`first` is the index of this call's first sample within the whole batch (non-zero when a batch is split
across threads; it keeps dropout masks a function of the global element index). `args` is an array of
pointers to the leaves (inputs, params, constants, in graph order); node outputs
live in `arena` at their layout offsets (n * per_sample + fixed), followed by one scratch region that
every kernel needing scratch memory shares (sized for the largest need). Each node becomes one call to a kernel
generated for its exact shapes by backends/llvm/kernels (identical kernels are generated once). One
native call runs the whole graph — a whole training step for a training graph.

No user text reaches the LLVM IR: the module and entry symbols come from ir.types.ascii_identifier,
kernel symbols from op names and a counter, and value names are only keys of the layout."""
from __future__ import annotations

from llvmlite import ir as ll

from ir.types import ascii_identifier

from .compile_pool import PLACEHOLDER
from .kernels.builder import scratch_need
from .layout import VIEW_OPS, compute_layout

PTR = ll.PointerType()
I64 = ll.IntType(64)
I8 = ll.IntType(8)
VOID = ll.VoidType()


# int8 values (ir/ops/quant.py) and the ops whose lowering handles them (kernels/quant.py); every other op
# meeting a u8/i8 value is refused, since its float kernel would misread the bytes
QUANTIZED_DTYPES = ("i8", "u8")
QUANTIZED_LOWERINGS = frozenset({"quantize", "dequantize", "conv2d_q", "dense_q", "max_pool2d",
                                 "global_avg_pool2d", "global_max_pool2d"})


class LoweringError(NotImplementedError):
    """The LLVM backend has no lowering for an op (the caller falls back to NumPy)."""


class KernelCache:
    """Generates each distinct kernel once per module. `prepack`: the lowerings may pre-pack GEMM weights
    (lowering._weights). Without a `compiler`, kernels are internal functions of the module, but for
    `exported` ones (the weight-packing kernels the executable calls itself). With a
    compile_pool.KernelCompiler, each kernel is built in a module of its own, handed to the compiler
    (cached and compiled apart, in parallel) and only declared here, under its hashed symbol."""

    def __init__(self, module, target, prepack=False, compiler=None):
        self.module, self.target, self.fns, self.prepack = module, target, {}, prepack
        self.compiler = compiler

    def get(self, key, build, exported=False):
        if key not in self.fns:
            if self.compiler is None:
                fn = build(self.module, f"k{len(self.fns)}_{key[0]}")
                fn.linkage = "external" if exported else "internal"
            else:
                fn = self._declare_separate(key[0], build)
            self.fns[key] = fn
        return self.fns[key]

    def _declare_separate(self, family, build):
        own = ll.Module(name=family)
        body = build(own, PLACEHOLDER)
        symbol = self.compiler.submit(str(own), family)
        fn = self.module.globals.get(symbol)
        if fn is None:
            fn = ll.Function(self.module, body.function_type, name=symbol)
            for decl_arg, arg in zip(fn.args, body.args):       # lowerings read the argument names
                decl_arg.name = arg.name
        for attr in ("scratch_need", "packed_bytes"):       # what codegen and layout read off a kernel
            if hasattr(body, attr):
                setattr(fn, attr, getattr(body, attr))
        return fn


def static_count(node) -> int | None:
    """The count argument of a node's kernel when it is not the call's batch n: a node none of whose
    values has the batch axis runs over the static leading dimension of its first operand. Kernels of
    per-sample ops (conv, dense, pools, pad ...) loop over that many samples; kernels built for whole
    static shapes ignore the count. None: the node touches a batched value, pass n."""
    if not node.inputs or not node.inputs[0].shape or \
            any(v.type.batched for v in list(node.inputs) + list(node.outputs)):
        return None
    return int(node.inputs[0].shape[0])


# intra-op parallelism: node op -> the lowering of its kernel variant that computes one part of the output
# (a range of whole row tiles, so each output element keeps its reduction order); GEMMs below this many
# multiply-adds run on worker 0 only (a barrier costs more than splitting them saves)
SPLIT_MIN_MACS = 1 << 16
# the claim team entry (exported .so): every part re-packs the filters and re-pads the image, and a split
# node costs two hand-overs, so only convolutions of >= 1M multiply-adds split (mnist_cnn batch 1, 2 threads:
# 0.87x the one-thread latency with this bound, 0.96x with SPLIT_MIN_MACS)
CLAIM_SPLIT_MIN_MACS = 1 << 20


def _split_lowering(node, min_macs=SPLIT_MIN_MACS):
    from .lowering import lower_conv2d
    if node.op in ("conv2d", "conv2d_max_pool") and node.attrs.get("groups", 1) == 1:
        x, w = node.inputs[:2]
        y = node.outputs[0]
        window = node.attrs["pool"][0] * node.attrs["pool"][1] if node.op == "conv2d_max_pool" else 1
        macs = int(y.type.numel(1)) * window * int(w.shape[0] * w.shape[1] * w.shape[2])
        if macs >= min_macs and y.type.batched:
            return lambda cache, nd, target: lower_conv2d(cache, nd, target, split_rows=True)
    return None


class _Frame:
    """Addresses of a graph function's values (leaf arguments, arena slots, the scratch region), all
    computed in its entry block so any later block may use them."""

    def __init__(self, b, layout, args, n, arena, first, scratch):
        self.b, self.layout, self.n, self.arena, self.first, self.scratch = b, layout, n, arena, first, scratch
        self.args, self.addr = args, {}
        for name in layout.arg_order:
            self.address(name)

    def address(self, name):
        if name in self.addr:
            return self.addr[name]
        s = self.layout.slots[name]
        if s.kind == "arg":         # a leaf (or a packed weight buffer added while lowering: Layout.add_packed)
            a = self.b.load(self.b.gep(self.args, [ll.Constant(I64, s.index)], inbounds=True, source_etype=PTR),
                            typ=PTR)
        elif s.kind == "alias":
            a = self.address(s.target)
        else:
            b = self.b
            off = b.add(b.mul(self.n, ll.Constant(I64, s.per_sample)), ll.Constant(I64, s.fixed))
            a = b.gep(self.arena, [off], inbounds=True, source_etype=I8)
        self.addr[name] = a
        return a

    def operand(self, v):
        if isinstance(v, str):
            return self.address(v)
        if isinstance(v, tuple) and v[0] == "sample_base":     # flat index of this call's first element
            return self.b.mul(self.first, ll.Constant(I64, v[1]))
        if isinstance(v, tuple) and v[0] == "scratch":
            return self.scratch
        if isinstance(v, tuple) and v[0] == "packed":          # lowering._weights
            return self.address(self.layout.add_packed(*v[1:]))
        if isinstance(v, tuple):
            raise ValueError(f"unknown operand token {v!r}")
        return v


def _scratch_base(b, layout, n, arena):
    ps, fx = layout.scratch_offset()
    return b.gep(arena, [b.add(b.mul(n, ll.Constant(I64, ps)), ll.Constant(I64, fx))], inbounds=True, source_etype=I8)


def lower_graph(g, target, entry_name=None, team=False, prepack=False, compiler=None):
    """-> (llvmlite module, entry function name, Layout). With team=True the module also has the team entry
    `void <entry>_team(ptr team, i64 worker)` for thread_pool (layout.team_entry_name; None when the graph
    has no kernel worth splitting); team="claim": the team entry claims its work dynamically (for a pool
    defined with claim_lines >= layout.team_lines; the exported .so). With prepack=True (only for a graph without state updates, whose
    caller keeps each leaf's value between calls or re-packs it: layout.packed) GEMM kernels read their
    weights from extra leaf arguments packed once by the kernels' pack_only variants. With a
    compile_pool.KernelCompiler, kernels are separate modules given to it (KernelCache), only declared in
    the returned module."""
    if prepack and g.updates:
        raise ValueError(f"lower_graph: graph {g.name!r} updates its params; its weights cannot be pre-packed")
    from .lowering import LOWERINGS
    symbol = ascii_identifier(g.name)
    module = ll.Module(name=symbol)
    layout = compute_layout(g)
    entry_name = entry_name or f"gc_{symbol}"
    fn = ll.Function(module, ll.FunctionType(VOID, [PTR, I64, PTR, I64]), name=entry_name)
    fn.attributes.add("nounwind")
    args, n, arena, first = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    frame = _Frame(b, layout, args, n, arena, first, _scratch_base(b, layout, n, arena))
    cache = KernelCache(module, target, prepack=prepack, compiler=compiler)
    scratch_per_sample = scratch_fixed = 0
    calls = []          # (node, kernel, operands, count) in order: what the team entry replays

    for node in g.nodes:
        if node.op in VIEW_OPS:
            continue
        lower = LOWERINGS.get(node.op)
        if lower is None:
            raise LoweringError(f"LLVM backend: no lowering for op {node.op!r} (node %{node.name})")
        quantized = [v for v in node.inputs + node.outputs if v.dtype in QUANTIZED_DTYPES]
        if quantized and node.op not in QUANTIZED_LOWERINGS:
            # the float kernels would read int8 bytes as floats: refuse (gc.compile falls back) instead
            raise LoweringError(f"LLVM backend: no {quantized[0].dtype} lowering for op {node.op!r} "
                                f"(node %{node.name}, value %{quantized[0].name}: {quantized[0].type})")
        kernel, operands = lower(cache, node, target)
        count = static_count(node)
        if any(isinstance(v, tuple) and v[0] == "scratch" for v in operands):
            need = scratch_need(kernel)     # the shared scratch region, grown to the kernel's need
            if count is None:
                scratch_per_sample = max(scratch_per_sample, need.per_sample)
                scratch_fixed = max(scratch_fixed, need.fixed)
            else:                          # a static count: its per-sample need is a fixed size
                scratch_fixed = max(scratch_fixed, need.fixed + need.per_sample * count)
        calls.append((node, kernel, operands, count))
        b.call(kernel, [frame.operand(v) for v in operands] + [n if count is None else ll.Constant(I64, count)])
    layout.scratch_per_sample, layout.scratch_fixed = scratch_per_sample, scratch_fixed
    _copy_state_back(module, b, g, layout, frame)
    b.ret_void()
    layout.team_entry_name, layout.team_lines = None, 0
    min_macs = CLAIM_SPLIT_MIN_MACS if team == "claim" else SPLIT_MIN_MACS
    if team and not g.updates and any(_split_lowering(node, min_macs) for node, *_ in calls):
        if team == "claim":
            layout.team_entry_name, layout.team_lines = _define_claim_team_entry(
                module, f"{entry_name}_team", calls, layout, cache, target)
        else:
            layout.team_entry_name = _define_team_entry(module, f"{entry_name}_team", calls, layout, cache, target)
    return module, entry_name, layout


def _copy_state_back(module, b, g, layout, frame):
    """State writes that no kernel did in place (e.g. the step counter): copy the new value back."""
    for param, new in g.updates.items():
        if layout.resolve(param) != layout.resolve(new.name):
            memcpy = module.globals.get("llvm.memcpy.p0.p0.i64") or ll.Function(
                module, ll.FunctionType(VOID, [PTR, PTR, I64, ll.IntType(1)]), name="llvm.memcpy.p0.p0.i64")
            b.call(memcpy, [frame.address(param), frame.address(new.name), ll.Constant(I64, new.type.nbytes(1)),
                            ll.Constant(ll.IntType(1), 0)])


def _team_prologue(module, name, calls, layout):
    """The start shared by both team entries: `void name(ptr team, i64 worker)`, the job's fields, and two
    frames over the call's leaves and arena — `serial` with worker 0's scratch (the single-threaded
    entry's), `split` with this worker's own (thread_pool.scratch_stride: the need rounded up to 64) —
    every address computed in the entry block. -> (fn, b, team, worker, n, parts, serial, split)."""
    from . import thread_pool as tp
    fn = ll.Function(module, ll.FunctionType(VOID, [PTR, I64]), name=name)
    fn.attributes.add("nounwind")
    team, worker = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    args, n, arena = tp.team_field(b, team, tp.ARGS, PTR), tp.team_field(b, team, tp.N), tp.team_field(b, team, tp.ARENA, PTR)
    first, parts = tp.team_field(b, team, tp.FIRST), tp.team_field(b, team, tp.PARTS)
    need = b.add(b.mul(n, ll.Constant(I64, layout.scratch_per_sample)), ll.Constant(I64, layout.scratch_fixed + 63))
    stride = b.and_(need, ll.Constant(I64, -64))
    scratch0 = _scratch_base(b, layout, n, arena)
    own_scratch = b.gep(scratch0, [b.mul(worker, stride)], inbounds=True, source_etype=I8)
    serial = _Frame(b, layout, args, n, arena, first, scratch0)
    split = _Frame(b, layout, args, n, arena, first, own_scratch)
    for node, kernel, operands, count in calls:
        for v in operands:
            serial.operand(v)
            split.operand(v)
    return fn, b, team, worker, n, parts, serial, split


def _define_team_entry(module, name, calls, layout, cache, target):
    """`void name(ptr team, i64 worker)`: the graph run by every worker of a thread_pool job. Split kernels
    run their part `worker` of `parts` with the worker's own scratch region (thread_pool.team_arena_bytes);
    every other node runs on worker 0 only, with worker 0's scratch (the single-threaded entry's); a barrier
    separates a split node from whatever precedes or follows it. The caller returns after its last node:
    every other worker has passed the barrier that followed its last split node by then."""
    from . import thread_pool as tp
    fn, b, team, worker, n, parts, serial, split = _team_prologue(module, name, calls, layout)
    barrier = tp.define_barrier(module)
    is_worker0 = b.icmp_unsigned("==", worker, ll.Constant(I64, 0))
    serial_pending = False      # worker 0 ran nodes since the last barrier

    def count_arg(count):
        return n if count is None else ll.Constant(I64, count)

    k = 0
    while k < len(calls):
        node, kernel, operands, count = calls[k]
        lower_split = _split_lowering(node)
        if lower_split is not None:
            if serial_pending:
                b.call(barrier, [team])
            part_kernel, part_operands = lower_split(cache, node, target)
            b.call(part_kernel, [split.operand(v) for v in part_operands] + [worker, parts, count_arg(count)])
            b.call(barrier, [team])
            serial_pending = False
            k += 1
            continue
        with b.if_then(is_worker0):     # a run of memory-bound nodes: worker 0 alone, in order
            while k < len(calls) and _split_lowering(calls[k][0]) is None:
                _, kernel, operands, count = calls[k]
                b.call(kernel, [serial.operand(v) for v in operands] + [count_arg(count)])
                k += 1
        serial_pending = True
    b.ret_void()
    return name


def _define_claim_team_entry(module, name, calls, layout, cache, target):
    """_define_team_entry for a claim pool (thread_pool.define_pool claim_lines): the `parts` pieces of a
    split node are claimed dynamically (thread_pool.claim_loop on the node's own line), so the caller never
    waits for a worker that is not running. Worker 0 runs the other nodes in order, marks a split node READY
    when it reaches it (everything before it done), runs pieces until none is left and waits until all are
    DONE; every other worker waits for READY, runs pieces and moves on to the next split node, returning
    after the last one. A piece runs with the scratch region of the worker running it, and piece p of
    `parts` computes the same tiles as the static split, so results stay bit-identical.
    -> (name, number of lines used)."""
    from . import thread_pool as tp
    fn, b, team, worker, n, parts, serial, split = _team_prologue(module, name, calls, layout)
    is_worker0 = b.icmp_unsigned("==", worker, ll.Constant(I64, 0))

    def count_arg(count):
        return n if count is None else ll.Constant(I64, count)

    k = line = 0
    while k < len(calls):
        node, kernel, operands, count = calls[k]
        lower_split = _split_lowering(node, CLAIM_SPLIT_MIN_MACS)
        if lower_split is not None:
            part_kernel, part_operands = lower_split(cache, node, target)
            ops = [split.operand(v) for v in part_operands]
            with b.if_then(is_worker0):
                tp._store_atomic(b, ll.Constant(I64, 1), tp.line_slot(b, team, line, tp.READY), "release")
            tp.spin_until(b, fn, module, tp.line_slot(b, team, line, tp.READY),
                          lambda v: b.icmp_unsigned("!=", v, ll.Constant(I64, 0)), f"ready{line}")
            tp.claim_loop(b, fn, module, team, line, parts,
                          lambda p: b.call(part_kernel, ops + [p, parts, count_arg(count)]), f"node{line}")
            with b.if_then(is_worker0):
                tp.wait_done(b, fn, module, team, line, parts, f"done{line}")
            line += 1
            k += 1
            continue
        with b.if_then(is_worker0):     # a run of memory-bound nodes: worker 0 alone, in order
            while k < len(calls) and _split_lowering(calls[k][0], CLAIM_SPLIT_MIN_MACS) is None:
                _, kernel, operands, count = calls[k]
                b.call(kernel, [serial.operand(v) for v in operands] + [count_arg(count)])
                k += 1
    b.ret_void()
    return name, line
