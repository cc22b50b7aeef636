"""Elementwise, broadcasting, reduction, layout and dropout kernels of the LLVM backend, with the
semantics of backends/numpy/kernels.py.

Shapes are compile-time tuples whose first entry may be None: the batch dimension, whose size is the
kernel's runtime `i64 n` argument. Everything here is built from three emitters:

- `emit_map`: outs[i] = f(inputs broadcast to i) over an output shape (NumPy broadcasting, stride 0 on
  broadcast dimensions). Dimensions that stay contiguous for every operand are merged, so the innermost
  loop is as long as possible; it runs in explicit vector strips (`KernelBuilder.strips`), loads of operands
  broadcast along it are hoisted out of it. All loads of an element happen before its stores, so out may be
  one of the inputs (in-place ops).
- `emit_sum_to`: out[broadcast(i)] += x[i] in a fixed order (deterministic): the gradient of broadcasting.
- row kernels (softmax family) over an axis, three passes per row.

Signatures: inputs (ptr, in the contract's order), then out (ptr), then `i64 n`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

from llvmlite import ir

from .builder import I32, I64, REASSOC, IntLike, KernelBuilder, Strip, check_activation

Shape = tuple


# ------------------------------------------------------------------------------------------------------
# shapes

def check_shape(kernel: str, what: str, shape) -> Shape:
    """A shape tuple of positive ints, optionally with None (the runtime batch) as its first entry."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{kernel}: {what} must be a tuple of dimensions, got {shape!r}") from None
    for i, d in enumerate(dims):
        if d is None and i == 0:
            continue
        if d is None:
            raise ValueError(f"{kernel}: {what} {shape!r} has None (the batch) at axis {i}; only axis 0 may be None")
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"{kernel}: {what} {shape!r} must hold positive ints (and None first), got {d!r}")
    return dims


def broadcast_shape(kernel: str, a: Shape, b: Shape) -> Shape:
    """NumPy broadcast of two shapes; None (runtime batch) broadcasts with None or 1 only."""
    rank = max(len(a), len(b))
    pa, pb = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    out = []
    for da, db in zip(pa, pb):
        if da == db:
            out.append(da)
        elif da == 1:
            out.append(db)
        elif db == 1:
            out.append(da)
        else:
            raise ValueError(f"{kernel}: shapes {tuple(a)!r} and {tuple(b)!r} do not broadcast "
                             f"({da!r} vs {db!r}; the batch None only broadcasts with None or 1)")
    if None in out[1:]:
        raise ValueError(f"{kernel}: broadcasting {tuple(a)!r} with {tuple(b)!r} puts the batch (None) at a "
                         f"non-leading axis")
    return tuple(out)


def numel(kb: KernelBuilder, shape: Shape):
    """Element count of shape: an int, or an i64 value when it holds the batch."""
    total = 1
    for d in shape:
        total = kb.mul(total, kb.n if d is None else d)
    return total


def _static_size(shape: Shape) -> int:
    return math.prod(1 if d is None else d for d in shape)


def _input_strides(in_shape: Shape, out_shape: Shape) -> list[int]:
    """Element strides of in_shape broadcast to out_shape (0 on broadcast or missing dims). Strides are
    ints: only axis 0 may be the batch, and it has no stride of its own in a row-major layout."""
    lead = len(out_shape) - len(in_shape)
    strides, acc = [], 1
    for d in reversed(in_shape):
        strides.append(acc)
        acc *= 1 if d is None else d
    strides.reverse()
    out = [0] * lead
    for d_in, d_out, s in zip(in_shape, out_shape[lead:], strides):
        out.append(0 if (d_in == 1 and d_out != 1) else s)
    return out


def _merged_dims(out_shape: Shape, strides: Sequence[Sequence[int]]):
    """Drop size-1 dims and merge neighbours that stay contiguous for every operand.
    -> list of (size (int or None for the batch-carrying merged dim), static size factor, strides per operand),
    outermost first. A None size means `n * factor`."""
    dims = [(d, [s[i] for s in strides]) for i, d in enumerate(out_shape) if d != 1]
    merged: list = []         # innermost first while building: [batch?, factor, strides]
    for d, st in reversed(dims):
        if merged:
            batch, factor, inner = merged[-1]
            if not batch and all(so == si * factor for so, si in zip(st, inner)):
                merged[-1] = (d is None, factor * (1 if d is None else d), inner)
                continue
        merged.append((d is None, 1 if d is None else d, st))
    if not merged:
        merged = [(False, 1, [0] * len(strides))]
    merged.reverse()
    return merged


# ------------------------------------------------------------------------------------------------------
# emitters

def emit_map(kb: KernelBuilder, out_shape: Shape, outs: Sequence[ir.Value],
             inputs: Sequence[tuple[ir.Value, Shape]],
             fn: Callable[[Strip, list, IntLike], Sequence[ir.Value]]) -> None:
    """For every element i of out_shape (row-major): outs[k][i] = fn(strip, values, row_offset)[k], values
    the inputs at i. Input shapes broadcast to out_shape by NumPy rules (checked by the caller). `fn` gets
    scalars or vectors (see Strip); `strip.indices(row_offset)` are the flat output indices of the strip."""
    strides = [_input_strides(shape, out_shape) for _, shape in inputs]
    out_strides = _input_strides(out_shape, out_shape)
    dims = _merged_dims(out_shape, strides + [out_strides])
    ptrs = [p for p, _ in inputs]

    def nest(level: int, offsets: list):
        batch, factor, st = dims[level]
        size = kb.mul(kb.n, factor) if batch else factor
        if level == len(dims) - 1:
            # innermost: every operand has stride 1 or 0 here; stride-0 operands are loaded once
            fixed = [kb.load(p, off) if s == 0 else None for p, off, s in zip(ptrs, offsets, st)]

            def body(strip: Strip, carried):
                vals = [strip.broadcast(f) if f is not None else strip.load(p, off)
                        for f, p, off in zip(fixed, ptrs, offsets)]
                results = list(fn(strip, vals, offsets[-1]))
                if len(results) != len(outs):
                    raise ValueError(f"map function returned {len(results)} values for {len(outs)} outputs")
                for r, o in zip(results, outs):
                    strip.store(r, o, offsets[-1])
                return []

            kb.strips(size, body)
            return
        with kb.for_range(size, name=f"d{level}") as loop:
            nest(level + 1, [kb.add(off, kb.mul(loop.index, s)) for off, s in zip(offsets, st)])

    nest(0, [0] * (len(inputs) + 1))


def emit_sum_to(kb: KernelBuilder, x: ir.Value, x_shape: Shape, out: ir.Value, out_shape: Shape) -> None:
    """out = x summed down to out_shape (out broadcasts to x_shape), in row-major order of x (deterministic).
    Reductions along the innermost merged dimension use vector partial sums (a fixed lane split)."""
    out_strides = _input_strides(out_shape, x_shape)
    x_strides = _input_strides(x_shape, x_shape)
    dims = _merged_dims(x_shape, [x_strides, out_strides])
    kb.memset_zero(out, numel(kb, out_shape))

    def nest(level: int, x_off, o_off):
        batch, factor, (sx, so) = dims[level]
        size = kb.mul(kb.n, factor) if batch else factor
        if level == len(dims) - 1:
            if so == 0:
                # a reduction along contiguous x: partial sums in registers, then one add into out
                total, = kb.strips(size, lambda s, acc: [s.kb.b.fadd(acc[0], s.load(x, x_off), flags=REASSOC)],
                                   inits=[kb.const(0.0)], lane_reduce=[kb.hsum])
                kb.store(kb.b.fadd(kb.load(out, o_off), total), out, o_off)
            else:
                def body(s: Strip, carried):
                    s.store(kb.b.fadd(s.load(out, o_off), s.load(x, x_off)), out, o_off)
                    return []
                kb.strips(size, body)
            return
        with kb.for_range(size, name=f"d{level}") as loop:
            nest(level + 1, kb.add(x_off, kb.mul(loop.index, sx)), kb.add(o_off, kb.mul(loop.index, so)))

    nest(0, 0, 0)


# ------------------------------------------------------------------------------------------------------
# unary maps and activation gradients

def _unary(module, name, shape, target, kernel, f) -> ir.Function:
    shape = check_shape(kernel, "shape", shape)
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    emit_map(kb, shape, [out], [(x, shape)], lambda s, v, base: [f(kb, s, v[0])])
    return kb.finish()


def build_activation(module: ir.Module, name: str, *, kind: str, params=(), shape, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = the table activation `kind` (with `params`) of x, the
    builder's activation code (as fused epilogues). out may be x."""
    kind, params = check_activation(kind, params)
    return _unary(module, name, shape, target, kind, lambda kb, s, x: kb.activation(kind, x, params))


def build_neg(module: ir.Module, name: str, *, shape, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = -x."""
    return _unary(module, name, shape, target, "neg", lambda kb, s, x: kb.b.fneg(x))


def build_scale(module: ir.Module, name: str, *, shape, factor: float, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = x * factor (factor rounded to float32)."""
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise TypeError(f"scale: factor must be a number, got {factor!r}")
    return _unary(module, name, shape, target, "scale", lambda kb, s, x: kb.b.fmul(x, s.const(factor)))


def _unary_grad(module, name, shape, target, kernel, f) -> ir.Function:
    shape = check_shape(kernel, "shape", shape)
    kb = KernelBuilder(module, name, 3, target, arg_names=("y", "dy", "out"))
    y, dy, out = kb.args
    emit_map(kb, shape, [out], [(y, shape), (dy, shape)], lambda s, v, base: [f(kb, s, v[0], v[1])])
    return kb.finish()


def build_activation_grad(module: ir.Module, name: str, *, kind: str, params=(), shape,
                          target) -> ir.Function:
    """`void name(ptr y, ptr dy, ptr out, i64 n)`: out = dy * slope(y) for the table activation `kind`,
    y its output (the `<kind>_grad` op). out may be dy."""
    kind, params = check_activation(kind, params)
    return _unary_grad(module, name, shape, target, f"{kind}_grad",
                       lambda kb, s, y, dy: kb.activation_grad(kind, y, dy, params))


# ------------------------------------------------------------------------------------------------------
# binary broadcasting ops, bias, reductions

_BINARY = {"add": "fadd", "sub": "fsub", "mul": "fmul", "div": "fdiv"}


def build_binary(module: ir.Module, name: str, *, op: str, a_shape, b_shape, target) -> ir.Function:
    """`void name(ptr a, ptr b, ptr out, i64 n)`: out = a (op) b with NumPy broadcasting, op in
    add | sub | mul. The batch (None) may be on either side; out has the broadcast shape. out may be a or b
    when it has that operand's shape."""
    if op not in _BINARY:
        raise ValueError(f"binary: op must be one of {tuple(_BINARY)}, got {op!r}")
    a_shape = check_shape(op, "a_shape", a_shape)
    b_shape = check_shape(op, "b_shape", b_shape)
    out_shape = broadcast_shape(op, a_shape, b_shape)
    kb = KernelBuilder(module, name, 3, target, arg_names=("a", "b", "out"))
    a, b, out = kb.args
    instr = getattr(kb.b, _BINARY[op])
    emit_map(kb, out_shape, [out], [(a, a_shape), (b, b_shape)], lambda s, v, base: [instr(v[0], v[1])])
    return kb.finish()


def build_add(module: ir.Module, name: str, *, a_shape, b_shape, target) -> ir.Function:
    """out = a + b (broadcasting); see build_binary."""
    return build_binary(module, name, op="add", a_shape=a_shape, b_shape=b_shape, target=target)


def build_sub(module: ir.Module, name: str, *, a_shape, b_shape, target) -> ir.Function:
    """out = a - b (broadcasting); see build_binary."""
    return build_binary(module, name, op="sub", a_shape=a_shape, b_shape=b_shape, target=target)


def build_mul(module: ir.Module, name: str, *, a_shape, b_shape, target) -> ir.Function:
    """out = a * b (broadcasting); see build_binary."""
    return build_binary(module, name, op="mul", a_shape=a_shape, b_shape=b_shape, target=target)


def build_div(module: ir.Module, name: str, *, a_shape, b_shape, target) -> ir.Function:
    """out = a / b (broadcasting, IEEE division); see build_binary."""
    return build_binary(module, name, op="div", a_shape=a_shape, b_shape=b_shape, target=target)


def build_bias_add(module: ir.Module, name: str, *, shape, target) -> ir.Function:
    """`void name(ptr x, ptr b, ptr out, i64 n)`: out = x + b, b (C,) broadcast over x's last axis (C).
    out may be x."""
    shape = check_shape("bias_add", "shape", shape)
    if not shape:
        raise ValueError("bias_add: shape must have at least one axis (the channels)")
    kb = KernelBuilder(module, name, 3, target, arg_names=("x", "b", "out"))
    x, b, out = kb.args
    emit_map(kb, shape, [out], [(x, shape), (b, shape[-1:])], lambda s, v, base: [kb.b.fadd(v[0], v[1])])
    return kb.finish()


def build_sum_to(module: ir.Module, name: str, *, x_shape, out_shape, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = x summed down to out_shape (out_shape must broadcast to
    x_shape by NumPy rules; the batch None may be kept or summed away). out is fully overwritten."""
    x_shape = check_shape("sum_to", "x_shape", x_shape)
    out_shape = check_shape("sum_to", "out_shape", out_shape)
    lead = len(x_shape) - len(out_shape)
    if lead < 0 or any(o not in (1, d) for o, d in zip(out_shape, x_shape[lead:])):
        raise ValueError(f"sum_to: out_shape {out_shape!r} does not broadcast to x_shape {x_shape!r}")
    if None in out_shape and (lead != 0 or x_shape[0] is not None):
        raise ValueError(f"sum_to: out_shape {out_shape!r} keeps the batch but x_shape {x_shape!r} has it elsewhere")
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    emit_sum_to(kb, x, x_shape, out, out_shape)
    return kb.finish()


def build_bias_add_grad(module: ir.Module, name: str, *, shape, target) -> ir.Function:
    """`void name(ptr dy, ptr out, i64 n)`: out (C,) = dy (shape, last axis C) summed over all other axes."""
    shape = check_shape("bias_add_grad", "shape", shape)
    if not shape or shape[-1] is None:
        raise ValueError(f"bias_add_grad: shape must end with a static channel axis, got {shape!r}")
    return build_sum_to(module, name, x_shape=shape, out_shape=shape[-1:], target=target)


# ------------------------------------------------------------------------------------------------------
# layout

def build_copy(module: ir.Module, name: str, *, shape, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = x, numel(shape) floats (reshape / flatten). Overlap safe."""
    shape = check_shape("copy", "shape", shape)
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    fn = kb.declare("llvm.memmove.p0.p0.i64", ir.VoidType(), [x.type, x.type, I64, ir.IntType(1)])
    kb.b.call(fn, [out, x, kb.i64(kb.mul(numel(kb, shape), 4)), ir.Constant(ir.IntType(1), 0)])
    return kb.finish()


def build_transpose(module: ir.Module, name: str, *, in_shape, perm, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = x with axes permuted (out.shape[i] = in_shape[perm[i]]).
    A batch axis (None) must stay axis 0. Output rows are written contiguously."""
    in_shape = check_shape("transpose", "in_shape", in_shape)
    try:
        perm = tuple(int(p) for p in perm)
    except (TypeError, ValueError):
        raise ValueError(f"transpose: perm must be a sequence of ints, got {perm!r}") from None
    if sorted(perm) != list(range(len(in_shape))):
        raise ValueError(f"transpose: perm {perm!r} is not a permutation of the {len(in_shape)} axes of {in_shape!r}")
    if in_shape and in_shape[0] is None and perm[0] != 0:
        raise ValueError(f"transpose: perm {perm!r} moves the batch axis (None) away from axis 0")
    out_shape = tuple(in_shape[p] for p in perm)
    in_strides = _input_strides(in_shape, in_shape)
    # operand strides along the output's axes: x's strides permuted, out contiguous
    x_strides = [in_strides[p] for p in perm]
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    dims = _merged_dims(out_shape, [x_strides, _input_strides(out_shape, out_shape)])

    def nest(level, x_off, o_off):
        batch, factor, (sx, so) = dims[level]
        size = kb.mul(kb.n, factor) if batch else factor
        with kb.for_range(size, name=f"d{level}") as loop:
            xi = kb.add(x_off, kb.mul(loop.index, sx))
            oi = kb.add(o_off, kb.mul(loop.index, so))
            if level == len(dims) - 1:
                kb.store(kb.load(x, xi), out, oi)
            else:
                nest(level + 1, xi, oi)

    nest(0, 0, 0)
    return kb.finish()


# ------------------------------------------------------------------------------------------------------
# softmax family (along one axis)

def _axis_geometry(kernel: str, shape: Shape, axis: int):
    """(outer dims as a Shape, axis length, inner size) for a reduction along `axis`."""
    rank = len(shape)
    if not isinstance(axis, int) or not -rank <= axis < rank:
        raise ValueError(f"{kernel}: axis must be an int in [{-rank}, {rank}) for shape {shape!r}, got {axis!r}")
    axis %= rank
    if shape[axis] is None:
        raise ValueError(f"{kernel}: axis {axis} is the batch axis; softmax over the batch is not supported")
    return tuple(shape[:axis]), shape[axis], _static_size(shape[axis + 1:])


def _rows(kb: KernelBuilder, outer: Shape, k: int, inner: int, body) -> None:
    """body(base, step): for every row along the axis, base = flat index of its first element, step = the
    element stride (1 when the axis is last: contiguous rows, vector strips)."""
    with kb.for_range(numel(kb, outer), name="row") as lo:
        if inner == 1:
            body(kb.mul(lo.index, k), 1)
        else:
            with kb.for_range(inner, name="col") as li:
                body(kb.add(kb.mul(lo.index, k * inner), li.index), inner)


def _row_reduce(kb: KernelBuilder, k: int, step: int, init: float, combine, lane_reduce, value) -> ir.Value:
    """Fold combine(acc, value(strip)) over one row (length k, element stride step) into a scalar."""
    if step == 1:
        total, = kb.strips(k, lambda s, acc: [combine(acc[0], value(s))], inits=[kb.const(init)],
                           lane_reduce=[lane_reduce])
        return total
    with kb.for_range(k, name="k") as lk:
        acc = lk.carry(kb.const(init))
        lk.next(acc, combine(acc, value(_StridedStrip(kb, lk.index, step))))
    return lk.result(acc)


def _row_map(kb: KernelBuilder, k: int, step: int, body) -> None:
    """body(strip) for every element of one row."""
    if step == 1:
        kb.strips(k, lambda s, acc: body(s) or [])
        return
    with kb.for_range(k, name="k") as lk:
        body(_StridedStrip(kb, lk.index, step))


class _StridedStrip(Strip):
    """A scalar Strip over a strided row: element j is at base + j*step."""

    def __init__(self, kb: KernelBuilder, index: ir.Value, step: int):
        super().__init__(kb, kb.mul(index, step), None)


def _fmax(kb):
    return lambda a, v: kb.b.select(kb.b.fcmp_ordered(">", v, a), v, a)


def _fsum(kb):
    return lambda a, v: kb.b.fadd(a, v, flags=REASSOC)


def build_softmax(module: ir.Module, name: str, *, shape, axis: int = -1, target, log: bool = False) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = exp(x - max) / sum(exp(x - max)) along axis, or with
    log=True out = (x - max) - log(sum(exp(x - max))). Vectorized when axis is the last axis."""
    kernel = "log_softmax" if log else "softmax"
    shape = check_shape(kernel, "shape", shape)
    outer, k, inner = _axis_geometry(kernel, shape, axis)
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    b = kb.b

    def row(base, step):
        peak = _row_reduce(kb, k, step, float("-inf"), _fmax(kb), kb.hmax, lambda s: s.load(x, base))

        def shifted(s):
            return b.fsub(s.load(x, base), s.broadcast(peak))

        if log:
            total = _row_reduce(kb, k, step, 0.0, _fsum(kb), kb.hsum, lambda s: kb.exp(shifted(s)))
            lse = kb.log(total)
            _row_map(kb, k, step, lambda s: s.store(b.fsub(shifted(s), s.broadcast(lse)), out, base))
            return

        def write_exp(s):
            e = kb.exp(shifted(s))
            s.store(e, out, base)
            return e

        total = _row_reduce(kb, k, step, 0.0, _fsum(kb), kb.hsum, write_exp)
        _row_map(kb, k, step, lambda s: s.store(b.fdiv(s.load(out, base), s.broadcast(total)), out, base))

    _rows(kb, outer, k, inner, row)
    return kb.finish()


def build_log_softmax(module: ir.Module, name: str, *, shape, axis: int = -1, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: log_softmax along axis; see build_softmax."""
    return build_softmax(module, name, shape=shape, axis=axis, target=target, log=True)


def build_softmax_grad(module: ir.Module, name: str, *, shape, axis: int = -1, target,
                       log: bool = False) -> ir.Function:
    """`void name(ptr y, ptr dy, ptr out, i64 n)`: y the softmax output: out = y * (dy - sum(dy*y, axis));
    log=True (y the log_softmax output): out = dy - exp(y) * sum(dy, axis). out may be dy."""
    kernel = "log_softmax_grad" if log else "softmax_grad"
    shape = check_shape(kernel, "shape", shape)
    outer, k, inner = _axis_geometry(kernel, shape, axis)
    kb = KernelBuilder(module, name, 3, target, arg_names=("y", "dy", "out"))
    y, dy, out = kb.args
    b = kb.b

    def row(base, step):
        if log:
            total = _row_reduce(kb, k, step, 0.0, _fsum(kb), kb.hsum, lambda s: s.load(dy, base))
            _row_map(kb, k, step, lambda s: s.store(
                b.fsub(s.load(dy, base), b.fmul(kb.exp(s.load(y, base)), s.broadcast(total))), out, base))
            return
        total = _row_reduce(kb, k, step, 0.0, _fsum(kb), kb.hsum,
                            lambda s: b.fmul(s.load(dy, base), s.load(y, base)))
        _row_map(kb, k, step, lambda s: s.store(
            b.fmul(b.fsub(s.load(dy, base), s.broadcast(total)), s.load(y, base)), out, base))

    _rows(kb, outer, k, inner, row)
    return kb.finish()


def build_log_softmax_grad(module: ir.Module, name: str, *, shape, axis: int = -1, target) -> ir.Function:
    """`void name(ptr y, ptr dy, ptr out, i64 n)`: see build_softmax_grad (log=True)."""
    return build_softmax_grad(module, name, shape=shape, axis=axis, target=target, log=True)


# ------------------------------------------------------------------------------------------------------
# dropout: the contract's counter-based hash, bit-identical to backends/numpy/kernels.py

def _mix32(kb: KernelBuilder, h: ir.Value) -> ir.Value:
    """mix32 on an i32 scalar or vector (wrapping arithmetic)."""
    b = kb.b

    def c(v):
        return ir.Constant(h.type, [v] * h.type.count) if isinstance(h.type, ir.VectorType) else ir.Constant(I32, v)

    h = b.xor(h, b.lshr(h, c(16)))
    h = b.mul(h, c(0x7FEB352D))
    h = b.xor(h, b.lshr(h, c(15)))
    h = b.mul(h, c(0x846CA68B))
    return b.xor(h, b.lshr(h, c(16)))


def mix32(x: int) -> int:
    """The contract's mix32 on a Python int (mod 2**32), for compile-time keys and tests."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def _check_dropout(kernel: str, rate, seed) -> tuple[float, int]:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"{kernel}: rate must be a number in [0, 1), got {rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{kernel}: seed must be an int, got {seed!r}")
    return float(rate), seed


def build_dropout(module: ir.Module, name: str, *, shape, rate: float, seed: int, target,
                  has_step: bool = True, index_base: bool = False) -> ir.Function:
    """`void name(ptr x, ptr step, ptr out, i64 n)`: out = x * keep / (1 - rate), keep_i the contract's
    hash of (seed, step, flat index i); rate == 0 copies. `step` points to one float32 holding the step
    counter (an integer value; truncated like int()).

    has_step=False: no step argument, step = 0 — `void name(ptr x, ptr out, i64 n)`.
    index_base=True: an extra `i64 base` before n (`..., ptr out, i64 base, i64 n`): element i hashes flat
    index base + i, so a batch split across calls draws the same mask as one whole call.
    Also the gradient (dropout_grad(dy) has the same formula and mask). out may be x."""
    rate, seed = _check_dropout("dropout", rate, seed)
    shape = check_shape("dropout", "shape", shape)
    names = ("x", "step", "out") if has_step else ("x", "out")
    kb = KernelBuilder(module, name, len(names), target, arg_names=names,
                       int_arg_names=("base",) if index_base else ())
    base = kb.int_args[0] if index_base else None
    b = kb.b
    x, out = kb.args[0], kb.args[-1]
    if rate == 0.0:
        fn = kb.declare("llvm.memmove.p0.p0.i64", ir.VoidType(), [x.type, x.type, I64, ir.IntType(1)])
        b.call(fn, [out, x, kb.i64(kb.mul(numel(kb, shape), 4)), ir.Constant(ir.IntType(1), 0)])
        return kb.finish()
    seed_mix = (seed * 0x9E3779B9) & 0xFFFFFFFF
    if has_step:
        step = b.trunc(b.fptosi(kb.load(kb.args[1]), I64), I32)
        key = _mix32(kb, b.add(ir.Constant(I32, seed_mix), step))
    else:
        key = ir.Constant(I32, mix32(seed_mix))
    threshold = math.floor(rate * 4294967296.0)
    scale = 1.0 - rate

    def f(s: Strip, vals, out_off):
        idx = s.indices(out_off if base is None else kb.add(base, out_off))
        ity = ir.VectorType(I32, s.lanes) if s.lanes else I32
        h = b.trunc(idx, ity)
        k = kb.splat(key, s.lanes) if s.lanes else key
        h = _mix32(kb, b.xor(h, k))
        thr = ir.Constant(ity, [threshold] * s.lanes) if s.lanes else ir.Constant(I32, threshold)
        keep = b.select(b.icmp_unsigned(">=", h, thr), s.const(1.0), s.const(0.0))
        # x * keep, then / (1 - rate) in float32: the same two roundings as the NumPy kernel
        return [b.fdiv(b.fmul(vals[0], keep), s.const(scale))]

    emit_map(kb, shape, [out], [(x, shape)], f)
    return kb.finish()


def build_dropout_grad(module: ir.Module, name: str, *, shape, rate: float, seed: int, target,
                       has_step: bool = True, index_base: bool = False) -> ir.Function:
    """`void name(ptr dy, ptr step, ptr out, i64 n)`: out = dy * keep / (1 - rate) with the forward's
    mask for the same (seed, step); options as build_dropout."""
    return build_dropout(module, name, shape=shape, rate=rate, seed=seed, target=target, has_step=has_step,
                         index_base=index_base)
