"""Depthwise convolution kernels of the LLVM backend (NHWC, w (KH,KW,C,M), output channel c*M + m as in
TF/Keras), with the semantics of backends/numpy/kernels.py.

Depthwise convolution is memory-bound (2 * KH * KW flops per output, no reuse across channels), so it is
not a GEMM: every kernel walks output pixels (batch, oh, ow) and, per pixel, blocks of output channels
held in vector registers (pool.channel_blocks: up to 4 vectors, the last one masked). The window taps are
two loops whose bounds are clipped to the image at run time (dilation included), so padding is never
read. With a depth multiplier M > 1, the input vector for output channels [f, f + lanes) is x[f // M]:
one (masked) load of the few input channels involved, then a constant shuffle.

Forward: taps accumulate from 0 with fused multiply-adds in row-major (kh, kw) order; then the bias (if
any) is added and the activation applied before the one store, so fused bias/activation give exactly what
separate bias_add/activation kernels give. grad_filter accumulates x * dy into dw (zeroed first) pixel by
pixel; grad_input scatters dy * w into dx (zeroed first).

Signatures (n = runtime batch size):
    depthwise_conv2d(ptr x, ptr w, ptr b (or null), ptr out, i64 n)
    depthwise_conv2d_grad_input(ptr dy, ptr w, ptr dx, i64 n)
    depthwise_conv2d_grad_filter(ptr x, ptr dy, ptr dw, i64 n)
"""
from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from .builder import I32, KernelBuilder, check_activation
from .conv import ConvGeometry, conv_geometry
from .pool import _image_shape, _positive_pair, channel_blocks


@dataclass(frozen=True)
class DepthwiseGeometry(ConvGeometry):
    """A conv2d geometry (ConvGeometry: sizes, padding, output size) whose f = c * m output channels come
    from a depth multiplier m: output channel c*m + j reads input channel c only."""
    m: int = 1


def depthwise_geometry(kernel: str, in_hwc, kernel_shape, stride, padding, dilation) -> DepthwiseGeometry:
    """Validate the attributes (ValueError naming the kernel and the argument) and return the geometry;
    the conv rules (conv_geometry) check everything but the kernel shape."""
    h, w, c = _image_shape(in_hwc, kernel)
    try:
        kh, kw, kc, m = (int(d) for d in kernel_shape)
    except (TypeError, ValueError):
        raise ValueError(f"{kernel}: kernel_shape must be (kh, kw, C, M), got {kernel_shape!r}") from None
    if min(kh, kw, m) < 1 or kc != c:
        raise ValueError(f"{kernel}: kernel_shape {kernel_shape!r} does not match {c} input channels")
    try:
        g = conv_geometry((h, w, c), (kh, kw), c * m, _positive_pair(stride, "stride", kernel), padding,
                          _positive_pair(dilation, "dilation", kernel))
    except ValueError as e:
        raise ValueError(f"{kernel}: {e}") from None
    return DepthwiseGeometry(**{k: getattr(g, k) for k in ConvGeometry.__dataclass_fields__}, m=m)


def _tap_range(kb: KernelBuilder, o: ir.Value, stride: int, pad: int, dil: int, taps: int, size: int, count: int):
    """[first, stop) of the taps k whose input o*stride - pad + k*dil lies in [0, size). Clipping is emitted
    only on a side where some window crosses the border."""
    b = kb.b
    start = kb.add(kb.mul(o, -stride), pad)                           # pad - o*stride
    if pad == 0:
        first = 0
    else:      # ceil(start / dil) when start > 0, else 0
        up = b.sdiv(kb.i64(kb.add(start, dil - 1)), kb.i64(dil))
        first = b.select(b.icmp_signed(">", start, kb.i64(0)), up, kb.i64(0))
    if (count - 1) * stride - pad + (taps - 1) * dil <= size - 1:
        return first, taps
    room = kb.add(start, size - 1)                                    # size-1 + pad - o*stride
    stop = b.add(b.sdiv(kb.i64(room), kb.i64(dil)), kb.i64(1))
    stop = b.select(b.icmp_signed(">", stop, kb.i64(taps)), kb.i64(taps), stop)
    stop = b.select(b.icmp_signed("<", room, kb.i64(0)), kb.i64(0), stop)
    return first, stop


def _expanded_x(kb: KernelBuilder, x: ir.Value, pix, off: int, width: int, m: int) -> ir.Value:
    """The vector x[pix + (off + l) // m] for lanes l < width (off, width, m compile-time)."""
    if m == 1:
        return kb.load_part(x, kb.add(pix, off), width)
    c0 = off // m
    count = (off + width - 1) // m - c0 + 1
    src = kb.load_part(x, kb.add(pix, c0), count)
    mask = [(off + l) // m - c0 for l in range(width)] + [0] * (kb.lanes - width)
    return kb.b.shuffle_vector(src, ir.Constant(src.type, ir.Undefined), ir.Constant(ir.VectorType(I32, kb.lanes), mask))


def _pixels(kb: KernelBuilder, g: DepthwiseGeometry, body) -> None:
    """for b, oh, ow: body(b, oh, ow, (i0, i1), (j0, j1)), the tap ranges inside the image."""
    with kb.for_range(kb.n, name="batch") as lb, kb.for_range(g.oh, name="oh") as loh:
        rows = _tap_range(kb, loh.index, g.sh, g.pt, g.dh, g.kh, g.h, g.oh)
        with kb.for_range(g.ow, name="ow") as low:
            cols = _tap_range(kb, low.index, g.sw, g.pl, g.dw, g.kw, g.w, g.ow)
            body(lb.index, loh.index, low.index, rows, cols)


def _taps(kb: KernelBuilder, g: DepthwiseGeometry, bi, oh, ow, rows, cols, inits, step):
    """Fold `step(carried, in_pixel, tap) -> new carried` over the in-image taps of output pixel (oh, ow),
    in row-major (kh, kw) order; in_pixel = flat index of x[bi, ih, iw, 0], tap = i * KW + j."""
    with kb.for_range(rows[1], start=rows[0], name="kh") as li:
        outer = [li.carry(v) for v in inits]
        ih = kb.add(kb.add(kb.mul(oh, g.sh), -g.pt), kb.mul(li.index, g.dh))
        with kb.for_range(cols[1], start=cols[0], name="kw") as lj:
            inner = [lj.carry(v) for v in outer]
            iw = kb.add(kb.add(kb.mul(ow, g.sw), -g.pl), kb.mul(lj.index, g.dw))
            pix = kb.mul(kb.add(kb.mul(kb.add(kb.mul(bi, g.h), ih), g.w), iw), g.c)
            new = step(inner, pix, kb.add(kb.mul(li.index, g.kw), lj.index))
            for a, v in zip(inner, new):
                lj.next(a, v)
        after = [lj.result(a) for a in inner]
        for a, v in zip(outer, after):
            li.next(a, v)
    return [li.result(a) for a in outer]


def _out_pixel(g, bi, oh, ow, kb):
    return kb.mul(kb.add(kb.mul(kb.add(kb.mul(bi, g.oh), oh), g.ow), ow), g.f)


def build_depthwise_conv2d(module: ir.Module, name: str, *, in_hwc, kernel_shape, stride, padding, dilation,
                           has_bias: bool = False, activation: str = "linear", activation_params=(),
                           target) -> ir.Function:
    """`void name(ptr x, ptr w, ptr b, ptr out, i64 n)`: out = activation(depthwise(x, w) + b); b is read
    only when has_bias."""
    g = depthwise_geometry("depthwise_conv2d", in_hwc, kernel_shape, stride, padding, dilation)
    activation, activation_params = check_activation(activation, activation_params)
    kb = KernelBuilder(module, name, 4, target, arg_names=("x", "w", "b", "out"))
    x, w, bias, out = kb.args
    zero = kb.const(0.0, like=kb.vec_type())

    def pixel(bi, oh, ow, rows, cols):
        o_pix = _out_pixel(g, bi, oh, ow, kb)
        for block in channel_blocks(g.f, kb.lanes):
            def step(accs, pix, tap):
                return [kb.fma(_expanded_x(kb, x, pix, off, width, g.m),
                               kb.load_part(w, kb.add(kb.mul(tap, g.f), off), width), a)
                        for a, (off, width) in zip(accs, block)]
            accs = _taps(kb, g, bi, oh, ow, rows, cols, [zero] * len(block), step)
            for a, (off, width) in zip(accs, block):
                if has_bias:
                    a = kb.b.fadd(a, kb.load_part(bias, off, width))
                kb.store_part(kb.activation(activation, a, activation_params), out, kb.add(o_pix, off), width)

    _pixels(kb, g, pixel)
    return kb.finish()


def build_depthwise_conv2d_grad_filter(module: ir.Module, name: str, *, in_hwc, kernel_shape, stride, padding,
                                       dilation, target) -> ir.Function:
    """`void name(ptr x, ptr dy, ptr dw, i64 n)`: dw (KH,KW,C,M) = sum over the batch and output pixels of
    x[tap input] * dy."""
    g = depthwise_geometry("depthwise_conv2d_grad_filter", in_hwc, kernel_shape, stride, padding, dilation)
    kb = KernelBuilder(module, name, 3, target, arg_names=("x", "dy", "dw"))
    x, dy, dw = kb.args
    kb.memset_zero(dw, g.kh * g.kw * g.f)

    def pixel(bi, oh, ow, rows, cols):
        o_pix = _out_pixel(g, bi, oh, ow, kb)
        for block in channel_blocks(g.f, kb.lanes):
            dys = [kb.load_part(dy, kb.add(o_pix, off), width) for off, width in block]

            def step(carried, pix, tap):
                for d, (off, width) in zip(dys, block):
                    at = kb.add(kb.mul(tap, g.f), off)
                    kb.store_part(kb.fma(_expanded_x(kb, x, pix, off, width, g.m), d,
                                         kb.load_part(dw, at, width)), dw, at, width)
                return []
            _taps(kb, g, bi, oh, ow, rows, cols, [], step)

    _pixels(kb, g, pixel)
    return kb.finish()


def build_depthwise_conv2d_grad_input(module: ir.Module, name: str, *, in_hwc, kernel_shape, stride, padding,
                                      dilation, target) -> ir.Function:
    """`void name(ptr dy, ptr w, ptr dx, i64 n)`: dx (n,H,W,C) = sum over output pixels, taps and the
    multiplier of dy * w scattered to the tap's input."""
    g = depthwise_geometry("depthwise_conv2d_grad_input", in_hwc, kernel_shape, stride, padding, dilation)
    kb = KernelBuilder(module, name, 3, target, arg_names=("dy", "w", "dx"))
    dy, w, dx = kb.args
    b = kb.b
    kb.memset_zero(dx, kb.mul(kb.n, g.h * g.w * g.c))

    def pixel(bi, oh, ow, rows, cols):
        o_pix = _out_pixel(g, bi, oh, ow, kb)
        for block in channel_blocks(g.f, kb.lanes):
            dys = [kb.load_part(dy, kb.add(o_pix, off), width) for off, width in block]

            def step(carried, pix, tap):
                for d, (off, width) in zip(dys, block):
                    prod = b.fmul(d, kb.load_part(w, kb.add(kb.mul(tap, g.f), off), width))
                    if g.m == 1:
                        at = kb.add(pix, off)
                        kb.store_part(b.fadd(kb.load_part(dx, at, width), prod), dx, at, width)
                        continue
                    for lane in range(width):          # several multipliers feed one input channel
                        at = kb.add(pix, (off + lane) // g.m)
                        kb.store(b.fadd(kb.load(dx, at), b.extract_element(prod, ir.Constant(I32, lane))), dx, at)
                return []
            _taps(kb, g, bi, oh, ow, rows, cols, [], step)

    _pixels(kb, g, pixel)
    return kb.finish()
