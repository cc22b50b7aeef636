"""Pooling kernels (NHWC): max/avg forward and backward. Window taps are unrolled at generation time;
out-of-image taps are masked with selects on clamped (always in-bounds) addresses, so no tap ever
reads outside the input. Channels are the innermost, contiguous loop."""
from __future__ import annotations

from llvmlite import ir

from .matmul import F32, I64
from .pointwise import _kernel, f32


def _geometry(in_shape, out_hw, pool, stride, padding):
    h, w, c = in_shape
    return dict(h=h, w=w, c=c, oh=out_hw[0], ow=out_hw[1], ph=pool[0], pw=pool[1], sh=stride[0], sw=stride[1],
                pt=padding[0][0], pl=padding[1][0])


def _taps(kc, G, oy, ox):
    """Per tap: (in-bounds i1, clamped pixel index iy*W+ix)."""
    b = kc.b
    taps = []
    for i in range(G["ph"]):
        for j in range(G["pw"]):
            iy = b.add(b.mul(oy, kc.i64(G["sh"])), kc.i64(i - G["pt"]))
            ix = b.add(b.mul(ox, kc.i64(G["sw"])), kc.i64(j - G["pl"]))
            ok = b.and_(b.and_(b.icmp_signed(">=", iy, kc.i64(0)), b.icmp_signed("<", iy, kc.i64(G["h"]))),
                        b.and_(b.icmp_signed(">=", ix, kc.i64(0)), b.icmp_signed("<", ix, kc.i64(G["w"]))))
            pix = b.select(ok, b.add(b.mul(iy, kc.i64(G["w"])), ix), kc.i64(0))
            taps.append((ok, pix))
    return taps


def build_pool(module, name, *, op, in_shape, out_hw, pool, stride, padding, count_include_pad=False, target):
    """max_pool2d (x, out) | avg_pool2d (x, out) | max_pool2d_grad (x, dy, out) | avg_pool2d_grad (dy, out).
    Vectorized across channels (blocks of `lanes`, a masked tail block)."""
    grad = op.endswith("_grad")
    nptr = 3 if op == "max_pool2d_grad" else 2
    fn, kc = _kernel(module, name, nptr, target)
    out, n = fn.args[-2], fn.args[-1]
    G = _geometry(in_shape, out_hw, pool, stride, padding)
    b = kc.b
    lanes = kc.lanes
    C = G["c"]
    in_img, out_img = G["h"] * G["w"] * C, G["oh"] * G["ow"] * C
    # windows that never overlap and cover each input at most once: the gradient is a plain store
    disjoint = G["sh"] >= G["ph"] and G["sw"] >= G["pw"]
    if grad:
        kc.memset_zero(out, b.mul(n, kc.i64(in_img)))
    zero = kc.vconst(0.0)

    def pixel(img, oy, ox):
        taps = _taps(kc, G, oy, ox)
        obase = kc.add(kc.mul(img, out_img), b.mul(b.add(b.mul(oy, kc.i64(G["ow"])), ox), kc.i64(C)))
        ibase = kc.mul(img, in_img)
        inv = None
        if op.startswith("avg"):
            if count_include_pad:
                inv = kc.vconst(1.0 / (G["ph"] * G["pw"]))
            else:
                tot = b.uitofp(taps[0][0], F32)
                for ok, _ in taps[1:]:
                    tot = b.fadd(tot, b.uitofp(ok, F32))
                inv = kc.splat(b.fdiv(f32(1), tot))

        def block(c0, width):
            at = lambda pix: kc.gep(fn.args[0] if op != "avg_pool2d_grad" else out,  # noqa: E731
                                    kc.add(ibase, kc.add(kc.mul(pix, C), c0)))
            o = kc.gep(out if not grad else fn.args[-3], kc.add(obase, c0))
            if op == "max_pool2d":
                m = kc.vconst(-3.4e38)
                for ok, pix in taps:
                    m = b.select(ok, kc.vcall("maxnum", m, kc.load_vec(at(pix), width)), m)
                kc.store_vec(m, o, width)
            elif op == "avg_pool2d":
                acc = zero
                for ok, pix in taps:
                    acc = b.select(ok, b.fadd(acc, kc.load_vec(at(pix), width)), acc)
                kc.store_vec(b.fmul(acc, inv), o, width)
            elif op == "max_pool2d_grad":
                dy = fn.args[1]
                xs = [kc.load_vec(at(pix), width) for _, pix in taps]
                best = kc.vconst(-3.4e38)
                for (ok, _), v in zip(taps, xs):
                    best = b.select(ok, kc.vcall("maxnum", best, v), best)
                g = kc.load_vec(kc.gep(dy, kc.add(obase, c0)), width)
                found = ir.Constant(ir.VectorType(ir.IntType(1), lanes), [0] * lanes)
                for (ok, pix), v in zip(taps, xs):     # the FIRST maximum in row-major order gets dy
                    hit = b.and_(b.fcmp_ordered("==", v, best), b.not_(found))
                    hit = b.select(ok, hit, ir.Constant(hit.type, [0] * lanes))
                    found = b.or_(found, hit)
                    contrib = b.select(hit, g, zero)
                    dst = kc.gep(out, kc.add(ibase, kc.add(kc.mul(pix, C), c0)))
                    _guarded(kc, ok, lambda: kc.store_vec(
                        contrib if disjoint else b.fadd(kc.load_vec(dst, width), contrib), dst, width))
            else:  # avg_pool2d_grad: input 0 is dy, `out` is the image gradient
                dy = fn.args[0]
                g = b.fmul(kc.load_vec(kc.gep(dy, kc.add(obase, c0)), width), inv)
                for ok, pix in taps:
                    dst = kc.gep(out, kc.add(ibase, kc.add(kc.mul(pix, C), c0)))
                    _guarded(kc, ok, lambda dst=dst: kc.store_vec(
                        g if disjoint else b.fadd(kc.load_vec(dst, width), g), dst, width))

        full, tail = divmod(C, lanes)
        kc.loop(full, [], lambda j, c: block(kc.mul(j, lanes), lanes) or [], name="cblk")
        if tail:
            block(full * lanes, tail)

    kc.loop(n, [], lambda img, c: kc.loop(G["oh"], [], lambda oy, c2: kc.loop(
        G["ow"], [], lambda ox, c3: pixel(img, oy, ox) or []) or []) or [], name="img")
    return kc.finish()


def _guarded(kc, cond, emit):
    """if (cond) { emit() } — for stores that must not touch a clamped out-of-image address."""
    b = kc.b
    then = kc.fn.append_basic_block("tap")
    after = kc.fn.append_basic_block("tap.end")
    b.cbranch(cond, then, after)
    b.position_at_end(then)
    emit()
    b.branch(after)
    b.position_at_end(after)


_ = I64
