"""Pooling kernels of the LLVM backend (NHWC): max / average pooling, global average pooling and their
gradients, with the semantics of backends/numpy/kernels.py.

Every kernel walks output pixels (batch, oh, ow) in counted loops and, per pixel, blocks of the channel
dimension held in vector registers: a block is up to `GROUP_VECTORS` vectors of `lanes` floats, the last
vector of a row may be partial (masked loads/stores touch only the row's real channels). The window taps of
a pixel are two nested loops whose bounds are clipped to the image at run time, so padding cells are never
read (they are -inf for max and absent for average pooling, as the contract says). The window max
propagates NaN like np.maximum (a window holding a NaN gives NaN); its gradient goes to the first tap equal
to the max, so a NaN window routes no gradient (as the NumPy backend).

Signatures (n = runtime batch size; shapes are compile-time):
    max_pool2d(ptr x, ptr out, i64 n)                 x (n,H,W,C) -> out (n,OH,OW,C)
    max_pool2d_grad(ptr x, ptr dy, ptr out, i64 n)    out (n,H,W,C)
    avg_pool2d(ptr x, ptr out, i64 n)
    avg_pool2d_grad(ptr dy, ptr out, i64 n)           out (n,H,W,C)
    global_avg_pool2d(ptr x, ptr out, i64 n)          out (n,C)
    global_avg_pool2d_grad(ptr dy, ptr out, i64 n)    dy (n,C) -> out (n,H,W,C)
"""
from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from .builder import F32, I1, I8, KernelBuilder

# Vectors per channel block: enough independent max/add chains to hide latency, few enough to stay in
# registers next to the loop's addresses (16 ymm registers on AVX2).
GROUP_VECTORS = 4


@dataclass(frozen=True)
class PoolGeometry:
    """A checked pooling window over an (H, W, C) image."""
    h: int
    w: int
    c: int
    ph: int
    pw: int
    sh: int
    sw: int
    pt: int
    pb: int
    pl: int
    pr: int

    @property
    def oh(self) -> int:
        return (self.h + self.pt + self.pb - self.ph) // self.sh + 1

    @property
    def ow(self) -> int:
        return (self.w + self.pl + self.pr - self.pw) // self.sw + 1

    @property
    def tiles_exactly(self) -> bool:
        """Every input cell lies in exactly one window (so a gradient kernel need not zero out first)."""
        return (self.sh == self.ph and self.sw == self.pw and self.pt == 0 and self.pl == 0
                and self.oh * self.sh >= self.h and self.ow * self.sw >= self.w)


def _positive_pair(value, what: str, kernel: str) -> tuple[int, int]:
    try:
        a, b = (value, value) if isinstance(value, int) else value
        a, b = int(a), int(b)
    except (TypeError, ValueError):
        raise ValueError(f"{kernel}: {what} must be an int or a pair of ints, got {value!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{kernel}: {what} must be >= 1, got {value!r}")
    return a, b


def _image_shape(in_hwc, kernel: str) -> tuple[int, int, int]:
    """(H, W, C) from in_hwc; a leading batch entry (None or int) is accepted and ignored."""
    shape = tuple(in_hwc) if isinstance(in_hwc, (tuple, list)) else None
    if shape is not None and len(shape) == 4:
        shape = shape[1:]
    if shape is None or len(shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ValueError(f"{kernel}: in_hwc must be (H, W, C) of positive ints, got {in_hwc!r}")
    return shape


def pool_geometry(kernel: str, in_hwc, pool, stride, padding) -> PoolGeometry:
    """Validate pooling attributes (ValueError naming the argument) and return the geometry."""
    h, w, c = _image_shape(in_hwc, kernel)
    ph, pw = _positive_pair(pool, "pool", kernel)
    sh, sw = _positive_pair(stride, "stride", kernel)
    try:
        (pt, pb), (pl, pr) = padding
        pt, pb, pl, pr = int(pt), int(pb), int(pl), int(pr)
    except (TypeError, ValueError):
        raise ValueError(f"{kernel}: padding must be ((top, bottom), (left, right)), got {padding!r}") from None
    if min(pt, pb, pl, pr) < 0:
        raise ValueError(f"{kernel}: padding must be >= 0, got {padding!r}")
    # a window made only of padding would have no maximum and nothing to average
    if max(pt, pb) >= ph or max(pl, pr) >= pw:
        raise ValueError(f"{kernel}: padding {padding!r} must be smaller than the pool window {(ph, pw)}")
    g = PoolGeometry(h, w, c, ph, pw, sh, sw, pt, pb, pl, pr)
    if g.oh < 1 or g.ow < 1:
        raise ValueError(f"{kernel}: pool window {(ph, pw)} is larger than the padded input {(h, w)} + {padding!r}")
    return g


def channel_blocks(c: int, lanes: int) -> list[list[tuple[int, int]]]:
    """Split C channels into blocks of up to GROUP_VECTORS vectors: [[(offset, width), ...], ...]."""
    vectors = [(off, min(lanes, c - off)) for off in range(0, c, lanes)]
    return [vectors[i:i + GROUP_VECTORS] for i in range(0, len(vectors), GROUP_VECTORS)]


def _clipped(kb: KernelBuilder, o: ir.Value, stride: int, pad: int, extent: int, size: int, count: int):
    """[start, stop) of the window rows (or columns) inside the image, for output index o of count.
    Clipping is only emitted on a side where some window crosses the image border, so windows of unpadded
    pooling keep a constant trip count (LLVM unrolls their tap loops)."""
    b = kb.b
    first = kb.add(kb.mul(o, stride), -pad)
    start = b.select(b.icmp_signed("<", first, kb.i64(0)), kb.i64(0), first) if pad else first
    last = kb.add(first, extent)
    if (count - 1) * stride - pad + extent <= size:
        return start, last
    stop = b.select(b.icmp_signed(">", last, kb.i64(size)), kb.i64(size), last)
    return start, stop


def _window_reduce(kb, rows, cols, x_img, g, block, init: float, combine, etype=F32, lanes=None):
    """Fold combine(acc, x[tap, block vector]) over the window taps in row-major order; returns the
    accumulators (one per vector of the block). x holds floats, or etype elements (int8) in vectors of
    `lanes`."""
    lanes = lanes or kb.lanes
    vty = kb.vec_type(lanes, etype)
    accs = [ir.Constant(vty, [init] * lanes) for _ in block]
    with kb.for_range(rows[1], start=rows[0], name="kh") as lh:
        carried = [lh.carry(a) for a in accs]
        with kb.for_range(cols[1], start=cols[0], name="kw") as lw:
            inner = [lw.carry(a) for a in carried]
            pix = kb.mul(kb.add(kb.mul(lh.index, g.w), lw.index), g.c)
            new = [combine(a, kb.load_part(x_img, kb.add(pix, off), width, lanes, etype=etype))
                   for a, (off, width) in zip(inner, block)]
            for a, v in zip(inner, new):
                lw.next(a, v)
        after_w = [lw.result(a) for a in inner]
        for a, v in zip(carried, after_w):
            lh.next(a, v)
    return [lh.result(a) for a in carried]


def _pixels(kb: KernelBuilder, g: PoolGeometry, body):
    """for b in n, oh, ow: body(b, oh, ow, rows, cols), rows/cols the clipped window bounds."""
    with kb.for_range(kb.n, name="batch") as lb, kb.for_range(g.oh, name="oh") as loh:
        rows = _clipped(kb, loh.index, g.sh, g.pt, g.ph, g.h, g.oh)
        with kb.for_range(g.ow, name="ow") as low:
            cols = _clipped(kb, low.index, g.sw, g.pl, g.pw, g.w, g.ow)
            body(lb.index, loh.index, low.index, rows, cols)


# max_pool2d on int8 values (ir/ops/quant.py): (signed, smallest value) per dtype
INT8_POOL_FORMATS = {"u8": (False, 0), "i8": (True, -128)}


def build_max_pool2d(module: ir.Module, name: str, *, in_hwc, pool, stride, padding, dtype: str = "f32",
                     target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = max over each window; padding cells never win. dtype
    "u8"/"i8" pools int8 values with integer compares (a full register of bytes per vector)."""
    g = pool_geometry("max_pool2d", in_hwc, pool, stride, padding)
    if dtype != "f32" and dtype not in INT8_POOL_FORMATS:
        raise ValueError(f"max_pool2d: dtype must be f32, u8 or i8, got {dtype!r}")
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    if dtype == "f32":
        etype, lanes, init, combine = F32, kb.lanes, float("-inf"), kb.maximum
    else:
        signed, smallest = INT8_POOL_FORMATS[dtype]
        compare = kb.b.icmp_signed if signed else kb.b.icmp_unsigned
        etype, lanes, init = I8, 4 * kb.lanes, smallest
        combine = lambda a, v: kb.b.select(compare(">", v, a), v, a)

    def pixel(bi, oh, ow, rows, cols):
        x_img = kb.gep(x, kb.mul(bi, g.h * g.w * g.c), etype)
        o_pix = kb.add(kb.mul(bi, g.oh * g.ow * g.c), kb.mul(kb.add(kb.mul(oh, g.ow), ow), g.c))
        for block in channel_blocks(g.c, lanes):
            accs = _window_reduce(kb, rows, cols, x_img, g, block, init, combine, etype, lanes)
            for a, (off, width) in zip(accs, block):
                kb.store_part(a, out, kb.add(o_pix, off), width)

    _pixels(kb, g, pixel)
    return kb.finish()


def _window_count(kb: KernelBuilder, rows, cols, like) -> ir.Value:
    """Number of real cells in the window as a float vector."""
    b = kb.b
    cnt = b.mul(b.sub(kb.i64(rows[1]), kb.i64(rows[0])), b.sub(kb.i64(cols[1]), kb.i64(cols[0])))
    return kb.splat(b.sitofp(cnt, like.element), like.count)


def build_avg_pool2d(module: ir.Module, name: str, *, in_hwc, pool, stride, padding, count_include_pad=False,
                     target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = window sum / (real cells, or ph*pw if count_include_pad)."""
    g = pool_geometry("avg_pool2d", in_hwc, pool, stride, padding)
    if not isinstance(count_include_pad, bool):
        raise TypeError(f"avg_pool2d: count_include_pad must be a bool, got {count_include_pad!r}")
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    vty = kb.vec_type()

    def pixel(bi, oh, ow, rows, cols):
        x_img = kb.gep(x, kb.mul(bi, g.h * g.w * g.c))
        o_pix = kb.add(kb.mul(bi, g.oh * g.ow * g.c), kb.mul(kb.add(kb.mul(oh, g.ow), ow), g.c))
        div = (kb.const(g.ph * g.pw, like=vty) if count_include_pad else _window_count(kb, rows, cols, vty))
        for block in channel_blocks(g.c, kb.lanes):
            accs = _window_reduce(kb, rows, cols, x_img, g, block, 0.0, kb.b.fadd)
            for a, (off, width) in zip(accs, block):
                kb.store_part(kb.b.fdiv(a, div), out, kb.add(o_pix, off), width)

    _pixels(kb, g, pixel)
    return kb.finish()


def build_max_pool2d_grad(module: ir.Module, name: str, *, in_hwc, pool, stride, padding, relu_mask=False,
                          target) -> ir.Function:
    """`void name(ptr x, ptr dy, ptr out, i64 n)`: each window's dy goes to the FIRST maximum of the window
    in row-major (kh, kw) order; overlapping windows accumulate. out is fully overwritten. relu_mask
    (disjoint windows only): each share is multiplied by (x > 0) with the builder's relu_grad as it is
    stored — the standalone relu_grad's instruction on the same operands, and cells no window covers stay
    +0 as 0 * mask would."""
    g = pool_geometry("max_pool2d_grad", in_hwc, pool, stride, padding)
    # windows that cannot overlap write each input cell at most once: plain stores, no read-modify-write
    disjoint = g.sh >= g.ph and g.sw >= g.pw
    if relu_mask and not disjoint:
        raise ValueError(f"max_pool2d_grad: relu_mask needs disjoint windows, got pool {pool}, stride {stride}")
    kb = KernelBuilder(module, name, 3, target, arg_names=("x", "dy", "out"))
    x, dy, out = kb.args
    b = kb.b
    if not g.tiles_exactly:
        kb.memset_zero(out, kb.mul(kb.n, g.h * g.w * g.c))
    vty = kb.vec_type()
    mask_ty = ir.VectorType(I1, kb.lanes)
    all_true = ir.Constant(mask_ty, [1] * kb.lanes)

    def pixel(bi, oh, ow, rows, cols):
        img = kb.mul(bi, g.h * g.w * g.c)
        x_img, out_img = kb.gep(x, img), kb.gep(out, img)
        o_pix = kb.add(kb.mul(bi, g.oh * g.ow * g.c), kb.mul(kb.add(kb.mul(oh, g.ow), ow), g.c))
        for block in channel_blocks(g.c, kb.lanes):
            peaks = _window_reduce(kb, rows, cols, x_img, g, block, float("-inf"),
                                   kb.maximum)
            grads = [kb.load_part(dy, kb.add(o_pix, off), width) for off, width in block]
            # second pass: the first tap equal to the peak takes the gradient, per lane
            with kb.for_range(rows[1], start=rows[0], name="kh") as lh:
                pend_h = [lh.carry(all_true, name="pending") for _ in block]
                with kb.for_range(cols[1], start=cols[0], name="kw") as lw:
                    pend = [lw.carry(p, name="pending") for p in pend_h]
                    pix = kb.mul(kb.add(kb.mul(lh.index, g.w), lw.index), g.c)
                    for p, peak, grad, (off, width) in zip(pend, peaks, grads, block):
                        at = kb.add(pix, off)
                        xv = kb.load_part(x_img, at, width)
                        hit = b.and_(b.fcmp_ordered("==", xv, peak), p)
                        share = b.select(hit, grad, kb.const(0.0, like=vty))
                        if relu_mask:
                            share = kb.relu_grad(xv, share)
                        if not disjoint:
                            share = b.fadd(kb.load_part(out_img, at, width), share)
                        kb.store_part(share, out_img, at, width)
                        lw.next(p, b.and_(p, b.xor(hit, all_true)))
                for p, q in zip(pend_h, pend):
                    lh.next(p, lw.result(q))

    _pixels(kb, g, pixel)
    return kb.finish()


def build_avg_pool2d_grad(module: ir.Module, name: str, *, in_hwc, pool, stride, padding, count_include_pad=False,
                          target) -> ir.Function:
    """`void name(ptr dy, ptr out, i64 n)`: out (n,H,W,C), in_hwc the forward input's (H, W, C): every window
    spreads dy / divisor over its real cells (overlaps accumulate). out is fully overwritten."""
    g = pool_geometry("avg_pool2d_grad", in_hwc, pool, stride, padding)
    disjoint = g.sh >= g.ph and g.sw >= g.pw
    if not isinstance(count_include_pad, bool):
        raise TypeError(f"avg_pool2d_grad: count_include_pad must be a bool, got {count_include_pad!r}")
    kb = KernelBuilder(module, name, 2, target, arg_names=("dy", "out"))
    dy, out = kb.args
    b = kb.b
    if not g.tiles_exactly:
        kb.memset_zero(out, kb.mul(kb.n, g.h * g.w * g.c))
    vty = kb.vec_type()

    def pixel(bi, oh, ow, rows, cols):
        out_img = kb.gep(out, kb.mul(bi, g.h * g.w * g.c))
        o_pix = kb.add(kb.mul(bi, g.oh * g.ow * g.c), kb.mul(kb.add(kb.mul(oh, g.ow), ow), g.c))
        div = (kb.const(g.ph * g.pw, like=vty) if count_include_pad else _window_count(kb, rows, cols, vty))
        for block in channel_blocks(g.c, kb.lanes):
            shares = [b.fdiv(kb.load_part(dy, kb.add(o_pix, off), width), div) for off, width in block]
            with (kb.for_range(rows[1], start=rows[0], name="kh") as lh,
                  kb.for_range(cols[1], start=cols[0], name="kw") as lw):
                pix = kb.mul(kb.add(kb.mul(lh.index, g.w), lw.index), g.c)
                for share, (off, width) in zip(shares, block):
                    at = kb.add(pix, off)
                    value = share if disjoint else b.fadd(kb.load_part(out_img, at, width), share)
                    kb.store_part(value, out_img, at, width)

    _pixels(kb, g, pixel)
    return kb.finish()


def build_global_avg_pool2d(module: ir.Module, name: str, *, in_hwc, dtype: str = "f32", target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out (n,C) = mean of x (n,H,W,C) over H and W (summed in
    pixel order, then divided by H*W). dtype "u8"/"i8": the bytes are summed exactly in int32, then
    out = roundeven(f32(sum) / f32(H*W)), as the NumPy reference does (ir/ops/nn.py GlobalAvgPool2D)."""
    h, w, c = _image_shape(in_hwc, "global_avg_pool2d")
    if dtype != "f32" and dtype not in INT8_POOL_FORMATS:
        raise ValueError(f"global_avg_pool2d: dtype must be f32, u8 or i8, got {dtype!r}")
    if dtype != "f32" and h * w > (2 ** 31 - 1) // 255:
        raise ValueError(f"global_avg_pool2d: {h}x{w} pixels of {dtype} could overflow the int32 sum")
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    b = kb.b
    vty = kb.vec_type()
    etype = F32 if dtype == "f32" else I8
    ity = ir.VectorType(ir.IntType(32), kb.lanes)
    signed = INT8_POOL_FORMATS.get(dtype, (False,))[0]

    def load(img, at, width):
        v = kb.load_part(img, at, width, kb.lanes, etype=etype)
        if dtype == "f32":
            return v
        return b.sext(v, ity) if signed else b.zext(v, ity)

    zero = kb.const(0.0, like=vty) if dtype == "f32" else ir.Constant(ity, [0] * kb.lanes)
    add = b.fadd if dtype == "f32" else b.add
    with kb.for_range(kb.n, name="batch") as lb:
        x_img = kb.gep(x, kb.mul(lb.index, h * w * c), etype)
        for block in channel_blocks(c, kb.lanes):
            with kb.for_range(h * w, name="pixel") as lp:
                accs = [lp.carry(zero) for _ in block]
                for a, (off, width) in zip(accs, block):
                    lp.next(a, add(a, load(x_img, kb.add(kb.mul(lp.index, c), off), width)))
            for a, (off, width) in zip(accs, block):
                total = lp.result(a)
                if dtype == "f32":
                    y = b.fdiv(total, kb.const(h * w, like=vty))
                else:       # |mean| <= 255 fits i32; the mean of bytes is a byte: no clamp
                    mean = kb.intrinsic("roundeven", b.fdiv(b.sitofp(total, vty), kb.const(h * w, like=vty)))
                    y = b.trunc(b.fptosi(mean, ity), ir.VectorType(I8, kb.lanes))
                kb.store_part(y, out, kb.add(kb.mul(lb.index, c), off), width)
    return kb.finish()


def build_global_avg_pool2d_grad(module: ir.Module, name: str, *, in_hwc, target) -> ir.Function:
    """`void name(ptr dy, ptr out, i64 n)`: out (n,H,W,C) = dy (n,C) / (H*W) at every pixel; in_hwc is the
    forward input's (H, W, C)."""
    h, w, c = _image_shape(in_hwc, "global_avg_pool2d_grad")
    kb = KernelBuilder(module, name, 2, target, arg_names=("dy", "out"))
    dy, out = kb.args
    b = kb.b
    vty = kb.vec_type()
    with kb.for_range(kb.n, name="batch") as lb:
        out_img = kb.gep(out, kb.mul(lb.index, h * w * c))
        for block in channel_blocks(c, kb.lanes):
            shares = [b.fdiv(kb.load_part(dy, kb.add(kb.mul(lb.index, c), off), width), kb.const(h * w, like=vty))
                      for off, width in block]
            with kb.for_range(h * w, name="pixel") as lp:
                for share, (off, width) in zip(shares, block):
                    kb.store_part(share, out_img, kb.add(kb.mul(lp.index, c), off), width)
    return kb.finish()
