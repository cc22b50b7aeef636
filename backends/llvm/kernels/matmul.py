"""Register-tiled GEMM microkernel generator (with its block planner and fused epilogues), and the dense /
matmul kernel builders built on it.

Every GEMM-like kernel of the LLVM backend (dense, matmul, conv2d forward/grad_input/grad_filter) is
expressed as tiles of

    C[MR x NR] (op)= epilogue( sum_k  A[m, k] * B[k, 0:NR] )

held in MR x NV vector accumulators (NR = NV * lanes), where row m of A has its own base pointer (so rows
can be image pixels, filter taps, matrix rows, ...) and the reduction index k walks a small nest of
`ReductionLevel`s, each with its own A and B stride (so k can be (kh, kw*c) for an implicit im2col, or (oh, ow) for a
filter gradient). Per k step the tile loads NV vectors of B and broadcasts MR scalars of A into FMAs.

Compile-time constants everywhere except the batch `n`: the generator fully specializes loop bounds,
strides, remainder tiles and column masks, so there is no runtime shape logic beyond counted loops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from llvmlite import ir

from .builder import F32, IntLike, KernelBuilder, check_activation
# Inner reduction loops with at most this many constant iterations are fully unrolled.
FULL_UNROLL_LIMIT = 8
INNER_UNROLL = 4
# Row tiles above this would need more base-pointer registers than x86-64 has.
MAX_TILE_ROWS = 8


# ----------------------------------------------------------------------------------------------------
# Epilogues: what happens to the accumulators between the reduction and the single store
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpilogueOperands:
    """Where an epilogue's extra inputs are, for one tile. Pointers are already offset to the tile's
    first column; `rows` pointers follow the output's row layout."""
    bias: ir.Value | None = None          # per-column vector source
    mask_rows: Sequence[ir.Value] | None = None   # tensor with the output's layout, one pointer per row
    residual_rows: Sequence[ir.Value] | None = None   # the same, for a residual added before the activation


@dataclass(frozen=True)
class BiasAdd:
    """acc += bias[col]."""

    def emit(self, kb, value, m, col, width, ops: EpilogueOperands):
        return kb.b.fadd(value, kb.load_part(ops.bias, col, width))


@dataclass(frozen=True)
class ResidualAdd:
    """acc += residual[row, col] (the ResNet skip value, laid out like the output): the same fadd as the
    standalone add kernel, so fused and unfused results are bit-identical."""

    def emit(self, kb, value, m, col, width, ops: EpilogueOperands):
        return kb.b.fadd(value, kb.load_part(ops.residual_rows[m], col, width))


@dataclass(frozen=True)
class Activation:
    """acc = activation(acc), with the builder's activation code: the standalone activation kernels run
    the same instructions, so fused and unfused results are bit-identical (NaN and inf included)."""
    kind: str
    params: tuple = ()          # ((name, value), ...) as the activation table's

    def __post_init__(self):
        check_activation(self.kind, self.params)

    def emit(self, kb, value, m, col, width, ops):
        return kb.activation(self.kind, value, self.params)


@dataclass(frozen=True)
class PositiveMask:
    """acc *= (y > 0) for a tensor y laid out like the output — fuses a relu_grad into a backward op
    (the builder's relu_grad, as the standalone kernel)."""

    def emit(self, kb, value, m, col, width, ops):
        return kb.relu_grad(kb.load_part(ops.mask_rows[m], col, width), value)


@dataclass(frozen=True)
class Epilogue:
    """A small pipeline applied per accumulator vector, then one store (or add into the output when
    `accumulate`, for reductions split across calls of the tile). `window` > 1 (conv2d_max_pool): each
    group of `window` consecutive tile rows is one max-pool window, reduced to its maximum in row order
    from -inf with the builder's NaN-propagating maximum (max_pool2d's kernel, so the bits agree) and
    stored to out_rows[group]."""
    steps: tuple = ()
    accumulate: bool = False
    window: int = 1

    @staticmethod
    def of(*, bias: bool = False, residual: bool = False, activation: str = "linear",
           activation_params: tuple = (), positive_mask: bool = False,
           accumulate: bool = False, window: int = 1) -> "Epilogue":
        steps = []
        if bias:
            steps.append(BiasAdd())
        if residual:
            steps.append(ResidualAdd())
        if activation != "linear":
            steps.append(Activation(activation, activation_params))
        if positive_mask:
            steps.append(PositiveMask())
        if window < 1 or (window > 1 and accumulate):
            raise ValueError(f"Epilogue: window must be >= 1 and cannot accumulate, got {window}, {accumulate}")
        return Epilogue(tuple(steps), accumulate, window)

    def emit(self, kb: KernelBuilder, acc, out_rows: Sequence[ir.Value], width: int,
             ops: EpilogueOperands = EpilogueOperands()) -> None:
        """Finish a tile: acc[m][v] -> out_rows[m][v*lanes : ...], only the first `width` columns (with a
        window: out_rows[m // window])."""
        lanes = kb.lanes
        if len(acc) != len(out_rows) * self.window:
            raise ValueError(f"Epilogue: {len(acc)} tile rows for {len(out_rows)} output rows of {self.window}")
        for r, row_out in enumerate(out_rows):
            for v in range(len(acc[r * self.window])):
                col = v * lanes
                w = min(lanes, width - col)
                # a window's maximum: from -inf in row order, as max_pool2d's kernel takes it
                value = kb.const(float("-inf"), like=acc[r][v]) if self.window > 1 else None
                for m in range(r * self.window, (r + 1) * self.window):
                    x = acc[m][v]
                    for step in self.steps:
                        x = step.emit(kb, x, m, col, w, ops)
                    value = x if value is None else kb.maximum(value, x)
                if self.accumulate:
                    value = kb.b.fadd(kb.load_part(row_out, col, w), value)
                kb.store_part(value, row_out, col, w)


# ----------------------------------------------------------------------------------------------------
# The microkernel
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReductionLevel:
    """One level of the reduction nest: `count` steps, advancing A by `a_stride` floats and B by
    `b_stride` floats per step."""
    count: IntLike
    a_stride: IntLike
    b_stride: IntLike


def simplify_loops(loops: Sequence[ReductionLevel]) -> list[ReductionLevel]:
    """Drop unit loops and merge an outer loop into the next inner one when they walk memory as a
    single contiguous run (e.g. 1x1 convolutions, or KW*C runs when a row of taps is contiguous)."""
    out: list[ReductionLevel] = []
    for lp in loops:
        if isinstance(lp.count, int) and lp.count == 1:
            continue
        out.append(lp)
    merged: list[ReductionLevel] = []
    for lp in reversed(out):
        if merged:
            inner = merged[-1]
            if (isinstance(lp.count, int) and isinstance(inner.count, int)
                    and all(isinstance(s, int) for s in (lp.a_stride, lp.b_stride, inner.a_stride,
                                                         inner.b_stride))
                    and lp.a_stride == inner.count * inner.a_stride
                    and lp.b_stride == inner.count * inner.b_stride):
                merged[-1] = ReductionLevel(lp.count * inner.count, inner.a_stride, inner.b_stride)
                continue
        merged.append(lp)
    return list(reversed(merged))


def fold(kb: KernelBuilder, count: IntLike, acc: Sequence[ir.Value],
         body: Callable[[ir.Value, list], Sequence[ir.Value]], name: str) -> list[ir.Value]:
    """acc = body(i, acc) for i in range(count) as one `for_range` loop carrying the accumulator list
    (the reduction levels of a tile)."""
    with kb.for_range(count, name=name) as loop:
        carried = [loop.carry(a) for a in acc]
        for c, v in zip(carried, body(loop.index, carried)):
            loop.next(c, v)
    return [loop.result(c) for c in carried]


@dataclass(frozen=True)
class FloatMultiplyAccumulate:
    """The arithmetic of a float32 tile: A and B hold float32, acc += a * b as one fma."""

    def zero(self, kb: KernelBuilder) -> ir.Value:
        return kb.const(0.0, like=kb.vec_type())

    def load_a(self, kb: KernelBuilder, row: ir.Value, offset: IntLike) -> ir.Value:
        """A[m, k] broadcast to a vector."""
        return kb.splat(kb.b.load(kb.gep(row, offset), typ=F32, align=4))

    def load_b(self, kb: KernelBuilder, ptr: ir.Value, offset: IntLike, width: int) -> ir.Value:
        return kb.load_part(ptr, offset, width)

    def accumulate(self, kb: KernelBuilder, a: ir.Value, b: ir.Value, acc: ir.Value) -> ir.Value:
        return kb.fma(a, b, acc)


FLOAT_MAC = FloatMultiplyAccumulate()


def emit_tile(kb: KernelBuilder, a_rows: Sequence[ir.Value], b_ptr: ir.Value, loops: Sequence[ReductionLevel],
              nv: int, b_width: int, unroll: int = INNER_UNROLL, mac=FLOAT_MAC):
    """Emit the reduction of one MR x NV tile; returns the accumulators as acc[m][v].

    a_rows: one base pointer per tile row (A[m, k] = a_rows[m][offset_a(k)]).
    b_ptr:  B[k, 0:NV*lanes] starts at b_ptr[offset_b(k)] (contiguous columns).
    b_width: valid columns of B (< NV*lanes only for a column tail; those loads are masked).
    mac: the element arithmetic (FLOAT_MAC, or the int8 kernels' integer one in quant.py); offsets
    count elements of A's and B's own types."""
    lanes = kb.lanes
    mr = len(a_rows)
    loops = simplify_loops(loops)
    acc = [mac.zero(kb)] * (mr * nv)

    def step(a_off, b_off, acc):
        bvec = [mac.load_b(kb, b_ptr, kb.add(b_off, v * lanes), min(lanes, b_width - v * lanes))
                for v in range(nv)]
        new = list(acc)
        for m in range(mr):
            a = mac.load_a(kb, a_rows[m], a_off)
            for v in range(nv):
                new[m * nv + v] = mac.accumulate(kb, a, bvec[v], new[m * nv + v])
        return new

    def level(d, a_off, b_off, acc):
        lp = loops[d]
        if d < len(loops) - 1:
            def outer(i, acc):
                return level(d + 1, kb.add(a_off, kb.mul(i, lp.a_stride)),
                             kb.add(b_off, kb.mul(i, lp.b_stride)), acc)
            return fold(kb, lp.count, acc, outer, name=f"red{d}")
        # innermost: unrolled by `unroll`, remainder steps afterwards
        if isinstance(lp.count, int) and lp.count <= FULL_UNROLL_LIMIT:
            for u in range(lp.count):
                acc = step(kb.add(a_off, kb.mul(u, lp.a_stride)), kb.add(b_off, kb.mul(u, lp.b_stride)), acc)
            return acc
        if isinstance(lp.count, int):
            full, rem = divmod(lp.count, unroll)
        else:
            full = kb.b.udiv(lp.count, kb.i64(unroll))
            rem = kb.b.urem(lp.count, kb.i64(unroll))

        def unrolled(i, acc):
            base = kb.mul(i, unroll)
            for u in range(unroll):
                k = kb.add(base, u)
                acc = step(kb.add(a_off, kb.mul(k, lp.a_stride)), kb.add(b_off, kb.mul(k, lp.b_stride)), acc)
            return acc
        acc = fold(kb, full, acc, unrolled, name=f"red{d}")
        start = kb.mul(full, unroll)
        if isinstance(rem, int):
            for u in range(rem):
                k = start + u
                acc = step(kb.add(a_off, kb.mul(k, lp.a_stride)), kb.add(b_off, kb.mul(k, lp.b_stride)), acc)
            return acc

        def leftover(i, acc):
            k = kb.add(start, i)
            return step(kb.add(a_off, kb.mul(k, lp.a_stride)), kb.add(b_off, kb.mul(k, lp.b_stride)), acc)
        return fold(kb, rem, acc, leftover, name=f"red{d}.rem")

    if loops:
        acc = level(0, 0, 0, acc)
    else:
        # every level had count 1 (a reduction of length 1: dense with one input feature, a 1x1 conv on
        # one channel, dy @ w^T of a Dense(1) head): exactly one step, at offset 0
        acc = step(0, 0, acc)
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
    lanes = target.vector_bits // 32
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
    lanes = target.vector_bits // 32
    nr = plan.nv * lanes
    nfull, rem = divmod(cols, nr)
    blocks = []
    if nfull:
        blocks.append(ColumnBlock(0, nfull, plan.nv, nr, plan.mr))
    if rem:
        nv_t = -(-rem // lanes)
        blocks.append(ColumnBlock(nfull * nr, 1, nv_t, rem, best_rows(rows, nv_t, target, k)))
    return blocks


def for_row_tiles(kb: KernelBuilder, rows: IntLike, mr: int, body: Callable[[IntLike, int], None],
                  name: str = "rows") -> None:
    """Call body(first_row, tile_rows) for tiles of `mr` rows covering range(rows). A constant row count
    gets one static remainder tile; a runtime count finishes with single-row tiles."""
    if isinstance(rows, int):
        full, rem = divmod(rows, mr)
    elif mr == 1:
        full, rem = rows, 0
    else:
        full, rem = kb.b.udiv(rows, kb.i64(mr)), None
    if not isinstance(full, int) or full > 0:
        with kb.for_range(full, name=name) as loop:
            body(kb.mul(loop.index, mr), mr)
    if isinstance(rem, int):
        if rem:
            body(full * mr, rem)
        return
    start = kb.b.mul(full, kb.i64(mr))
    with kb.for_range(kb.b.urem(rows, kb.i64(mr)), name=name + ".rem") as loop:
        body(kb.b.add(start, loop.index), 1)


def for_column_blocks(kb: KernelBuilder, blocks: Sequence[ColumnBlock],
                      body: Callable[[IntLike, ColumnBlock, IntLike], None], name: str = "cols") -> None:
    """Call body(first_column, block, block_index) for every column block (index counts all blocks)."""
    index0 = 0
    for blk in blocks:
        with kb.for_range(blk.count, name=name) as loop:
            body(kb.add(blk.start, kb.mul(loop.index, blk.nv * kb.lanes)), blk, kb.add(index0, loop.index))
        index0 += blk.count


def pack_b(kb: KernelBuilder, src: ir.Value, k: IntLike, k_stride: IntLike, col_stride: IntLike,
           blocks: Sequence[ColumnBlock], dst: ir.Value, src_type: ir.Type = F32, dst_type: ir.Type = F32) -> None:
    """Copy B (element (k, col) at src[k*k_stride + col*col_stride]) into `dst` as consecutive blocks of
    (k x nv*lanes) floats, zero-padded past each block's valid width — the layout emit_tile reads with
    b_stride = nv*lanes and no masks. Integer B (src_type i8) is sign-extended to dst_type (i32: 4 bytes,
    so the float-counted sizes below still hold)."""
    lanes = kb.lanes
    offset: IntLike = 0
    b = kb.b
    for blk in blocks:
        nr = blk.nv * lanes
        block_floats = kb.mul(k, nr)

        with kb.for_range(blk.count, name="pack") as lj:
            col0 = kb.add(blk.start, kb.mul(lj.index, nr))
            base = kb.gep(dst, kb.add(offset, kb.mul(lj.index, block_floats)))
            with kb.for_range(k, name="pack.k") as lk:
                row = kb.gep(base, kb.mul(lk.index, nr))
                for c in range(nr):
                    if c < blk.width:
                        v = kb.load(src, kb.add(kb.mul(lk.index, k_stride), kb.mul(kb.add(col0, c), col_stride)),
                                    src_type)
                        if src_type != dst_type:
                            v = b.sext(v, dst_type)
                    else:
                        v = ir.Constant(dst_type, 0)
                    kb.store(v, row, c)
        offset = kb.add(offset, kb.mul(blk.count, block_floats))


def packed_floats(blocks: Sequence[ColumnBlock], lanes: int) -> int:
    """Floats per unit of k that pack_b writes for these blocks (multiply by k for the total)."""
    return sum(blk.count * blk.nv * lanes for blk in blocks)


def packed_block(kb: KernelBuilder, packed: ir.Value, k: IntLike, blocks: Sequence[ColumnBlock],
                 which: int, j: IntLike) -> ir.Value:
    """Pointer to block j of blocks[which] inside a pack_b buffer."""
    lanes = kb.lanes
    before = sum(blk.count * blk.nv * lanes for blk in blocks[:which])
    return kb.gep(packed, kb.mul(k, kb.add(before, kb.mul(j, blocks[which].nv * lanes))))


# ----------------------------------------------------------------------------------------------------
# GEMM driver and the dense / matmul builders
# ----------------------------------------------------------------------------------------------------

def _check_dim(name: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {v!r}")


def emit_gemm(kb: KernelBuilder, *, rows: IntLike, cols: int, k: IntLike,
              a: ir.Value, a_row_stride: IntLike, a_k_stride: IntLike,
              b: ir.Value, b_k_stride: IntLike, b_col_stride: IntLike,
              out: ir.Value, epilogue: Epilogue, bias: ir.Value | None = None,
              mask: ir.Value | None = None, rows_hint: int | None = None,
              plan: TilePlan | None = None, packing: str = "per_call") -> int | None:
    """out[rows x cols] = epilogue(A @ B) with A[i, kk] = a[i*a_row_stride + kk*a_k_stride] and
    B[kk, j] = b[kk*b_k_stride + j*b_col_stride]; out rows are contiguous with `cols` floats.
    B is packed into zero-padded column blocks unless its columns are already contiguous and k is a
    runtime value (then tails use masked loads). Must be called in the entry block (scratch).
    packing (PACKINGS) "pack_only": only pack B into `out` and return the packed bytes; "prepacked": `b`
    is that packed buffer (both need a static k and a B that gets packed)."""
    lanes = kb.lanes
    k_hint = k if isinstance(k, int) else None
    rows_hint = rows if isinstance(rows, int) else rows_hint
    plan = plan or plan_tile(rows_hint, cols, kb.target, k_hint)
    blocks = column_blocks(rows_hint, cols, plan, kb.target, k_hint)
    pack = not (b_col_stride == 1 and not isinstance(k, int))
    if check_packing(packing) != "per_call":
        if not pack or not isinstance(k, int):
            raise ValueError(f"emit_gemm: packing={packing!r} needs a static k and a packed B")
        if packing == "pack_only":
            pack_b(kb, b, k, b_k_stride, b_col_stride, blocks, out)
            return 4 * k * packed_floats(blocks, lanes)
        packed = b
    elif pack:
        if isinstance(k, int):
            packed = kb.scratch(k * packed_floats(blocks, lanes))
        elif k is kb.n:         # x^T @ dy: the reduction runs over the batch
            packed = kb.scratch(packed_floats(blocks, lanes), per_sample=True)
        else:
            raise ValueError("emit_gemm: a runtime reduction length must be the batch size n")
        pack_b(kb, b, k, b_k_stride, b_col_stride, blocks, packed)

    for which, blk in enumerate(blocks):
        nr = blk.nv * lanes

        def row_tile(r0, mr, blk=blk, nr=nr, which=which):
            with kb.for_range(blk.count, name="cols") as lj:
                j = lj.index
                col0 = kb.add(blk.start, kb.mul(j, nr))
                a_rows = [kb.gep(a, kb.mul(kb.add(r0, m), a_row_stride)) for m in range(mr)]
                if pack:
                    bp = packed_block(kb, packed, k, blocks, which, j)
                    loops = [ReductionLevel(k, a_k_stride, nr)]
                    width_b = nr
                else:
                    bp = kb.gep(b, col0)
                    loops = [ReductionLevel(k, a_k_stride, b_k_stride)]
                    width_b = blk.width
                acc = emit_tile(kb, a_rows, bp, loops, blk.nv, width_b)
                out_rows = [kb.gep(out, kb.add(kb.mul(kb.add(r0, m), cols), col0)) for m in range(mr)]
                ops = EpilogueOperands(
                    bias=kb.gep(bias, col0) if bias is not None else None,
                    mask_rows=([kb.gep(mask, kb.add(kb.mul(kb.add(r0, m), cols), col0)) for m in range(mr)]
                               if mask is not None else None))
                epilogue.emit(kb, acc, out_rows, blk.width, ops)
        for_row_tiles(kb, rows, blk.mr, row_tile)


# How a GEMM kernel gets its packed weights (B): packed into scratch on every call, or once by the
# kernel's own "pack_only" variant (same builder, same blocks, so the same layout) into a buffer the
# "prepacked" variant then reads in place of the weights (codegen: weights that never change in a call).
PACKINGS = ("per_call", "pack_only", "prepacked")


def check_packing(packing: str) -> str:
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    return packing


def finish_pack(kb: KernelBuilder, nbytes: int) -> ir.Function:
    """Finish a "pack_only" kernel, recording the packed buffer's size (fn.packed_bytes)."""
    fn = kb.finish()
    fn.packed_bytes = int(nbytes)
    return fn


def gemm_builder(module, name, n_ptrs, target, int_arg_names=()) -> KernelBuilder:
    """A KernelBuilder for a new kernel function `void name(ptr x n_ptrs, ptr scratch, [i64 ...,] i64 n)`
    (the extra i64 arguments named by int_arg_names), set up for
    hand-unrolled GEMM code (LLVM's unroller is switched off for its loops: the generator already unrolled
    what pays off). `scratch` must point to scratch_need(fn).bytes(n) bytes, 64-byte aligned (packed
    operands, padded images); it may be null when that is 0."""
    kb = KernelBuilder(module, name, n_ptrs, target, scratch_arg=True, int_arg_names=int_arg_names)
    kb.default_unroll = False
    return kb


def build_dense(module: ir.Module, name: str, *, in_features: int, units: int, has_bias: bool,
                activation: str = "linear", activation_params: tuple = (), target, output_mask: bool = False,
                plan: TilePlan | None = None, packing: str = "per_call") -> ir.Function:
    """void name(ptr x, ptr w, ptr b, [ptr y,] ptr out, i64 n): out (n, units) =
    activation(x (n, in_features) @ w (in_features, units) + b) [* (y > 0) when output_mask].
    `b` is not read when has_bias is False (may be null). packing: see PACKINGS and emit_gemm."""
    _check_dim("in_features", in_features)
    _check_dim("units", units)
    activation, activation_params = check_activation(activation, activation_params)
    kb = gemm_builder(module, name, 4 + bool(output_mask), target)
    x, w, bias = kb.args[:3]
    mask = kb.args[3] if output_mask else None
    out, n = kb.args[-1], kb.n
    packed = emit_gemm(kb, rows=n, cols=units, k=in_features, a=x, a_row_stride=in_features, a_k_stride=1,
                       b=w, b_k_stride=units, b_col_stride=1, out=out,
                       epilogue=Epilogue.of(bias=has_bias, activation=activation, activation_params=activation_params,
                                            positive_mask=output_mask),
                       bias=bias if has_bias else None, mask=mask, plan=plan, packing=packing)
    return finish_pack(kb, packed) if packing == "pack_only" else kb.finish()


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
    k_b = b_shape[1] if transpose_b else b_shape[0]
    cols = b_shape[0] if transpose_b else b_shape[1]
    if ka != k_b:
        raise ValueError(f"matmul reduction dims differ: op(a) has {ka}, op(b) has {k_b} "
                         f"(a_shape={a_shape}, b_shape={b_shape}, transpose_a={transpose_a}, "
                         f"transpose_b={transpose_b}); None means the runtime batch")
    if cols is None:
        raise ValueError(f"matmul output columns must be static, got b_shape={b_shape} "
                         f"with transpose_b={transpose_b}")
    kb = gemm_builder(module, name, 3 + bool(output_mask), target)
    a, bm = kb.args[:2]
    mask = kb.args[2] if output_mask else None
    out, n = kb.args[-1], kb.n
    rows_v = n if rows is None else rows
    k_v = n if ka is None else ka
    a_rows_dim = a_shape[1] if a_shape[1] is not None else n     # stored row length of a
    b_rows_dim = b_shape[1] if b_shape[1] is not None else n
    emit_gemm(kb, rows=rows_v, cols=cols, k=k_v, a=a,
              a_row_stride=1 if transpose_a else a_rows_dim,
              a_k_stride=a_rows_dim if transpose_a else 1,
              b=bm, b_k_stride=1 if transpose_b else b_rows_dim,
              b_col_stride=b_rows_dim if transpose_b else 1,
              out=out, epilogue=Epilogue.of(positive_mask=output_mask), mask=mask, plan=plan)
    return kb.finish()
