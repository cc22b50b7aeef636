"""Augmentation kernels of the LLVM backend (random_flip, random_translation and its adjoint),
bit-identical to backends/numpy/kernels.py: the same per-image draws (the contract in ir/ops/augment.py),
the same float32 operations in the same order, no fused multiply-adds.

Signatures: `void name(ptr x, ptr step, ptr out, i64 base, i64 n)`: `step` points to the float32 step
counter (omitted with has_step=False: step 0), `base` is the index of this call's first image in the whole
batch (a batch split across threads draws what the unsplit batch draws), n the images in this call.
Shapes are (None, H, W, C).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from .builder import F32, I1, I32, I64, KernelBuilder
from .elementwise import _mix32, check_shape, mix32

FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")
FILL_MODES = ("reflect", "wrap", "constant", "nearest")
INTERPOLATIONS = ("bilinear", "nearest")


def _image_shape(kernel: str, shape) -> tuple[int, int, int]:
    shape = check_shape(kernel, "shape", shape)
    if len(shape) != 4 or shape[0] is not None:
        raise ValueError(f"{kernel}: shape must be (None, H, W, C), got {shape!r}")
    return shape[1:]


def _check_seed(kernel: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{kernel}: seed must be an int, got {seed!r}")
    return seed & 0xFFFFFFFF


class _Draws:
    """The per-image uniforms of one kernel call: r(image, stream) as float32 in [0, 1)."""

    def __init__(self, kb: KernelBuilder, seed: int, step_ptr, base):
        self.kb, self.base = kb, base
        b = kb.b
        seed_mix = (seed * 0x9E3779B9) & 0xFFFFFFFF
        if step_ptr is not None:
            step = b.trunc(b.fptosi(kb.load(step_ptr), I64), I32)   # int(step), mod 2**32
            self.key = _mix32(kb, b.add(ir.Constant(I32, seed_mix), step))
        else:
            self.key = ir.Constant(I32, mix32(seed_mix))

    def uniform(self, image, stream: int) -> ir.Value:
        kb, b = self.kb, self.kb.b
        counter = kb.add(kb.add(kb.mul(kb.add(self.base, image), 2), stream), 1)
        h = _mix32(kb, b.xor(b.trunc(kb.i64(counter), I32), self.key))
        return b.fmul(b.uitofp(b.lshr(h, ir.Constant(I32, 8)), F32), ir.Constant(F32, 2.0 ** -24))


def _new_kernel(module, name, target, has_step):
    names = ("x", "step", "out") if has_step else ("x", "out")
    kb = KernelBuilder(module, name, len(names), target, arg_names=names, int_arg_names=("base",))
    return kb, kb.args[0], (kb.args[1] if has_step else None), kb.args[-1], kb.int_args[0]


def build_random_flip(module: ir.Module, name: str, *, shape, mode: str = "horizontal", seed: int = 0, target,
                      has_step: bool = True) -> ir.Function:
    """out[i] = x[i] flipped along W (horizontal), H (vertical) or both when image i's draw r_0 < 0.5,
    else copied. out must not be x."""
    h, w, c = _image_shape("random_flip", shape)
    if mode not in FLIP_MODES:
        raise ValueError(f"random_flip: mode must be one of {FLIP_MODES}, got {mode!r}")
    seed = _check_seed("random_flip", seed)
    kb, x, step, out, base = _new_kernel(module, name, target, has_step)
    b = kb.b
    draws = _Draws(kb, seed, step, base)
    with kb.for_range(kb.n, name="image") as li:
        flip = b.fcmp_ordered("<", draws.uniform(li.index, 0), ir.Constant(F32, 0.5))
        flip_rows = flip if mode != "horizontal" else ir.Constant(I1, 0)
        flip_cols = flip if mode != "vertical" else ir.Constant(I1, 0)
        image = kb.mul(li.index, h * w * c)
        with kb.for_range(h, name="row") as ly:
            sy = b.select(flip_rows, b.sub(kb.i64(h - 1), ly.index), ly.index)
            with kb.for_range(w, name="col") as lx:
                sx = b.select(flip_cols, b.sub(kb.i64(w - 1), lx.index), lx.index)
                src = kb.add(image, kb.mul(kb.add(kb.mul(sy, w), sx), c))
                dst = kb.add(image, kb.mul(kb.add(kb.mul(ly.index, w), lx.index), c))
                kb.memcpy(kb.gep(out, dst), kb.gep(x, src), c)
    return kb.finish()


def _check_translation(kernel, shape, height_factor, width_factor, fill_mode, interpolation, fill_value, seed):
    dims = _image_shape(kernel, shape)
    for what, f in (("height_factor", height_factor), ("width_factor", width_factor)):
        if len(tuple(f)) != 2 or not -1.0 <= f[0] <= f[1] <= 1.0:
            raise ValueError(f"{kernel}: {what} must be a (lower, upper) pair in [-1, 1], got {f!r}")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"{kernel}: fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{kernel}: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if isinstance(fill_value, bool) or not isinstance(fill_value, (int, float)):
        raise TypeError(f"{kernel}: fill_value must be a number, got {fill_value!r}")
    return dims, _check_seed(kernel, seed)


def _shift(kb: KernelBuilder, r: ir.Value, factor, size: int) -> ir.Value:
    """(lo + (hi - lo) * r) * size in float32, the constants rounded to float32 as NumPy does."""
    lo, hi = np.float32(factor[0]), np.float32(factor[1])
    b = kb.b
    u = b.fadd(ir.Constant(F32, float(lo)), b.fmul(ir.Constant(F32, float(hi - lo)), r))
    return b.fmul(u, ir.Constant(F32, float(np.float32(size))))


def _fill_index(kb: KernelBuilder, index: ir.Value, size: int, fill_mode: str):
    """A tap's i64 index -> (in-range index, valid i1), Keras's fill modes."""
    b = kb.b
    zero, last = kb.i64(0), kb.i64(size - 1)
    if fill_mode in ("reflect", "wrap"):
        period = 2 * size if fill_mode == "reflect" else size
        j = b.srem(index, kb.i64(period))
        j = b.select(b.icmp_signed("<", j, zero), b.add(j, kb.i64(period)), j)
        if fill_mode == "reflect":
            j = b.select(b.icmp_signed(">=", j, kb.i64(size)), b.sub(kb.i64(2 * size - 1), j), j)
        return j, ir.Constant(I1, 1)
    clamped = b.select(b.icmp_signed("<", index, zero), zero,
                       b.select(b.icmp_signed(">", index, last), last, index))
    if fill_mode == "nearest":
        return clamped, ir.Constant(I1, 1)
    valid = b.and_(b.icmp_signed(">=", index, zero), b.icmp_signed("<=", index, last))
    return clamped, valid


def _taps(kb: KernelBuilder, position, shift, size: int, fill_mode: str, interpolation: str):
    """[(index, weight f32, valid i1)] of output position `position` (i64) along one axis."""
    b = kb.b
    coord = b.fsub(b.sitofp(position, F32), shift)
    if interpolation == "nearest":
        taps = [(kb.intrinsic("roundeven", coord), ir.Constant(F32, 1.0))]
    else:
        low = kb.floor(coord)
        frac = b.fsub(coord, low)
        taps = [(low, b.fsub(ir.Constant(F32, 1.0), frac)), (b.fadd(low, ir.Constant(F32, 1.0)), frac)]
    out = []
    for pos, weight in taps:
        index, valid = _fill_index(kb, b.fptosi(pos, I64), size, fill_mode)
        out.append((index, weight, valid))
    return out


def _translation_loops(kb, x_or_dy, step, base, dims, height_factor, width_factor, fill_mode, interpolation,
                       seed, body):
    """Visit every output pixel (image, y, x) with its tap list [(src element offset, weight, valid)] in
    (row tap, column tap) order and the pixel's own element offset: body(taps, dst)."""
    h, w, c = dims
    b = kb.b
    draws = _Draws(kb, seed, step, base)
    with kb.for_range(kb.n, name="image") as li:
        shift_h = _shift(kb, draws.uniform(li.index, 0), height_factor, h)
        shift_w = _shift(kb, draws.uniform(li.index, 1), width_factor, w)
        image = kb.mul(li.index, h * w * c)
        with kb.for_range(h, name="row") as ly:
            rows = _taps(kb, ly.index, shift_h, h, fill_mode, interpolation)
            with kb.for_range(w, name="col") as lx:
                cols = _taps(kb, lx.index, shift_w, w, fill_mode, interpolation)
                taps = []
                for ri, rw, rv in rows:
                    for ci, cw, cv in cols:
                        src = kb.add(image, kb.mul(kb.add(kb.mul(ri, w), ci), c))
                        taps.append((src, b.fmul(rw, cw), b.and_(rv, cv)))
                body(taps, kb.add(image, kb.mul(kb.add(kb.mul(ly.index, w), lx.index), c)))


def build_random_translation(module: ir.Module, name: str, *, shape, height_factor, width_factor,
                             fill_mode: str = "reflect", interpolation: str = "bilinear", fill_value: float = 0.0,
                             seed: int = 0, target, has_step: bool = True) -> ir.Function:
    """out[i, y, x, :] = sum over the taps of w * (valid ? x[tap] : fill_value), zero-weight taps skipped,
    the first tap's term starting the sum. out must not be x."""
    dims, seed = _check_translation("random_translation", shape, height_factor, width_factor, fill_mode,
                                    interpolation, fill_value, seed)
    kb, x, step, out, base = _new_kernel(module, name, target, has_step)
    b = kb.b
    fill = ir.Constant(F32, float(np.float32(fill_value)))
    zero = ir.Constant(F32, 0.0)

    def body(taps, dst):
        with kb.for_range(dims[2], name="chan") as lc:
            acc = None
            for src, weight, valid in taps:
                v = b.select(valid, kb.load(x, kb.add(src, lc.index)), fill)
                term = b.select(b.fcmp_ordered("==", weight, zero), zero, b.fmul(weight, v))
                acc = term if acc is None else b.fadd(acc, term)
            kb.store(acc, out, kb.add(dst, lc.index))

    _translation_loops(kb, x, step, base, dims, height_factor, width_factor, fill_mode, interpolation, seed, body)
    return kb.finish()


def build_random_translation_grad(module: ir.Module, name: str, *, shape, height_factor, width_factor,
                                  fill_mode: str = "reflect", interpolation: str = "bilinear",
                                  fill_value: float = 0.0, seed: int = 0, target,
                                  has_step: bool = True) -> ir.Function:
    """`void name(ptr dy, ptr step, ptr out, i64 base, i64 n)`: the adjoint of random_translation,
    out[tap] += w * dy[pixel] for every valid nonzero-weight tap, pixels in row-major order, taps in order.
    out must not be dy."""
    dims, seed = _check_translation("random_translation_grad", shape, height_factor, width_factor, fill_mode,
                                    interpolation, fill_value, seed)
    kb, dy, step, out, base = _new_kernel(module, name, target, has_step)
    b = kb.b
    kb.memset_zero(out, kb.mul(kb.n, dims[0] * dims[1] * dims[2]))
    zero = ir.Constant(F32, 0.0)

    def body(taps, dst):
        for src, weight, valid in taps:
            with kb.if_then(b.and_(valid, b.fcmp_unordered("!=", weight, zero))):
                with kb.for_range(dims[2], name="chan") as lc:
                    at = kb.add(src, lc.index)
                    kb.store(b.fadd(kb.load(out, at), b.fmul(weight, kb.load(dy, kb.add(dst, lc.index)))), out, at)

    _translation_loops(kb, dy, step, base, dims, height_factor, width_factor, fill_mode, interpolation, seed, body)
    return kb.finish()
