"""Data-movement kernels of the LLVM backend: concat and slice along any axis, constant padding of NHWC
spatial axes and its gradient (a crop). Every one is a static pattern of contiguous runs: a loop over the
rows before the axis (the batch included) copying runs with llvm.memcpy (constant sizes, so LLVM expands
small ones into vector moves) and filling padding with vector stores.

Signatures (n = runtime batch size):
    concat(ptr v0, ..., ptr v{k-1}, ptr out, i64 n)
    slice(ptr x, ptr out, i64 n)        slice_grad(ptr dy, ptr out, i64 n)
    pad(ptr x, ptr out, i64 n)          x (n,H,W,C) -> out (n,H+t+b,W+l+r,C)
    pad_grad(ptr dy, ptr out, i64 n)    dy (n,H+t+b,W+l+r,C) -> out (n,H,W,C)
"""
from __future__ import annotations

import math

from llvmlite import ir

from .builder import KernelBuilder
from .elementwise import check_shape, numel
from .pool import _image_shape


def _axis(kernel: str, shape, axis) -> int:
    if not isinstance(axis, int) or not 0 <= axis < len(shape):
        raise ValueError(f"{kernel}: axis must be an int in [0, {len(shape)}) for {shape!r}, got {axis!r}")
    if shape[axis] is None:
        raise ValueError(f"{kernel}: axis {axis} is the batch axis")
    return axis


def build_concat(module: ir.Module, name: str, *, shapes, axis: int, target) -> ir.Function:
    """`void name(ptr v0, ..., ptr out, i64 n)`: out = the values joined along `axis`."""
    shapes = [check_shape("concat", f"shapes[{i}]", s) for i, s in enumerate(shapes)]
    if not shapes:
        raise ValueError("concat: needs at least one value")
    axis = _axis("concat", shapes[0], axis)
    for s in shapes:
        if len(s) != len(shapes[0]) or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != axis):
            raise ValueError(f"concat: shapes {shapes!r} differ outside axis {axis}")
    kb = KernelBuilder(module, name, len(shapes) + 1, target,
                       arg_names=[f"v{i}" for i in range(len(shapes))] + ["out"])
    *values, out = kb.args
    runs = [math.prod(s[axis:]) for s in shapes]
    total = sum(runs)
    with kb.for_range(numel(kb, shapes[0][:axis]), name="row") as lr:
        offset = 0
        for v, run in zip(values, runs):
            kb.memcpy(kb.gep(out, kb.add(kb.mul(lr.index, total), offset)), kb.gep(v, kb.mul(lr.index, run)), run)
            offset += run
    return kb.finish()


def build_slice(module: ir.Module, name: str, *, in_shape, axis: int, start: int, stop: int, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = x[start:stop] along `axis`."""
    in_shape = check_shape("slice", "in_shape", in_shape)
    axis = _axis("slice", in_shape, axis)
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= in_shape[axis]):
        raise ValueError(f"slice: need 0 <= start < stop <= {in_shape[axis]}, got {start!r}, {stop!r}")
    inner = math.prod(in_shape[axis + 1:])
    run_in, run_out = in_shape[axis] * inner, (stop - start) * inner
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    with kb.for_range(numel(kb, in_shape[:axis]), name="row") as lr:
        kb.memcpy(kb.gep(out, kb.mul(lr.index, run_out)), kb.gep(x, kb.add(kb.mul(lr.index, run_in), start * inner)),
                  run_out)
    return kb.finish()


def build_slice_grad(module: ir.Module, name: str, *, dy_shape, axis: int, start: int, size: int,
                     target) -> ir.Function:
    """`void name(ptr dy, ptr out, i64 n)`: out = zeros of `size` along `axis` with dy at [start, ...)."""
    dy_shape = check_shape("slice_grad", "dy_shape", dy_shape)
    axis = _axis("slice_grad", dy_shape, axis)
    if not (isinstance(start, int) and isinstance(size, int) and 0 <= start and start + dy_shape[axis] <= size):
        raise ValueError(f"slice_grad: dy of {dy_shape[axis]} at {start!r} does not fit in size {size!r}")
    inner = math.prod(dy_shape[axis + 1:])
    run_dy, run_out = dy_shape[axis] * inner, size * inner
    kb = KernelBuilder(module, name, 2, target, arg_names=("dy", "out"))
    dy, out = kb.args
    with kb.for_range(numel(kb, dy_shape[:axis]), name="row") as lr:
        row = kb.mul(lr.index, run_out)
        _fill(kb, out, row, start * inner, 0.0)
        kb.memcpy(kb.gep(out, kb.add(row, start * inner)), kb.gep(dy, kb.mul(lr.index, run_dy)), run_dy)
        _fill(kb, out, kb.add(row, start * inner + run_dy), run_out - start * inner - run_dy, 0.0)
    return kb.finish()


def _pads(kernel: str, padding) -> tuple:
    try:
        (t, b), (l, r) = padding
        pads = tuple(int(p) for p in (t, b, l, r))
    except (TypeError, ValueError):
        raise ValueError(f"{kernel}: padding must be ((top, bottom), (left, right)), got {padding!r}") from None
    if min(pads) < 0:
        raise ValueError(f"{kernel}: padding must be >= 0, got {padding!r}")
    return pads


def _fill(kb: KernelBuilder, ptr: ir.Value, offset, count: int, value: float) -> None:
    if count <= 0:
        return
    if value == 0.0 and str(value) != "-0.0":
        kb.memset_zero(kb.gep(ptr, offset), count)
        return
    base = kb.gep(ptr, offset)
    kb.strips(count, lambda s, acc: s.store(s.const(value), base) or [])


def build_pad(module: ir.Module, name: str, *, in_hwc, padding, value: float = 0.0, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = x surrounded by `value` on H and W."""
    h, w, c = _image_shape(in_hwc, "pad")
    t, bt, l, r = _pads("pad", padding)
    if not isinstance(value, (int, float)):
        raise ValueError(f"pad: value must be a number, got {value!r}")
    value = float(value)
    wo = w + l + r
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    with kb.for_range(kb.n, name="batch") as lb:
        o_img = kb.mul(lb.index, (h + t + bt) * wo * c)
        x_img = kb.mul(lb.index, h * w * c)
        _fill(kb, out, o_img, t * wo * c, value)
        with kb.for_range(h, name="row") as lh:
            o_row = kb.add(o_img, kb.mul(kb.add(lh.index, t), wo * c))
            _fill(kb, out, o_row, l * c, value)
            kb.memcpy(kb.gep(out, kb.add(o_row, l * c)), kb.gep(x, kb.add(x_img, kb.mul(lh.index, w * c))), w * c)
            _fill(kb, out, kb.add(o_row, (l + w) * c), r * c, value)
        _fill(kb, out, kb.add(o_img, (t + h) * wo * c), bt * wo * c, value)
    return kb.finish()


def build_pad_grad(module: ir.Module, name: str, *, in_hwc, padding, target) -> ir.Function:
    """`void name(ptr dy, ptr out, i64 n)`: out (n,H,W,C) = dy (n,H+t+b,W+l+r,C) without its border."""
    h, w, c = _image_shape(in_hwc, "pad_grad")
    t, bt, l, r = _pads("pad_grad", padding)
    wo = w + l + r
    kb = KernelBuilder(module, name, 2, target, arg_names=("dy", "out"))
    dy, out = kb.args
    with kb.for_range(kb.n, name="batch") as lb:
        d_img = kb.mul(lb.index, (h + t + bt) * wo * c)
        with kb.for_range(h, name="row") as lh:
            src = kb.add(d_img, kb.add(kb.mul(kb.add(lh.index, t), wo * c), l * c))
            dst = kb.mul(kb.add(kb.mul(lb.index, h), lh.index), w * c)
            kb.memcpy(kb.gep(out, dst), kb.gep(dy, src), w * c)
    return kb.finish()
