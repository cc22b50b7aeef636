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

from .kernels.builder import scratch_need
from .layout import VIEW_OPS, compute_layout

PTR = ll.PointerType()
I64 = ll.IntType(64)
I8 = ll.IntType(8)
VOID = ll.VoidType()


# int8 values (ir/ops/quant.py) and the ops whose lowering handles them (kernels/quant.py); every other op
# meeting a u8/i8 value is refused, since its float kernel would misread the bytes
QUANTIZED_DTYPES = ("i8", "u8")
QUANTIZED_LOWERINGS = frozenset({"quantize", "dequantize", "conv2d_q", "dense_q", "max_pool2d"})


class LoweringError(NotImplementedError):
    """The LLVM backend has no lowering for an op (the caller falls back to NumPy)."""


class KernelCache:
    """Generates each distinct kernel once per module."""

    def __init__(self, module, target):
        self.module, self.target, self.fns = module, target, {}

    def get(self, key, build):
        if key not in self.fns:
            name = f"k{len(self.fns)}_{key[0]}"
            fn = build(self.module, name)
            fn.linkage = "internal"
            self.fns[key] = fn
        return self.fns[key]


def static_count(node) -> int | None:
    """The count argument of a node's kernel when it is not the call's batch n: a node none of whose
    values has the batch axis runs over the static leading dimension of its first operand. Kernels of
    per-sample ops (conv, dense, pools, pad ...) loop over that many samples; kernels built for whole
    static shapes ignore the count. None: the node touches a batched value, pass n."""
    if not node.inputs or not node.inputs[0].shape or \
            any(v.type.batched for v in list(node.inputs) + list(node.outputs)):
        return None
    return int(node.inputs[0].shape[0])


def lower_graph(g, target, entry_name=None):
    """-> (llvmlite module, entry function name, Layout)."""
    from .lowering import LOWERINGS
    symbol = ascii_identifier(g.name)
    module = ll.Module(name=symbol)
    layout = compute_layout(g)
    entry_name = entry_name or f"gc_{symbol}"
    fn = ll.Function(module, ll.FunctionType(VOID, [PTR, I64, PTR, I64]), name=entry_name)
    fn.attributes.add("nounwind")
    args, n, arena, first = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    addr = {}
    for name in layout.arg_order:
        slot = layout.slots[name]
        addr[name] = b.load(b.gep(args, [ll.Constant(I64, slot.index)], inbounds=True, source_etype=PTR),
                            typ=PTR)
    cache = KernelCache(module, target)

    def address(name):
        if name in addr:
            return addr[name]
        s = layout.slots[name]
        if s.kind == "alias":
            a = address(s.target)
        else:
            off = b.add(b.mul(n, ll.Constant(I64, s.per_sample)), ll.Constant(I64, s.fixed))
            a = b.gep(arena, [off], inbounds=True, source_etype=I8)
        addr[name] = a
        return a

    scratch_per_sample = scratch_fixed = 0
    scratch_ps, scratch_fx = layout.scratch_offset()
    scratch_ptr = []

    def token(v, kernel, count):
        nonlocal scratch_per_sample, scratch_fixed
        if v[0] == "sample_base":          # flat index of this call's first element
            return b.mul(first, ll.Constant(I64, v[1]))
        if v[0] == "scratch":              # the shared scratch region, grown to the kernel's need
            need = scratch_need(kernel)
            if count is None:
                scratch_per_sample = max(scratch_per_sample, need.per_sample)
                scratch_fixed = max(scratch_fixed, need.fixed)
            else:                          # a static count: its per-sample need is a fixed size
                scratch_fixed = max(scratch_fixed, need.fixed + need.per_sample * count)
            if not scratch_ptr:
                off = b.add(b.mul(n, ll.Constant(I64, scratch_ps)), ll.Constant(I64, scratch_fx))
                scratch_ptr.append(b.gep(arena, [off], inbounds=True, source_etype=I8))
            return scratch_ptr[0]
        raise ValueError(f"unknown operand token {v!r}")

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
        call_args = [address(v) if isinstance(v, str) else token(v, kernel, count) if isinstance(v, tuple) else v
                     for v in operands]
        b.call(kernel, call_args + [n if count is None else ll.Constant(I64, count)])
    layout.scratch_per_sample, layout.scratch_fixed = scratch_per_sample, scratch_fixed
    # state writes that no kernel did in place (e.g. the step counter): copy the new value back
    for param, new in g.updates.items():
        if layout.resolve(param) != layout.resolve(new.name):
            memcpy = module.globals.get("llvm.memcpy.p0.p0.i64") or ll.Function(
                module, ll.FunctionType(VOID, [PTR, PTR, I64, ll.IntType(1)]), name="llvm.memcpy.p0.p0.i64")
            b.call(memcpy, [address(param), address(new.name), ll.Constant(I64, new.type.nbytes(1)),
                            ll.Constant(ll.IntType(1), 0)])
    b.ret_void()
    return module, entry_name, layout
