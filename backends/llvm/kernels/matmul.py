"""Register-tiled GEMM microkernel generator (with its block planner and fused epilogues), and the dense /
matmul kernel builders built on it.

Every GEMM-like kernel of the LLVM backend (dense, matmul, conv2d forward/grad_input/grad_filter) is
expressed as tiles of

    C[MR x NR] (op)= epilogue( sum_k  A[m, k] * B[k, 0:NR] )

held in MR x NV vector accumulators (NR = NV * lanes), where row m of A has its own base pointer (so rows
can be image pixels, filter taps, matrix rows, ...) and the reduction index k walks a small nest of
`Loop`s, each with its own A and B stride (so k can be (kh, kw*c) for an implicit im2col, or (oh, ow) for a
filter gradient). Per k step the tile loads NV vectors of B and broadcasts MR scalars of A into FMAs.

Compile-time constants everywhere except the batch `n`: the generator fully specializes loop bounds,
strides, remainder tiles and column masks, so there is no runtime shape logic beyond counted loops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from llvmlite import ir

# one definition of the IR types, the activation list and the kernel function factory for all kernels
from .builder import (ACTIVATIONS, F32, I1, I8, I32, I64, PTR, VOID,  # noqa: F401  (conv.py imports from here)
                      IntFolding, new_kernel_function)

IntLike = Union[int, ir.Value]

# Scratch buffers up to this size live on the stack; larger (or runtime-sized) ones come from malloc.
STACK_SCRATCH_LIMIT_BYTES = 128 * 1024
# Inner reduction loops with at most this many constant iterations are fully unrolled.
FULL_UNROLL_LIMIT = 8
INNER_UNROLL = 4
# Row tiles above this would need more base-pointer registers than x86-64 has.
MAX_TILE_ROWS = 8


# ----------------------------------------------------------------------------------------------------
# IR plumbing
# ----------------------------------------------------------------------------------------------------

class KernelContext(IntFolding):
    """An IR builder inside one kernel function, plus the helpers every emitter needs."""

    def __init__(self, module: ir.Module, fn: ir.Function, target):
        self.module, self.fn, self.target = module, fn, target
        self.lanes = target.vector_lanes
        self.vec = ir.VectorType(F32, self.lanes)
        self.entry = fn.append_basic_block("entry")
        self.b = ir.IRBuilder(self.entry)
        self._heap_buffers: list[ir.Value] = []
        # False: loops get llvm.loop.unroll.disable (for emitters that unroll by hand, like emit_tile);
        # True leaves unrolling to LLVM (scalar loops that its vectorizer handles).
        self.llvm_unrolling = True

    def gep(self, ptr: ir.Value, index: IntLike) -> ir.Value:
        """Pointer to float element `index` after `ptr`."""
        if isinstance(index, int) and index == 0:
            return ptr
        return self.b.gep(ptr, [self.i64(index)], inbounds=True, source_etype=F32)

    # -- intrinsics and libc --
    def declare(self, name: str, ret: ir.Type, args: Sequence[ir.Type]) -> ir.Function:
        fn = self.module.globals.get(name)
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ret, list(args)), name=name)
        return fn

    def memset_zero(self, ptr: ir.Value, nfloats: IntLike) -> None:
        fn = self.declare("llvm.memset.p0.i64", VOID, [PTR, I8, I64, I1])
        self.b.call(fn, [ptr, ir.Constant(I8, 0), self.i64(self.mul(nfloats, 4)), ir.Constant(I1, 0)])

    def memcpy(self, dst: ir.Value, src: ir.Value, nfloats: IntLike) -> None:
        fn = self.declare("llvm.memcpy.p0.p0.i64", VOID, [PTR, PTR, I64, I1])
        self.b.call(fn, [dst, src, self.i64(self.mul(nfloats, 4)), ir.Constant(I1, 0)])

    def scratch(self, nfloats: IntLike) -> ir.Value:
        """A float buffer that lives until the kernel returns. Must be requested in the entry block,
        before any control flow (so stack buffers are static allocas)."""
        if self.b.block is not self.entry:
            raise RuntimeError("scratch buffers must be requested before the kernel's first loop")
        if isinstance(nfloats, int) and nfloats * 4 <= STACK_SCRATCH_LIMIT_BYTES:
            buf = self.b.alloca(ir.ArrayType(F32, max(nfloats, 1)))
            buf.align = 64
            buf.type = PTR      # llvmlite still types allocas; everything here uses opaque `ptr`
            return buf
        malloc = self.declare("malloc", PTR, [I64])
        buf = self.b.call(malloc, [self.i64(self.mul(nfloats, 4))])
        self._heap_buffers.append(buf)
        return buf

    def finish(self) -> ir.Function:
        """Free heap scratch and return."""
        if self._heap_buffers:
            free = self.declare("free", VOID, [PTR])
            for buf in self._heap_buffers:
                self.b.call(free, [buf])
        self.b.ret_void()
        return self.fn

    # -- control flow --
    def loop(self, count: IntLike, carried: Sequence[ir.Value],
             body: Callable[[ir.Value, list], Sequence[ir.Value]], name: str = "loop") -> list:
        """for i in range(count): carried = body(i, carried). Returns the final carried values.
        Constant counts of 0 and 1 emit no loop at all."""
        carried = list(carried)
        if isinstance(count, int):
            if count <= 0:
                return carried
            if count == 1:
                return list(body(self.i64(0), carried))
        b = self.b
        pre = b.block
        head = self.fn.append_basic_block(name)
        done = self.fn.append_basic_block(name + ".end")
        cnt = self.i64(count)
        if isinstance(count, int):
            b.branch(head)
        else:
            b.cbranch(b.icmp_signed(">", cnt, self.i64(0)), head, done)
        b.position_at_end(head)
        i = b.phi(I64, name="i")
        i.add_incoming(self.i64(0), pre)
        phis = []
        for v in carried:
            p = b.phi(v.type)
            p.add_incoming(v, pre)
            phis.append(p)
        new = list(body(i, list(phis)))
        nxt = b.add(i, self.i64(1))
        tail = b.block
        i.add_incoming(nxt, tail)
        for p, v in zip(phis, new):
            p.add_incoming(v, tail)
        latch = b.cbranch(b.icmp_signed("<", nxt, cnt), head, done)
        if not self.llvm_unrolling:
            latch.set_metadata("llvm.loop", self._loop_id_without_unrolling())
        b.position_at_end(done)
        if isinstance(count, int):
            return new
        out = []
        for v0, v1 in zip(carried, new):
            p = b.phi(v0.type)
            p.add_incoming(v0, pre)
            p.add_incoming(v1, tail)
            out.append(p)
        return out

    def _loop_id_without_unrolling(self) -> ir.Value:
        """A fresh self-referential loop ID carrying llvm.loop.unroll.disable: the generator already
        unrolled what pays off, and LLVM's unroller re-unrolling tile loops doubles compile time
        (and code size) for nothing. llvmlite has no API for self-referential nodes, hence the patch."""
        mod = self.module
        disable = mod.add_metadata([ir.MetaDataString(mod, "llvm.loop.unroll.disable")])
        node = ir.values.MDValue(mod, [disable], name=str(len(mod.metadata)))
        node.operands = (node, disable)
        return node

    # -- vectors --
    def vconst(self, value: float) -> ir.Constant:
        return ir.Constant(self.vec, [float(value)] * self.lanes)

    def lane_mask(self, width: int) -> ir.Constant:
        return ir.Constant(ir.VectorType(I1, self.lanes), [1] * width + [0] * (self.lanes - width))

    def splat(self, scalar: ir.Value) -> ir.Value:
        v = self.b.insert_element(ir.Constant(self.vec, ir.Undefined), scalar, ir.Constant(I32, 0))
        return self.b.shuffle_vector(v, ir.Constant(self.vec, ir.Undefined),
                                     ir.Constant(ir.VectorType(I32, self.lanes), [0] * self.lanes))

    def load_vec(self, ptr: ir.Value, width: int) -> ir.Value:
        """Load `width` (<= lanes) floats; lanes past `width` read as 0 and touch no memory."""
        if width >= self.lanes:
            return self.b.load(ptr, typ=self.vec, align=4)
        fn = self.declare(f"llvm.masked.load.v{self.lanes}f32.p0", self.vec,
                          [PTR, I32, ir.VectorType(I1, self.lanes), self.vec])
        return self.b.call(fn, [ptr, ir.Constant(I32, 4), self.lane_mask(width), self.vconst(0.0)])

    def store_vec(self, value: ir.Value, ptr: ir.Value, width: int) -> None:
        if width >= self.lanes:
            self.b.store(value, ptr, align=4)
            return
        fn = self.declare(f"llvm.masked.store.v{self.lanes}f32.p0", VOID,
                          [self.vec, PTR, I32, ir.VectorType(I1, self.lanes)])
        self.b.call(fn, [value, ptr, ir.Constant(I32, 4), self.lane_mask(width)])

    def vcall(self, base: str, *args: ir.Value) -> ir.Value:
        """Call a one-result vector intrinsic such as llvm.fma / llvm.floor."""
        fn = self.declare(f"llvm.{base}.v{self.lanes}f32", self.vec, [self.vec] * len(args))
        return self.b.call(fn, list(args))

    def fma(self, a: ir.Value, x: ir.Value, acc: ir.Value) -> ir.Value:
        return self.vcall("fma", a, x, acc)


# ----------------------------------------------------------------------------------------------------
# Activations on vectors (used by epilogues and by other kernels)
# ----------------------------------------------------------------------------------------------------

def vec_exp(kc: KernelContext, x: ir.Value) -> ir.Value:
    """exp(x) for float vectors: Cephes expf (range reduction by ln2, degree-5 polynomial), ~1 ulp.
    Inputs are clamped to +-88.376 so the result saturates at 0 / inf instead of garbage."""
    b = kc.b
    x = kc.vcall("minnum", x, kc.vconst(88.3762626647949))
    x = kc.vcall("maxnum", x, kc.vconst(-88.3762626647949))
    fx = kc.vcall("floor", kc.fma(x, kc.vconst(1.44269504088896341), kc.vconst(0.5)))
    r = kc.fma(fx, kc.vconst(-0.693359375), x)
    r = kc.fma(fx, kc.vconst(2.12194440e-4), r)
    y = kc.vconst(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        y = kc.fma(y, r, kc.vconst(c))
    z = b.fmul(r, r)
    y = kc.fma(y, z, b.fadd(r, kc.vconst(1.0)))
    ivec = ir.VectorType(I32, kc.lanes)
    e = b.add(b.fptosi(fx, ivec), ir.Constant(ivec, [127] * kc.lanes))
    scale = b.bitcast(b.shl(e, ir.Constant(ivec, [23] * kc.lanes)), kc.vec)
    return b.fmul(y, scale)


def vec_sigmoid(kc: KernelContext, x: ir.Value) -> ir.Value:
    """1 / (1 + exp(-x)); exp saturates to inf for very negative x, giving exactly 0 (no overflow NaN)."""
    b = kc.b
    return b.fdiv(kc.vconst(1.0), b.fadd(kc.vconst(1.0), vec_exp(kc, b.fsub(kc.vconst(0.0), x))))


# Eigen's rational tanh approximation (odd degree-13 / even degree-6), < 4e-7 relative error everywhere,
# with no cancellation near 0 (unlike 1 - 2/(exp(2x)+1)).
_TANH_NUM = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
             -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_DEN = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_TANH_CLAMP = 7.90531110763549805


def vec_tanh(kc: KernelContext, x: ir.Value) -> ir.Value:
    b = kc.b
    x = kc.vcall("minnum", x, kc.vconst(_TANH_CLAMP))
    x = kc.vcall("maxnum", x, kc.vconst(-_TANH_CLAMP))
    x2 = b.fmul(x, x)
    p = kc.vconst(_TANH_NUM[-1])
    for c in reversed(_TANH_NUM[:-1]):
        p = kc.fma(p, x2, kc.vconst(c))
    q = kc.vconst(_TANH_DEN[-1])
    for c in reversed(_TANH_DEN[:-1]):
        q = kc.fma(q, x2, kc.vconst(c))
    return b.fdiv(b.fmul(p, x), q)


def vec_relu(kc: KernelContext, x: ir.Value) -> ir.Value:
    zero = kc.vconst(0.0)
    return kc.b.select(kc.b.fcmp_ordered(">", x, zero), x, zero)


def vec_activation(kc: KernelContext, kind: str, x: ir.Value) -> ir.Value:
    """Apply one of ACTIVATIONS to a float vector."""
    if kind == "linear":
        return x
    if kind == "relu":
        return vec_relu(kc, x)
    if kind == "sigmoid":
        return vec_sigmoid(kc, x)
    if kind == "tanh":
        return vec_tanh(kc, x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------------
# Epilogues: what happens to the accumulators between the reduction and the single store
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpilogueOperands:
    """Where an epilogue's extra inputs are, for one tile. Pointers are already offset to the tile's
    first column; `rows` pointers follow the output's row layout."""
    bias: ir.Value | None = None          # per-column vector source
    mask_rows: Sequence[ir.Value] | None = None   # tensor with the output's layout, one pointer per row


@dataclass(frozen=True)
class BiasAdd:
    """acc += bias[col]."""

    def emit(self, kc, value, m, col, width, ops: EpilogueOperands):
        return kc.b.fadd(value, kc.load_vec(kc.gep(ops.bias, col), width))


@dataclass(frozen=True)
class Activation:
    """acc = activation(acc)."""
    kind: str

    def __post_init__(self):
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.kind!r}")

    def emit(self, kc, value, m, col, width, ops):
        return vec_activation(kc, self.kind, value)


@dataclass(frozen=True)
class PositiveMask:
    """acc *= (y > 0) for a tensor y laid out like the output — fuses a relu_grad into a backward op."""

    def emit(self, kc, value, m, col, width, ops):
        y = kc.load_vec(kc.gep(ops.mask_rows[m], col), width)
        return kc.b.select(kc.b.fcmp_ordered(">", y, kc.vconst(0.0)), value, kc.vconst(0.0))


@dataclass(frozen=True)
class Epilogue:
    """A small pipeline applied per accumulator vector, then one store (or add into the output when
    `accumulate`, for reductions split across calls of the tile)."""
    steps: tuple = ()
    accumulate: bool = False

    @staticmethod
    def of(*, bias: bool = False, activation: str = "linear", positive_mask: bool = False,
           accumulate: bool = False) -> "Epilogue":
        steps = []
        if bias:
            steps.append(BiasAdd())
        if activation != "linear":
            steps.append(Activation(activation))
        if positive_mask:
            steps.append(PositiveMask())
        return Epilogue(tuple(steps), accumulate)

    def emit(self, kc: KernelContext, acc, out_rows: Sequence[ir.Value], width: int,
             ops: EpilogueOperands = EpilogueOperands()) -> None:
        """Finish a tile: acc[m][v] -> out_rows[m][v*lanes : ...], only the first `width` columns."""
        lanes = kc.lanes
        for m, row in enumerate(acc):
            for v, value in enumerate(row):
                col = v * lanes
                w = min(lanes, width - col)
                for step in self.steps:
                    value = step.emit(kc, value, m, col, w, ops)
                ptr = kc.gep(out_rows[m], col)
                if self.accumulate:
                    value = kc.b.fadd(kc.load_vec(ptr, w), value)
                kc.store_vec(value, ptr, w)


# ----------------------------------------------------------------------------------------------------
# The microkernel
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Loop:
    """One level of the reduction nest: `count` steps, advancing A by `a_stride` floats and B by
    `b_stride` floats per step."""
    count: IntLike
    a_stride: IntLike
    b_stride: IntLike


def simplify_loops(loops: Sequence[Loop]) -> list[Loop]:
    """Drop unit loops and merge an outer loop into the next inner one when they walk memory as a
    single contiguous run (e.g. 1x1 convolutions, or KW*C runs when a row of taps is contiguous)."""
    out: list[Loop] = []
    for lp in loops:
        if isinstance(lp.count, int) and lp.count == 1:
            continue
        out.append(lp)
    merged: list[Loop] = []
    for lp in reversed(out):
        if merged:
            inner = merged[-1]
            if (isinstance(lp.count, int) and isinstance(inner.count, int)
                    and all(isinstance(s, int) for s in (lp.a_stride, lp.b_stride, inner.a_stride,
                                                         inner.b_stride))
                    and lp.a_stride == inner.count * inner.a_stride
                    and lp.b_stride == inner.count * inner.b_stride):
                merged[-1] = Loop(lp.count * inner.count, inner.a_stride, inner.b_stride)
                continue
        merged.append(lp)
    return list(reversed(merged))


def emit_tile(kc: KernelContext, a_rows: Sequence[ir.Value], b_ptr: ir.Value, loops: Sequence[Loop],
              nv: int, b_width: int, unroll: int = INNER_UNROLL):
    """Emit the reduction of one MR x NV tile; returns the accumulators as acc[m][v].

    a_rows: one base pointer per tile row (A[m, k] = a_rows[m][offset_a(k)]).
    b_ptr:  B[k, 0:NV*lanes] starts at b_ptr[offset_b(k)] (contiguous columns).
    b_width: valid columns of B (< NV*lanes only for a column tail; those loads are masked)."""
    lanes = kc.lanes
    mr = len(a_rows)
    loops = simplify_loops(loops)
    acc = [kc.vconst(0.0)] * (mr * nv)

    def step(a_off, b_off, acc):
        bvec = [kc.load_vec(kc.gep(b_ptr, kc.add(b_off, v * lanes)), min(lanes, b_width - v * lanes))
                for v in range(nv)]
        new = list(acc)
        for m in range(mr):
            a = kc.splat(kc.b.load(kc.gep(a_rows[m], a_off), typ=F32, align=4))
            for v in range(nv):
                new[m * nv + v] = kc.fma(a, bvec[v], new[m * nv + v])
        return new

    def level(d, a_off, b_off, acc):
        lp = loops[d]
        if d < len(loops) - 1:
            def outer(i, acc):
                return level(d + 1, kc.add(a_off, kc.mul(i, lp.a_stride)),
                             kc.add(b_off, kc.mul(i, lp.b_stride)), acc)
            return kc.loop(lp.count, acc, outer, name=f"red{d}")
        # innermost: unrolled by `unroll`, remainder steps afterwards
        if isinstance(lp.count, int) and lp.count <= FULL_UNROLL_LIMIT:
            for u in range(lp.count):
                acc = step(kc.add(a_off, kc.mul(u, lp.a_stride)), kc.add(b_off, kc.mul(u, lp.b_stride)), acc)
            return acc
        if isinstance(lp.count, int):
            full, rem = divmod(lp.count, unroll)
        else:
            full = kc.b.udiv(lp.count, kc.i64(unroll))
            rem = kc.b.urem(lp.count, kc.i64(unroll))

        def unrolled(i, acc):
            base = kc.mul(i, unroll)
            for u in range(unroll):
                k = kc.add(base, u)
                acc = step(kc.add(a_off, kc.mul(k, lp.a_stride)), kc.add(b_off, kc.mul(k, lp.b_stride)), acc)
            return acc
        acc = kc.loop(full, acc, unrolled, name=f"red{d}")
        start = kc.mul(full, unroll)
        if isinstance(rem, int):
            for u in range(rem):
                k = start + u
                acc = step(kc.add(a_off, kc.mul(k, lp.a_stride)), kc.add(b_off, kc.mul(k, lp.b_stride)), acc)
            return acc

        def leftover(i, acc):
            k = kc.add(start, i)
            return step(kc.add(a_off, kc.mul(k, lp.a_stride)), kc.add(b_off, kc.mul(k, lp.b_stride)), acc)
        return kc.loop(rem, acc, leftover, name=f"red{d}.rem")

    if loops:
        acc = level(0, 0, 0, acc)
    return [acc[m * nv:(m + 1) * nv] for m in range(mr)]


# ----------------------------------------------------------------------------------------------------
# Planner: tile shape and column blocking
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TilePlan:
    """Register tile: `mr` rows x `nv` vectors of `lanes` floats."""
    mr: int
    nv: int


def vector_registers(target) -> int:
    return 32 if target.vector_bits >= 512 else 16


def tile_fits(mr: int, nv: int, registers: int) -> bool:
    """Accumulators + the B vectors of one step (LLVM hoists all of them) + one broadcast."""
    return mr * nv + nv + 1 <= registers


# Cost model (cycles) for choosing tiles. Per reduction step: 2 FMA pipes, ~2 loads per cycle, and a
# floor from the FMA latency chain of each accumulator (4 cycles on paper; 5 here because with fewer
# than ~10 accumulators the out-of-order core rarely hides all of it). Per tile: row address setup and
# the epilogue. Loads also cost a little beyond their port limit (measured: 4x3 beats 2x5 and 6x2).
FMA_LATENCY_FLOOR = 5.0
RUNTIME_ROWS_GUESS = 1024
RUNTIME_K_GUESS = 256


def tile_cycles(mr: int, nv: int, k: int) -> float:
    """Estimated cycles for one mr x nv tile with a k-step reduction."""
    step = max(mr * nv / 2.0, (mr + nv) / 2.0, FMA_LATENCY_FLOOR) + 0.2 * (mr + nv)
    return k * step + 2.0 * mr + 1.5 * mr * nv


def _rows_cost(rows: int | None, mr: int, nv: int, k: int) -> float:
    if rows is None:         # runtime rows: plan for a large batch; remainder rows go one at a time
        return (RUNTIME_ROWS_GUESS / mr * tile_cycles(mr, nv, k)
                + (mr - 1) / 2 * tile_cycles(1, nv, k))
    full, rem = divmod(rows, mr)
    return full * tile_cycles(mr, nv, k) + (tile_cycles(rem, nv, k) if rem else 0.0)


def best_rows(rows: int | None, nv: int, target, k: int | None = None) -> int:
    """Best tile height for a fixed tile width."""
    k = k or RUNTIME_K_GUESS
    regs = vector_registers(target)
    cands = [mr for mr in range(1, MAX_TILE_ROWS + 1) if tile_fits(mr, nv, regs)]
    if rows is not None:
        cands = [mr for mr in cands if mr <= max(rows, 1)] or [1]
    return min(cands, key=lambda mr: (_rows_cost(rows, mr, nv, k), -mr))


def plan_tile(rows: int | None, cols: int, target, k: int | None = None) -> TilePlan:
    """Choose the tile for a (rows x cols) output reduced over k (None = runtime); rows None = runtime
    (batch) rows. The column tail block, if any, is planned separately by `column_blocks`."""
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    k = k or RUNTIME_K_GUESS
    lanes = target.vector_lanes
    regs = vector_registers(target)
    vecs = -(-cols // lanes)
    best, best_cost = None, math.inf
    for nv in range(1, vecs + 1):
        for mr in range(1, MAX_TILE_ROWS + 1):
            if not tile_fits(mr, nv, regs) or (rows is not None and mr > max(rows, 1)):
                continue
            nfull, tail = divmod(vecs, nv)
            cost = nfull * _rows_cost(rows, mr, nv, k)
            if tail:
                cost += _rows_cost(rows, best_rows(rows, tail, target, k), tail, k)
            if cost < best_cost:
                best, best_cost = TilePlan(mr, nv), cost
    return best


@dataclass(frozen=True)
class ColumnBlock:
    """`count` consecutive blocks of `nv` vectors starting at column `start`; each block's last vector
    holds `width - (nv-1)*lanes` valid columns (width = valid columns per block)."""
    start: int
    count: int
    nv: int
    width: int
    mr: int


def column_blocks(rows: int | None, cols: int, plan: TilePlan, target,
                  k: int | None = None) -> list[ColumnBlock]:
    """Split `cols` into full blocks of plan.nv vectors plus one narrower (possibly masked) tail block
    with its own tile height."""
    lanes = target.vector_lanes
    nr = plan.nv * lanes
    nfull, rem = divmod(cols, nr)
    blocks = []
    if nfull:
        blocks.append(ColumnBlock(0, nfull, plan.nv, nr, plan.mr))
    if rem:
        nv_t = -(-rem // lanes)
        blocks.append(ColumnBlock(nfull * nr, 1, nv_t, rem, best_rows(rows, nv_t, target, k)))
    return blocks


def for_row_tiles(kc: KernelContext, rows: IntLike, mr: int, body: Callable[[IntLike, int], None],
                  name: str = "rows") -> None:
    """Call body(first_row, tile_rows) for tiles of `mr` rows covering range(rows). A constant row count
    gets one static remainder tile; a runtime count finishes with single-row tiles."""
    def full_tile(t, carried):
        body(kc.mul(t, mr), mr)
        return []
    if isinstance(rows, int):
        full, rem = divmod(rows, mr)
        kc.loop(full, [], full_tile, name=name)
        if rem:
            body(full * mr, rem)
        return
    if mr == 1:
        kc.loop(rows, [], full_tile, name=name)
        return
    full = kc.b.udiv(rows, kc.i64(mr))
    kc.loop(full, [], full_tile, name=name)
    start = kc.b.mul(full, kc.i64(mr))

    def one_row(i, carried):
        body(kc.b.add(start, i), 1)
        return []
    kc.loop(kc.b.urem(rows, kc.i64(mr)), [], one_row, name=name + ".rem")


def for_column_blocks(kc: KernelContext, blocks: Sequence[ColumnBlock],
                      body: Callable[[IntLike, ColumnBlock, IntLike], None], name: str = "cols") -> None:
    """Call body(first_column, block, block_index) for every column block (index counts all blocks)."""
    index0 = 0
    for blk in blocks:
        def one(j, carried, blk=blk, index0=index0):
            body(kc.add(blk.start, kc.mul(j, blk.nv * kc.lanes)), blk, kc.add(index0, j))
            return []
        kc.loop(blk.count, [], one, name=name)
        index0 += blk.count


def pack_b(kc: KernelContext, src: ir.Value, k: IntLike, k_stride: IntLike, col_stride: IntLike,
           blocks: Sequence[ColumnBlock], dst: ir.Value) -> None:
    """Copy B (element (k, col) at src[k*k_stride + col*col_stride]) into `dst` as consecutive blocks of
    (k x nv*lanes) floats, zero-padded past each block's valid width — the layout emit_tile reads with
    b_stride = nv*lanes and no masks."""
    lanes = kc.lanes
    offset: IntLike = 0
    b = kc.b
    for blk in blocks:
        nr = blk.nv * lanes
        block_floats = kc.mul(k, nr)

        def per_block(j, carried, blk=blk, nr=nr, offset=offset, block_floats=block_floats):
            col0 = kc.add(blk.start, kc.mul(j, nr))
            base = kc.gep(dst, kc.add(offset, kc.mul(j, block_floats)))

            def per_k(kk, carried):
                row = kc.gep(base, kc.mul(kk, nr))
                for c in range(nr):
                    if c < blk.width:
                        v = b.load(kc.gep(src, kc.add(kc.mul(kk, k_stride), kc.mul(kc.add(col0, c), col_stride))),
                                   typ=F32, align=4)
                    else:
                        v = ir.Constant(F32, 0.0)
                    b.store(v, kc.gep(row, c), align=4)
                return []
            kc.loop(k, [], per_k, name="pack.k")
            return []
        kc.loop(blk.count, [], per_block, name="pack")
        offset = kc.add(offset, kc.mul(blk.count, block_floats))


def packed_floats(blocks: Sequence[ColumnBlock], lanes: int) -> int:
    """Floats per unit of k that pack_b writes for these blocks (multiply by k for the total)."""
    return sum(blk.count * blk.nv * lanes for blk in blocks)


def packed_block(kc: KernelContext, packed: ir.Value, k: IntLike, blocks: Sequence[ColumnBlock],
                 which: int, j: IntLike) -> ir.Value:
    """Pointer to block j of blocks[which] inside a pack_b buffer."""
    lanes = kc.lanes
    before = sum(blk.count * blk.nv * lanes for blk in blocks[:which])
    return kc.gep(packed, kc.mul(k, kc.add(before, kc.mul(j, blocks[which].nv * lanes))))


# ----------------------------------------------------------------------------------------------------
# GEMM driver and the dense / matmul builders
# ----------------------------------------------------------------------------------------------------

def _check_dim(name: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {v!r}")


def emit_gemm(kc: KernelContext, *, rows: IntLike, cols: int, k: IntLike,
              a: ir.Value, a_row_stride: IntLike, a_k_stride: IntLike,
              b: ir.Value, b_k_stride: IntLike, b_col_stride: IntLike,
              out: ir.Value, epilogue: Epilogue, bias: ir.Value | None = None,
              mask: ir.Value | None = None, rows_hint: int | None = None,
              plan: TilePlan | None = None) -> None:
    """out[rows x cols] = epilogue(A @ B) with A[i, kk] = a[i*a_row_stride + kk*a_k_stride] and
    B[kk, j] = b[kk*b_k_stride + j*b_col_stride]; out rows are contiguous with `cols` floats.
    B is packed into zero-padded column blocks unless its columns are already contiguous and k is a
    runtime value (then tails use masked loads). Must be called in the entry block (scratch)."""
    lanes = kc.lanes
    k_hint = k if isinstance(k, int) else None
    rows_hint = rows if isinstance(rows, int) else rows_hint
    plan = plan or plan_tile(rows_hint, cols, kc.target, k_hint)
    blocks = column_blocks(rows_hint, cols, plan, kc.target, k_hint)
    pack = not (b_col_stride == 1 and not isinstance(k, int))
    if pack:
        packed = kc.scratch(kc.mul(k, packed_floats(blocks, lanes)))
        pack_b(kc, b, k, b_k_stride, b_col_stride, blocks, packed)

    for which, blk in enumerate(blocks):
        nr = blk.nv * lanes

        def row_tile(r0, mr, blk=blk, nr=nr, which=which):
            def col_block(j, carried):
                col0 = kc.add(blk.start, kc.mul(j, nr))
                a_rows = [kc.gep(a, kc.mul(kc.add(r0, m), a_row_stride)) for m in range(mr)]
                if pack:
                    bp = packed_block(kc, packed, k, blocks, which, j)
                    loops = [Loop(k, a_k_stride, nr)]
                    width_b = nr
                else:
                    bp = kc.gep(b, col0)
                    loops = [Loop(k, a_k_stride, b_k_stride)]
                    width_b = blk.width
                acc = emit_tile(kc, a_rows, bp, loops, blk.nv, width_b)
                out_rows = [kc.gep(out, kc.add(kc.mul(kc.add(r0, m), cols), col0)) for m in range(mr)]
                ops = EpilogueOperands(
                    bias=kc.gep(bias, col0) if bias is not None else None,
                    mask_rows=([kc.gep(mask, kc.add(kc.mul(kc.add(r0, m), cols), col0)) for m in range(mr)]
                               if mask is not None else None))
                epilogue.emit(kc, acc, out_rows, blk.width, ops)
                return []
            kc.loop(blk.count, [], col_block, name="cols")
        for_row_tiles(kc, rows, blk.mr, row_tile)


def gemm_kernel(module, name, n_ptrs, target) -> tuple[ir.Function, KernelContext]:
    """A new kernel function and its context, set up for hand-unrolled GEMM code."""
    fn = new_kernel_function(module, name, n_ptrs, target)
    kc = KernelContext(module, fn, target)
    kc.llvm_unrolling = False
    return fn, kc


def build_dense(module: ir.Module, name: str, *, in_features: int, units: int, has_bias: bool,
                activation: str = "linear", target, output_mask: bool = False,
                plan: TilePlan | None = None) -> ir.Function:
    """void name(ptr x, ptr w, ptr b, [ptr y,] ptr out, i64 n): out (n, units) =
    activation(x (n, in_features) @ w (in_features, units) + b) [* (y > 0) when output_mask].
    `b` is not read when has_bias is False (may be null)."""
    _check_dim("in_features", in_features)
    _check_dim("units", units)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    fn, kc = gemm_kernel(module, name, 4 + bool(output_mask), target)
    x, w, bias = fn.args[:3]
    mask = fn.args[3] if output_mask else None
    out, n = fn.args[-2], fn.args[-1]
    emit_gemm(kc, rows=n, cols=units, k=in_features, a=x, a_row_stride=in_features, a_k_stride=1,
              b=w, b_k_stride=units, b_col_stride=1, out=out,
              epilogue=Epilogue.of(bias=has_bias, activation=activation, positive_mask=output_mask),
              bias=bias if has_bias else None, mask=mask, plan=plan)
    return kc.finish()


def build_matmul(module: ir.Module, name: str, *, a_shape, b_shape, transpose_a: bool = False,
                 transpose_b: bool = False, target, output_mask: bool = False,
                 plan: TilePlan | None = None) -> ir.Function:
    """void name(ptr a, ptr b, [ptr y,] ptr out, i64 n): out = op(a) @ op(b) (op = transpose when asked).

    a_shape / b_shape are the stored 2-D shapes; any entry given as None is the runtime batch size `n`
    (at most one per operand). The batch may be the output's row dimension (dy @ w^T: a=(None, M),
    b=(K, M), transpose_b) or the reduction dimension (x^T @ dy: a=(None, K), transpose_a, b=(None, M));
    the output's column dimension must be static. With output_mask, out *= (y > 0) for y shaped like out."""
    for nm, shp in (("a_shape", a_shape), ("b_shape", b_shape)):
        if not isinstance(shp, (tuple, list)) or len(shp) != 2:
            raise ValueError(f"{nm} must be a 2-D shape (tuple of 2), got {shp!r}")
        for i, d in enumerate(shp):
            _check_dim(f"{nm}[{i}]", d, allow_none=True)
        if shp[0] is None and shp[1] is None:
            raise ValueError(f"{nm} may have at most one runtime (None) dimension, got {shp!r}")
    rows = a_shape[1] if transpose_a else a_shape[0]
    ka = a_shape[0] if transpose_a else a_shape[1]
    kb = b_shape[1] if transpose_b else b_shape[0]
    cols = b_shape[0] if transpose_b else b_shape[1]
    if ka != kb:
        raise ValueError(f"matmul reduction dims differ: op(a) has {ka}, op(b) has {kb} "
                         f"(a_shape={a_shape}, b_shape={b_shape}, transpose_a={transpose_a}, "
                         f"transpose_b={transpose_b}); None means the runtime batch")
    if cols is None:
        raise ValueError(f"matmul output columns must be static, got b_shape={b_shape} "
                         f"with transpose_b={transpose_b}")
    fn, kc = gemm_kernel(module, name, 3 + bool(output_mask), target)
    a, bm = fn.args[:2]
    mask = fn.args[2] if output_mask else None
    out, n = fn.args[-2], fn.args[-1]
    rows_v = n if rows is None else rows
    k_v = n if ka is None else ka
    a_rows_dim = a_shape[1] if a_shape[1] is not None else n     # stored row length of a
    b_rows_dim = b_shape[1] if b_shape[1] is not None else n
    emit_gemm(kc, rows=rows_v, cols=cols, k=k_v, a=a,
              a_row_stride=1 if transpose_a else a_rows_dim,
              a_k_stride=a_rows_dim if transpose_a else 1,
              b=bm, b_k_stride=1 if transpose_b else b_rows_dim,
              b_col_stride=b_rows_dim if transpose_b else 1,
              out=out, epilogue=Epilogue.of(positive_mask=output_mask), mask=mask, plan=plan)
    return kc.finish()
