"""int8 inference kernels of the LLVM backend: quantize, dequantize, conv2d_q, dense_q, with the exact
arithmetic of ir/ops/quant.py (bit-identical to backends/numpy/kernels.py's int8 section).

Accumulation is in i32 on the GEMM microkernel (matmul.emit_tile) with an integer multiply-accumulate
(`mac`). Integer addition wraps modulo 2**32 in any order, so tiling and unrolling cannot change the
result (the op's two's-complement accumulator). Three `mac`s, chosen per kernel (`_choose_path`):

- VNNI (`DotProductAccumulate`, only when the target's features include avx512vnni / avxvnni):
  vpdpbusd over groups of 4 consecutive k of a contiguous run of taps, u8 x s8; i8 activations are
  read as u8 (x ^ 0x80 = x + 128) and the +128 is compensated in the folded bias;
- portable pairs (`PairMultiplyAccumulate`, plain IR): groups of 2 k widened to i16, even/odd products
  summed in i32 — x86 selects vpmaddwd;
- portable singles (`IntegerMultiplyAccumulate`): one k at a time, sext/zext to i32, vector mul/add,
  for nests without a contiguous innermost run (a dilated conv over one channel).

Grouped weights are packed per call into dwords (GroupedReduction, pack_groups), zero past each run, so
a group's extra A bytes (read from the run's slack: a scratch copy when needed) multiply 0.

- the activation zero point leaves the inner loop: sum_k (x_k - zp) w_kc = sum_k x_k w_kc - zp * sum_k w_kc,
  exact modulo 2**32, so each call first folds `b[c] - zp * sum_k w[k, c]` into one i32 per output
  channel. Padding cells hold zp (the padded image is filled with it), so they contribute exactly 0;
- requantization as the op defines it: sitofp (round to nearest even), one float32 multiply by the
  compile-time multiplier m[c] (backends/numpy/kernels.requant_multiplier, the one definition), roundeven,
  + y_zero_point, clamp to [y_min, y_max], convert.

Signatures (n = runtime batch size; shapes are compile-time):
    quantize(ptr x, ptr out, i64 n)                          f32 -> u8/i8
    dequantize(ptr x, ptr out, i64 n)                        u8/i8 -> f32
    dense_q(ptr x, ptr w, ptr b, ptr out, ptr scratch, i64 n)     b may be null (has_bias False)
    conv2d_q(ptr x, ptr w, ptr b, ptr r, ptr out, ptr scratch, i64 n)    r may be null (no residual)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from backends.numpy.kernels import requant_multiplier

from .builder import F32, I8, I32, I64, VOID, KernelBuilder

I16 = ir.IntType(16)
from .conv import _pixel_offset, _tap_loops, conv_geometry
from .elementwise import check_shape, numel
from .matmul import (ReductionLevel, check_packing, column_blocks, emit_tile, finish_pack, for_row_tiles, gemm_builder,
                     pack_b, packed_block, packed_floats, plan_tile, simplify_loops)

# (signed, lo, hi) of each quantized activation dtype (ir/ops/quant.py QUANT_RANGES)
QUANT_FORMATS = {"u8": (False, 0, 255), "i8": (True, -128, 127)}


def _format(kernel: str, what: str, dtype) -> tuple[bool, int, int]:
    if dtype not in QUANT_FORMATS:
        raise ValueError(f"{kernel}: {what} must be one of {', '.join(QUANT_FORMATS)}, got {dtype!r}")
    return QUANT_FORMATS[dtype]


def _check_int(kernel: str, what: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{kernel}: {what} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def _check_scale(kernel: str, what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{kernel}: {what} must be a positive finite number, got {value!r}")
    return float(value)


def _like(kb: KernelBuilder, v: ir.Value, etype: ir.Type) -> ir.Type:
    """The scalar or vector type of v's shape with element type etype."""
    return ir.VectorType(etype, v.type.count) if isinstance(v.type, ir.VectorType) else etype


def _int_const(v: ir.Value, value: int, etype: ir.Type = I32) -> ir.Constant:
    """An integer constant of v's shape."""
    if isinstance(v.type, ir.VectorType):
        return ir.Constant(ir.VectorType(etype, v.type.count), [value] * v.type.count)
    return ir.Constant(etype, value)


def widen(kb: KernelBuilder, q: ir.Value, signed: bool) -> ir.Value:
    """u8 (zero-extended) or i8 (sign-extended) bytes as i32, scalar or vector."""
    ty = _like(kb, q, I32)
    return kb.b.sext(q, ty) if signed else kb.b.zext(q, ty)


def saturate_to_bytes(kb: KernelBuilder, y: ir.Value, lo: int, hi: int) -> ir.Value:
    """clamp(y, lo, hi) for an integer-valued, NaN-free float y, converted to u8/i8 bytes (through i32:
    255 does not fit a signed byte)."""
    y = kb.minnum(kb.maxnum(y, kb.const(lo, like=y)), kb.const(hi, like=y))
    return kb.b.trunc(kb.b.fptosi(y, _like(kb, y, I32)), _like(kb, y, I8))


def _scale_kernel(kernel, module, name, shape, scale, zero_point, dtype, target):
    """The checked arguments and the `(x, out)` KernelBuilder of quantize / dequantize:
    -> (kb, shape, (signed, lo, hi), scale, zero_point)."""
    shape = check_shape(kernel, "shape", shape)
    fmt = _format(kernel, "dtype", dtype)
    scale = _check_scale(kernel, "scale", scale)
    zero_point = _check_int(kernel, "zero_point", zero_point, fmt[1], fmt[2])
    return KernelBuilder(module, name, 2, target, arg_names=("x", "out")), shape, fmt, scale, zero_point


def build_quantize(module: ir.Module, name: str, *, shape, scale, zero_point: int = 0, dtype: str = "u8",
                   target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = clamp(roundeven(x / scale) + zero_point) as u8/i8, NaN
    -> zero_point, +-inf saturate (ONNX QuantizeLinear; ir/ops/quant.py)."""
    kb, shape, (_, lo, hi), scale, zero_point = _scale_kernel("quantize", module, name, shape, scale, zero_point,
                                                               dtype, target)
    x, out = kb.args
    b = kb.b

    def body(s, _):
        q = kb.intrinsic("roundeven", b.fdiv(s.load(x), s.const(float(np.float32(scale)))))
        q = b.select(b.fcmp_unordered("uno", q, q), s.const(0.0), q)       # NaN counts as 0
        s.store(saturate_to_bytes(kb, b.fadd(q, s.const(zero_point)), lo, hi), out)
        return []

    kb.strips(numel(kb, shape), body)
    return kb.finish()


def build_dequantize(module: ir.Module, name: str, *, shape, scale, zero_point: int = 0, dtype: str = "u8",
                     target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = f32(x - zero_point) * f32(scale) (ONNX DequantizeLinear)."""
    kb, shape, (signed, _, _), scale, zero_point = _scale_kernel("dequantize", module, name, shape, scale,
                                                                  zero_point, dtype, target)
    x, out = kb.args
    b = kb.b

    def body(s, _):
        q = b.sub(widen(kb, s.load(x, etype=I8), signed), _int_const(s.const(0.0), zero_point))
        s.store(b.fmul(b.sitofp(q, s.float_type), s.const(float(np.float32(scale)))), out)
        return []

    kb.strips(numel(kb, shape), body)
    return kb.finish()


@dataclass(frozen=True)
class IntegerMultiplyAccumulate:
    """The arithmetic of an int8 GEMM tile (matmul.emit_tile's `mac`): A holds u8/i8 bytes, B the packed
    i32 weights, acc += widen(a) * b in i32 (wrapping, so any summation order gives the same bits). The
    fallback for reduction nests without a contiguous innermost run (a dilated conv on one channel)."""
    signed: bool
    a_offset = 0

    def zero(self, kb: KernelBuilder) -> ir.Value:
        return ir.Constant(ir.VectorType(I32, kb.lanes), [0] * kb.lanes)

    def load_a(self, kb: KernelBuilder, row: ir.Value, offset) -> ir.Value:
        return kb.splat(widen(kb, kb.load(row, offset, I8), self.signed))

    def load_b(self, kb: KernelBuilder, ptr: ir.Value, offset, width: int) -> ir.Value:
        return kb.load_part(ptr, offset, width, etype=I32)

    def accumulate(self, kb: KernelBuilder, a: ir.Value, b: ir.Value, acc: ir.Value) -> ir.Value:
        return kb.b.add(kb.b.mul(a, b), acc)


@dataclass(frozen=True)
class DotProductAccumulate:
    """The arithmetic of a VNNI tile (`vpdpbusd`): A holds u8 bytes read four at a time (i8 activations
    are flipped to u8 by x ^ 0x80 = x + 128, compensated in the folded bias), B packed dwords of four
    i8 weights of consecutive k; acc += the four u8 x s8 products (exact: |sum| < 2**17, then a
    wrapping i32 add, as the portable path)."""
    intrinsic: str
    signed: bool

    @property
    def a_offset(self) -> int:
        """What load_a adds to every activation (compensated in the folded bias)."""
        return 128 if self.signed else 0

    def zero(self, kb: KernelBuilder) -> ir.Value:
        return ir.Constant(ir.VectorType(I32, kb.lanes), [0] * kb.lanes)

    def load_a(self, kb: KernelBuilder, row: ir.Value, offset) -> ir.Value:
        quad = kb.b.load(kb.gep(row, offset, I8), typ=I32, align=1)
        if self.signed:
            quad = kb.b.xor(quad, ir.Constant(I32, 0x80808080 - 2 ** 32))
        return kb.splat(quad)

    def load_b(self, kb: KernelBuilder, ptr: ir.Value, offset, width: int) -> ir.Value:
        return kb.load_part(ptr, offset, width, etype=I32)

    def accumulate(self, kb: KernelBuilder, a: ir.Value, b: ir.Value, acc: ir.Value) -> ir.Value:
        fn = kb.declare(self.intrinsic, acc.type, [acc.type] * 3)
        return kb.b.call(fn, [acc, a, b])


def vnni_intrinsic(target) -> str | None:
    """The vpdpbusd intrinsic for the target's vector width when its features include VNNI (avx512vnni
    for 512-bit vectors; avxvnni or avx512vnni+avx512vl for 256-bit ones), else None (portable path)."""
    has = getattr(target, "has", None)
    if has is None:
        return None
    if target.vector_bits == 512 and has("avx512vnni"):
        return "llvm.x86.avx512.vpdpbusd.512"
    if target.vector_bits == 256 and (has("avxvnni") or (has("avx512vnni") and has("avx512vl"))):
        return "llvm.x86.avx512.vpdpbusd.256"
    return None


@dataclass(frozen=True)
class PairMultiplyAccumulate:
    """The portable int8 tile arithmetic on contiguous runs: A is read two bytes at a time and widened to
    a pair of i16, B holds packed pairs of i16 weights of consecutive k, and acc += a0*b0 + a1*b1 is
    written as plain IR (even/odd lanes, sext, mul, add) that x86 selects as `vpmaddwd` (16-bit pairs
    summed into i32: exact, |a*b| < 2**15). No activation offset."""
    signed: bool
    a_offset = 0

    def zero(self, kb: KernelBuilder) -> ir.Value:
        return ir.Constant(ir.VectorType(I32, kb.lanes), [0] * kb.lanes)

    def load_a(self, kb: KernelBuilder, row: ir.Value, offset) -> ir.Value:
        """The pair A[m, k], A[m, k+1] as i16, repeated over 2 * lanes i16 lanes."""
        b = kb.b
        pair = b.load(kb.gep(row, offset, I8), typ=ir.VectorType(I8, 2), align=1)
        wide = b.sext(pair, ir.VectorType(I16, 2)) if self.signed else b.zext(pair, ir.VectorType(I16, 2))
        return b.shuffle_vector(wide, ir.Constant(wide.type, ir.Undefined),
                                ir.Constant(ir.VectorType(I32, 2 * kb.lanes), [0, 1] * kb.lanes))

    def load_b(self, kb: KernelBuilder, ptr: ir.Value, offset, width: int) -> ir.Value:
        """lanes packed weight pairs as 2 * lanes i16."""
        return kb.b.bitcast(kb.load_part(ptr, offset, width, etype=I32), ir.VectorType(I16, 2 * kb.lanes))

    def accumulate(self, kb: KernelBuilder, a: ir.Value, b: ir.Value, acc: ir.Value) -> ir.Value:
        # this exact shape (sext, mul nsw, even + odd lanes) is what x86 instruction selection turns
        # into vpmaddwd after O3 (shuffling before the multiply is not: it becomes vpmulld)
        bld = kb.b
        lanes = acc.type.count
        wide = ir.VectorType(I32, 2 * lanes)
        prod = bld.mul(bld.sext(a, wide), bld.sext(b, wide), flags=("nsw",))
        even, odd = (bld.shuffle_vector(prod, ir.Constant(wide, ir.Undefined),
                                        ir.Constant(ir.VectorType(I32, lanes), [2 * i + parity for i in range(lanes)]))
                     for parity in (0, 1))
        return bld.add(bld.add(even, odd), acc)


@dataclass(frozen=True)
class GroupedReduction:
    """The reduction nest of a grouped int8 kernel: `outer` levels (count, A stride in bytes, k stride)
    around one contiguous run of `run` k values, read as ceil(run / group) groups of `group` consecutive
    k (the last padded with zero weights; its extra A bytes are read but multiplied by 0, so A needs
    group - 1 readable bytes past each run). B holds one dword per (group row, column): 4 i8 weights
    (VNNI) or 2 i16 (pairs)."""
    outer: tuple
    run: int
    group: int

    @property
    def groups(self) -> int:
        return -(-self.run // self.group)

    @property
    def group_rows(self) -> int:
        return math.prod(c for c, _, _ in self.outer) * self.groups

    @property
    def weight_type(self) -> ir.Type:
        return I8 if self.group == 4 else I16

    def levels(self, nr: int) -> list[ReductionLevel]:
        """emit_tile's nest over packed group rows of nr dwords."""
        out, inner_rows = [], self.groups
        for count, a_stride, _ in reversed(self.outer):
            out.append(ReductionLevel(count, a_stride, inner_rows * nr))
            inner_rows *= count
        return list(reversed(out)) + [ReductionLevel(self.groups, self.group, nr)]


def grouped_reduction(levels, group: int) -> GroupedReduction | None:
    """The GroupedReduction of a reduction nest given as ReductionLevels with b_stride = the k stride, or
    None when its innermost level is not a contiguous run of A (then the one-k-at-a-time path runs)."""
    levels = simplify_loops(levels)
    if not levels:
        return GroupedReduction((), 1, group)
    inner = levels[-1]
    if inner.a_stride != 1 or inner.b_stride != 1:
        return None
    return GroupedReduction(tuple((lv.count, lv.a_stride, lv.b_stride) for lv in levels[:-1]), inner.count, group)


def pack_groups(kb: KernelBuilder, w, channels: int, red: GroupedReduction, blocks, packed) -> None:
    """packed = w (k, channels) i8 as the column blocks of dwords the grouped tiles read: per block,
    group row q, column c: w[k(q, 0..group-1), c] (sign-extended to i16 for pairs), zero past the run and
    past the block's width."""
    b = kb.b
    lanes = kb.lanes
    etype = red.weight_type
    shift = red.group.bit_length() - 1
    kb.memset_zero(packed, red.group_rows * packed_floats(blocks, lanes))      # dwords count as floats
    for which, blk in enumerate(blocks):
        nr = blk.nv * lanes
        with kb.for_range(blk.count, name="packg") as lj:
            base = packed_block(kb, packed, red.group_rows, blocks, which, lj.index)
            col0 = kb.add(blk.start, kb.mul(lj.index, nr))
            with kb.for_range(blk.width, name="packg.c") as lc:

                def nest(d, k0, row):
                    if d < len(red.outer):
                        count, _, k_stride = red.outer[d]
                        with kb.for_range(count, name=f"packg.o{d}") as lo:
                            nest(d + 1, kb.add(k0, kb.mul(lo.index, k_stride)), kb.add(kb.mul(row, count), lo.index))
                        return
                    with kb.for_range(red.run, name="packg.k") as lk:
                        k = lk.index
                        group_row = kb.add(kb.mul(row, red.groups), b.lshr(k, kb.i64(shift)))
                        at = kb.add(kb.mul(kb.add(kb.mul(group_row, nr), lc.index), red.group),
                                    b.and_(k, kb.i64(red.group - 1)))
                        v = kb.load(w, kb.add(kb.mul(kb.add(k0, k), channels), kb.add(col0, lc.index)), I8)
                        kb.store(v if etype == I8 else b.sext(v, etype), kb.gep(base, at, etype))
                nest(0, 0, 0)


@dataclass(frozen=True)
class Requantization:
    """What a conv2d_q/dense_q output tile does with its i32 accumulators (all checked, compile-time)."""
    x_signed: bool
    x_zero_point: int
    multipliers: tuple          # float32 m[c], one per output channel
    y_zero_point: int
    y_min: int
    y_max: int


def requantization(kernel: str, *, channels: int, x_dtype, x_scale, x_zero_point, w_scale, y_scale,
                   y_zero_point, dtype, y_min, y_max) -> Requantization:
    """Check the quantization attributes of conv2d_q/dense_q (ValueError naming the argument)."""
    x_signed, xlo, xhi = _format(kernel, "x_dtype", x_dtype)
    _, lo, hi = _format(kernel, "dtype", dtype)
    if not isinstance(w_scale, (tuple, list)) or len(w_scale) != channels:
        raise ValueError(f"{kernel}: w_scale must hold {channels} scales (one per output channel), got {w_scale!r:.80}")
    scales = [_check_scale(kernel, f"w_scale[{i}]", s) for i, s in enumerate(w_scale)]
    m = requant_multiplier(_check_scale(kernel, "x_scale", x_scale), scales, _check_scale(kernel, "y_scale", y_scale))
    y_min = lo if y_min is None else _check_int(kernel, "y_min", y_min, lo, hi)
    y_max = hi if y_max is None else _check_int(kernel, "y_max", y_max, lo, hi)
    if y_min > y_max:
        raise ValueError(f"{kernel}: y_min {y_min} is larger than y_max {y_max}")
    return Requantization(x_signed, _check_int(kernel, "x_zero_point", x_zero_point, xlo, xhi),
                          tuple(float(v) for v in m), _check_int(kernel, "y_zero_point", y_zero_point, lo, hi),
                          y_min, y_max)


def _multiplier_table(kb: KernelBuilder, rq: Requantization, padded: int) -> ir.GlobalVariable:
    """m[c] as an internal constant array, zero-padded to `padded` entries so full vectors can be read."""
    ty = ir.ArrayType(F32, padded)
    table = ir.GlobalVariable(kb.module, ty, name=f"{kb.fn.name}.multipliers")
    table.global_constant = True
    table.linkage = "internal"
    table.initializer = ir.Constant(ty, list(rq.multipliers) + [0.0] * (padded - len(rq.multipliers)))
    return table


def _fold_zero_point_into_bias(kb: KernelBuilder, rq: Requantization, w, bias, k: int, channels: int,
                               comp, a_offset: int = 0) -> None:
    """comp[c] = b[c] - (x_zero_point + a_offset) * sum_k w[k, c] (i32, wrapping; b = 0 without a bias);
    a_offset is what the kernel added to every activation (128 when VNNI reads i8 as u8)."""
    b = kb.b
    zero_point = rq.x_zero_point + a_offset
    with kb.for_range(channels, name="comp") as lc:
        c = lc.index
        start = kb.load(bias, c, I32) if bias is not None else ir.Constant(I32, 0)
        if zero_point:
            with kb.for_range(k, name="comp.k") as lk:
                acc = lk.carry(ir.Constant(I32, 0))
                lk.next(acc, b.add(acc, b.sext(kb.load(w, kb.add(kb.mul(lk.index, channels), c), I8), I32)))
            start = b.sub(start, b.mul(lk.result(acc), ir.Constant(I32, zero_point)))
        kb.store(start, comp, c)


@dataclass(frozen=True)
class ResidualTerm:
    """The residual of a conv2d_q (ir/ops/quant.py): f32(r - zero_point) * multiplier added before rint."""
    signed: bool
    zero_point: int
    multiplier: float          # f32(f64(r_scale) / f64(y_scale))


def residual_term(kernel: str, r_dtype, r_scale, r_zero_point, y_scale) -> ResidualTerm:
    signed, lo, hi = _format(kernel, "r_dtype", r_dtype)
    mr = np.float32(np.float64(_check_scale(kernel, "r_scale", r_scale)) / np.float64(_check_scale(kernel, "y_scale", y_scale)))
    return ResidualTerm(signed, _check_int(kernel, "r_zero_point", r_zero_point, lo, hi), float(mr))


def _requantize_tile(kb: KernelBuilder, rq: Requantization, acc, out_rows, width: int, comp, table, col0,
                     residual_rows=None, res: ResidualTerm | None = None) -> None:
    """acc[m][v] (i32 vectors) -> out_rows[m][v*lanes ...] as u8/i8, only the first `width` columns; with
    residual_rows (byte rows laid out like out_rows) the residual term is added before rounding."""
    b = kb.b
    lanes = kb.lanes
    for m, row in enumerate(acc):
        for v, value in enumerate(row):
            col = kb.add(col0, v * lanes)
            w = min(lanes, width - v * lanes)
            total = b.add(value, kb.load_part(comp, col, w, etype=I32))
            y = b.fmul(b.sitofp(total, kb.vec_type()), kb.load_part(table, col, w))
            if residual_rows is not None:
                r = b.sub(widen(kb, kb.load_part(residual_rows[m], v * lanes, w, etype=I8), res.signed),
                          _int_const(value, res.zero_point))
                y = b.fadd(y, b.fmul(b.sitofp(r, kb.vec_type()), kb.const(res.multiplier, like=y)))
            y = b.fadd(kb.intrinsic("roundeven", y), kb.const(rq.y_zero_point, like=y))
            kb.store_part(saturate_to_bytes(kb, y, rq.y_min, rq.y_max), out_rows[m], v * lanes, w)


def _int_gemm_setup(kb: KernelBuilder, rows_hint, k: int, channels: int, packing: str, w, out):
    """Column blocks and the buffers (packed i32 weights, then the folded bias) of a conv2d_q/dense_q
    kernel: (blocks, packed, comp, padded columns, packed bytes). per_call: both in scratch (so this must run
    in the entry block); pack_only: written to `out`; prepacked: read from `w` (matmul.PACKINGS)."""
    plan = plan_tile(rows_hint, channels, kb.target, k)
    blocks = column_blocks(rows_hint, channels, plan, kb.target, k)
    padded = packed_floats(blocks, kb.lanes)
    if check_packing(packing) == "per_call":
        packed = kb.scratch(k * padded)            # i32 elements: 4 bytes, as the floats scratch counts
        comp = kb.scratch(padded)
    else:
        packed = out if packing == "pack_only" else w
        comp = kb.gep(packed, k * padded)
    return blocks, packed, comp, padded, 4 * (k * padded + padded)


def _pack_int_weights(kb, rq, mac, red, w, bias, k, channels, blocks, packed, comp) -> None:
    """The per-call (or pack_only) work on the weights: pack them for the tiles, fold the zero points
    into the bias."""
    if red is None:
        pack_b(kb, w, k, channels, 1, blocks, packed, src_type=I8, dst_type=I32)
    else:
        pack_groups(kb, w, channels, red, blocks, packed)
    _fold_zero_point_into_bias(kb, rq, w, bias, k, channels, comp, mac.a_offset)


def _emit_tiles(kb, rq, mac, blocks, packed, comp, table, k, rows, a_row, loops, out_row, residual_row=None,
                res=None):
    """Every (row tile, column block) of an int8 GEMM: a_row(r) points at row r's first A byte, loops(nr)
    is the reduction nest over k packed rows, out_row(r, col) the output byte of (row r, column col),
    residual_row(r, col) the residual byte there (conv2d_q with a residual)."""
    lanes = kb.lanes
    for which, blk in enumerate(blocks):
        nr = blk.nv * lanes

        def row_tile(r0, mr, which=which, blk=blk, nr=nr):
            with kb.for_range(blk.count, name="cols") as lj:
                col0 = kb.add(blk.start, kb.mul(lj.index, nr))
                a_rows = [a_row(kb.add(r0, m)) for m in range(mr)]
                acc = emit_tile(kb, a_rows, packed_block(kb, packed, k, blocks, which, lj.index), loops(nr),
                                blk.nv, nr, mac=mac)
                _requantize_tile(kb, rq, acc, [out_row(kb.add(r0, m), col0) for m in range(mr)], blk.width,
                                 comp, table, col0,
                                 None if residual_row is None else
                                 [residual_row(kb.add(r0, m), col0) for m in range(mr)], res)
        for_row_tiles(kb, rows, blk.mr, row_tile)


def _choose_path(kb: KernelBuilder, rq: Requantization, levels, vnni: bool | None):
    """(mac, GroupedReduction or None) of a conv2d_q/dense_q kernel: VNNI groups of 4 when allowed (vnni
    None = when the target has it; False = never), else pairs for `vpmaddwd`, else (no contiguous
    innermost run) one k at a time in i32."""
    intrinsic = vnni_intrinsic(kb.target) if vnni is not False else None
    if vnni and intrinsic is None:
        raise ValueError(f"vnni=True but target {kb.target!r} has no VNNI for {kb.target.vector_bits}-bit vectors")
    if intrinsic is not None:
        red = grouped_reduction(levels, 4)
        if red is not None:
            return DotProductAccumulate(intrinsic, rq.x_signed), red
    red = grouped_reduction(levels, 2)
    if red is not None:
        return PairMultiplyAccumulate(rq.x_signed), red
    return IntegerMultiplyAccumulate(rq.x_signed), None


def build_dense_q(module: ir.Module, name: str, *, in_features: int, units: int, has_bias: bool, x_dtype: str,
                  x_scale, w_scale, y_scale, x_zero_point: int = 0, y_zero_point: int = 0, dtype: str = "u8",
                  y_min=None, y_max=None, target, vnni: bool | None = None, packing: str = "per_call") -> ir.Function:
    """`void name(ptr x, ptr w, ptr b, ptr out, ptr scratch, i64 n)`: out (n, units) u8/i8 = requantized
    (x (n, in_features) u8/i8 - x_zero_point) @ w (in_features, units) i8 + b (units,) i32.
    vnni: None uses vpdpbusd when the target has it, False never (the portable path).
    packing (matmul.PACKINGS): "pack_only" writes the packed weights and folded bias to `out`
    (fn.packed_bytes), "prepacked" reads them from `w` (b is then not read)."""
    for what, v in (("in_features", in_features), ("units", units)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"dense_q: {what} must be a positive int, got {v!r}")
    rq = requantization("dense_q", channels=units, x_dtype=x_dtype, x_scale=x_scale, x_zero_point=x_zero_point,
                        w_scale=w_scale, y_scale=y_scale, y_zero_point=y_zero_point, dtype=dtype, y_min=y_min,
                        y_max=y_max)
    kb = gemm_builder(module, name, 4, target)
    x, w, bias, out = kb.args
    mac, red = _choose_path(kb, rq, [ReductionLevel(in_features, 1, 1)], vnni)
    # grouped reads go up to 3 bytes past a row: rows whose length is no multiple of the group are copied
    # into scratch with slack after the last one
    x_copy = (kb.scratch(-(-in_features // 4) + 1, per_sample=True)
              if red is not None and in_features % red.group and packing != "pack_only" else None)
    k_rows = red.group_rows if red is not None else in_features
    blocks, packed, comp, padded, nbytes = _int_gemm_setup(kb, None, k_rows, units, packing, w, out)
    if packing != "prepacked":
        _pack_int_weights(kb, rq, mac, red, w, bias if has_bias else None, in_features, units, blocks, packed, comp)
        if packing == "pack_only":
            return finish_pack(kb, nbytes)
    table = _multiplier_table(kb, rq, padded)
    src = x
    if x_copy is not None:
        memcpy, _ = _byte_intrinsics(kb)
        kb.b.call(memcpy, [x_copy, x, kb.i64(kb.mul(kb.n, in_features)), ir.Constant(ir.IntType(1), 0)])
        src = x_copy
    _emit_tiles(kb, rq, mac, blocks, packed, comp, table, k_rows, kb.n,
                a_row=lambda r: kb.gep(src, kb.mul(r, in_features), I8),
                loops=(lambda nr: [ReductionLevel(in_features, 1, nr)]) if red is None else red.levels,
                out_row=lambda r, col: kb.gep(out, kb.add(kb.mul(r, units), col), I8))
    return kb.finish()


def _byte_intrinsics(kb: KernelBuilder):
    memcpy = kb.declare("llvm.memcpy.p0.p0.i64", VOID, [ir.PointerType(), ir.PointerType(), I64, ir.IntType(1)])
    memset = kb.declare("llvm.memset.p0.i64", VOID, [ir.PointerType(), I8, I64, ir.IntType(1)])
    return memcpy, memset


def build_conv2d_q(module: ir.Module, name: str, *, in_hwc, kernel_hw, filters, stride=(1, 1),
                   padding=((0, 0), (0, 0)), dilation=(1, 1), has_bias: bool, x_dtype: str, x_scale, w_scale,
                   y_scale, x_zero_point: int = 0, y_zero_point: int = 0, dtype: str = "u8", y_min=None,
                   y_max=None, r_dtype=None, r_scale=None, r_zero_point: int = 0, target,
                   vnni: bool | None = None, packing: str = "per_call") -> ir.Function:
    """`void name(ptr x, ptr w, ptr b, ptr r, ptr out, ptr scratch, i64 n)`: out (n, OH, OW, F) u8/i8 =
    requantized conv2d of x (n, H, W, C) u8/i8 (padding cells = x_zero_point) with w (KH, KW, C, F) i8 plus
    b (F,) i32, plus the residual r (laid out like out, dtype r_dtype; None: no residual, r not read), as an
    implicit GEMM (rows = output pixels, k = (kh, kw, c)) on the packed weights. vnni, packing: as dense_q."""
    g = conv_geometry(in_hwc, kernel_hw, filters, stride, padding, dilation)
    rq = requantization("conv2d_q", channels=g.f, x_dtype=x_dtype, x_scale=x_scale, x_zero_point=x_zero_point,
                        w_scale=w_scale, y_scale=y_scale, y_zero_point=y_zero_point, dtype=dtype, y_min=y_min,
                        y_max=y_max)
    res = None if r_dtype is None else residual_term("conv2d_q", r_dtype, r_scale, r_zero_point, y_scale)
    kb = gemm_builder(module, name, 5, target)
    x, w, bias, residual, out = kb.args
    b = kb.b
    k = g.taps
    mac, red = _choose_path(kb, rq, _tap_loops(g, 1), vnni)
    k_rows = red.group_rows if red is not None else k
    blocks, packed, comp, padded, nbytes = _int_gemm_setup(kb, g.pixels, k_rows, g.f, packing, w, out)
    if packing == "pack_only":
        _pack_int_weights(kb, rq, mac, red, w, bias if has_bias else None, k, g.f, blocks, packed, comp)
        return finish_pack(kb, nbytes)
    image_bytes = g.hp * g.wp * g.c
    # grouped reads go up to 3 bytes past a run of taps: then images always go through the scratch copy,
    # which has a spare dword at its end
    copied = g.padded or (red is not None and red.run % red.group != 0)
    xp = kb.scratch(-(-image_bytes // 4) + 1) if copied else None
    table = _multiplier_table(kb, rq, padded)
    memcpy, memset = _byte_intrinsics(kb)
    if packing == "per_call":
        _pack_int_weights(kb, rq, mac, red, w, bias if has_bias else None, k, g.f, blocks, packed, comp)
    if xp is not None:
        # the border keeps x_zero_point (a real 0) for the whole call; each image overwrites the interior
        b.call(memset, [xp, ir.Constant(I8, rq.x_zero_point & 0xFF), kb.i64(image_bytes + 4),
                        ir.Constant(ir.IntType(1), 0)])

    with kb.for_range(kb.n, name="image") as li:
        x_img = kb.gep(x, kb.mul(li.index, g.h * g.w * g.c), I8)
        if xp is not None:
            with kb.for_range(g.h, name="pad.copy") as lr:
                dst = kb.gep(xp, kb.mul(kb.add(kb.mul(lr.index, g.wp), g.pt * g.wp + g.pl), g.c), I8)
                b.call(memcpy, [dst, kb.gep(x_img, kb.mul(lr.index, g.w * g.c), I8), kb.i64(g.w * g.c),
                                ir.Constant(ir.IntType(1), 0)])
            src = xp
        else:
            src = x_img
        out_img = kb.gep(out, kb.mul(li.index, g.pixels * g.f), I8)
        res_img = kb.gep(residual, kb.mul(li.index, g.pixels * g.f), I8) if res is not None else None
        _emit_tiles(kb, rq, mac, blocks, packed, comp, table, k_rows, g.pixels,
                    a_row=lambda p: kb.gep(src, _pixel_offset(kb, g, p), I8),
                    loops=(lambda nr: _tap_loops(g, nr)) if red is None else red.levels,
                    out_row=lambda p, col: kb.gep(out_img, kb.add(kb.mul(p, g.f), col), I8),
                    residual_row=None if res is None else
                    (lambda p, col: kb.gep(res_img, kb.add(kb.mul(p, g.f), col), I8)), res=res)
    return kb.finish()
