"""Reductions of the LLVM backend, with the semantics of backends/numpy/kernels.py: reduce_sum /
reduce_mean over any set of axes (the batch included) and their gradient reduce_grad, built on the
broadcasting emitters of elementwise.py; global max pooling (NaN propagates) and its gradient (to the
first maximum, the first NaN when the maximum is NaN).

Signatures (n = runtime batch size):
    reduce_sum(ptr x, ptr out, i64 n)      reduce_mean(ptr x, ptr out, i64 n)
    reduce_grad(ptr dy, ptr out, i64 n)
    global_max_pool2d(ptr x, ptr out, i64 n)              x (n,H,W,C) -> out (n,C)
    global_max_pool2d_grad(ptr x, ptr y, ptr dy, ptr out, i64 n)
"""
from __future__ import annotations

from llvmlite import ir

from .builder import F32, I1, I8, KernelBuilder
from .elementwise import check_shape, emit_map, emit_sum_to, numel
from .pool import INT8_POOL_FORMATS, _image_shape, channel_blocks


def _axes(kernel: str, shape, axis) -> tuple:
    try:
        axes = tuple(sorted({int(a) for a in axis}))
    except (TypeError, ValueError):
        raise ValueError(f"{kernel}: axis must be a tuple of ints, got {axis!r}") from None
    if any(not 0 <= a < len(shape) for a in axes):
        raise ValueError(f"{kernel}: axis {axis!r} out of range for shape {shape!r}")
    return axes


def _kept(shape, axes) -> tuple:
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _count(kb: KernelBuilder, shape, axes) -> ir.Value:
    """Number of reduced elements (the batch counted at run time; at least 1) as a float32."""
    total = numel(kb, tuple(shape[a] for a in axes))
    value = kb.i64(total)
    value = kb.b.select(kb.b.icmp_signed("<", value, kb.i64(1)), kb.i64(1), value)
    return kb.b.sitofp(value, F32)


def _build_reduce(module, name, kernel, x_shape, axis, mean, target) -> ir.Function:
    x_shape = check_shape(kernel, "x_shape", x_shape)
    axes = _axes(kernel, x_shape, axis)
    kept = _kept(x_shape, axes)
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    emit_sum_to(kb, x, x_shape, out, kept)
    if mean:
        count = _count(kb, x_shape, axes)
        emit_map(kb, kept, [out], [(out, kept)], lambda s, v, base: [kb.b.fdiv(v[0], s.broadcast(count))])
    return kb.finish()


def build_reduce_sum(module: ir.Module, name: str, *, x_shape, axis, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = x summed over `axis` (keepdims or not: the same layout)."""
    return _build_reduce(module, name, "reduce_sum", x_shape, axis, False, target)


def build_reduce_mean(module: ir.Module, name: str, *, x_shape, axis, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = the sum over `axis` divided by the reduced element count."""
    return _build_reduce(module, name, "reduce_mean", x_shape, axis, True, target)


def build_reduce_grad(module: ir.Module, name: str, *, out_shape, axis, mean: bool, target) -> ir.Function:
    """`void name(ptr dy, ptr out, i64 n)`: out (out_shape) = dy broadcast over the reduced axes, divided by
    their element count when mean."""
    out_shape = check_shape("reduce_grad", "out_shape", out_shape)
    axes = _axes("reduce_grad", out_shape, axis)
    kept = _kept(out_shape, axes)
    kb = KernelBuilder(module, name, 2, target, arg_names=("dy", "out"))
    dy, out = kb.args
    count = _count(kb, out_shape, axes) if mean else None
    emit_map(kb, out_shape, [out], [(dy, kept)],
             lambda s, v, base: [kb.b.fdiv(v[0], s.broadcast(count)) if mean else v[0]])
    return kb.finish()


def _nan_max(kb: KernelBuilder, acc: ir.Value, v: ir.Value) -> ir.Value:
    """max that propagates NaN: a NaN accumulator stays, a NaN input wins (unordered '>' is true)."""
    b = kb.b
    return b.select(b.fcmp_unordered("uno", acc, acc), acc, b.select(b.fcmp_unordered(">", v, acc), v, acc))


def build_global_max_pool2d(module: ir.Module, name: str, *, in_hwc, dtype: str = "f32", target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out (n,C) = max over H and W of x (n,H,W,C); NaN propagates.
    dtype "u8"/"i8": integer compares on the bytes (a quantized value keeps its scale)."""
    h, w, c = _image_shape(in_hwc, "global_max_pool2d")
    if dtype != "f32" and dtype not in INT8_POOL_FORMATS:
        raise ValueError(f"global_max_pool2d: dtype must be f32, u8 or i8, got {dtype!r}")
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    if dtype == "f32":
        etype, lanes, init, combine = F32, kb.lanes, kb.const(float("-inf"), like=kb.vec_type()), \
            lambda a, v: _nan_max(kb, a, v)
    else:
        signed, smallest = INT8_POOL_FORMATS[dtype]
        compare = kb.b.icmp_signed if signed else kb.b.icmp_unsigned
        etype, lanes = I8, 4 * kb.lanes
        init = ir.Constant(kb.vec_type(lanes, I8), [smallest] * lanes)
        combine = lambda a, v: kb.b.select(compare(">", v, a), v, a)        # noqa: E731
    with kb.for_range(kb.n, name="batch") as lb:
        x_img = kb.gep(x, kb.mul(lb.index, h * w * c), etype)
        for block in channel_blocks(c, lanes):
            with kb.for_range(h * w, name="pix") as lp:
                accs = [lp.carry(init) for _ in block]
                pix = kb.mul(lp.index, c)
                for a, (off, width) in zip(accs, block):
                    lp.next(a, combine(a, kb.load_part(x_img, kb.add(pix, off), width, lanes, etype=etype)))
            for a, (off, width) in zip(accs, block):
                kb.store_part(lp.result(a), out, kb.add(kb.mul(lb.index, c), off), width)
    return kb.finish()


def build_global_max_pool2d_grad(module: ir.Module, name: str, *, in_hwc, target) -> ir.Function:
    """`void name(ptr x, ptr y, ptr dy, ptr out, i64 n)`: out (n,H,W,C) = dy at the first position (row-major)
    where x equals the max y (or is NaN when y is NaN), 0 elsewhere. Every element of out is written."""
    h, w, c = _image_shape(in_hwc, "global_max_pool2d_grad")
    kb = KernelBuilder(module, name, 4, target, arg_names=("x", "y", "dy", "out"))
    x, y, dy, out = kb.args
    b = kb.b
    mask_ty = ir.VectorType(I1, kb.lanes)
    with kb.for_range(kb.n, name="batch") as lb:
        img = kb.mul(lb.index, h * w * c)
        row = kb.mul(lb.index, c)
        for block in channel_blocks(c, kb.lanes):
            ys = [kb.load_part(y, kb.add(row, off), width) for off, width in block]
            dys = [kb.load_part(dy, kb.add(row, off), width) for off, width in block]
            y_nan = [b.fcmp_unordered("uno", v, v) for v in ys]
            zero = kb.const(0.0, like=kb.vec_type())
            with kb.for_range(h * w, name="pix") as lp:
                routed = [lp.carry(ir.Constant(mask_ty, [0] * kb.lanes), name="routed") for _ in block]
                pix = kb.add(img, kb.mul(lp.index, c))
                for r, yv, yn, dv, (off, width) in zip(routed, ys, y_nan, dys, block):
                    xv = kb.load_part(x, kb.add(pix, off), width)
                    hit = b.or_(b.fcmp_ordered("==", xv, yv), b.and_(b.fcmp_unordered("uno", xv, xv), yn))
                    hit = b.and_(hit, b.not_(r))
                    kb.store_part(b.select(hit, dv, zero), out, kb.add(pix, off), width)
                    lp.next(r, b.or_(r, hit))
    return kb.finish()
