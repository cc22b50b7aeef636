"""Pooling kernels (NHWC): max/avg forward and backward. Window taps are unrolled at generation time;
out-of-image taps are masked with selects on clamped (always in-bounds) addresses, so no tap ever
reads outside the input. Channels are the innermost, contiguous loop."""
from __future__ import annotations

from llvmlite import ir

from .matmul import F32, I64
from .pointwise import Scalar, _kernel, f32


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
    """max_pool2d (x, out) | avg_pool2d (x, out) | max_pool2d_grad (x, dy, out) | avg_pool2d_grad (dy, out)."""
    grad = op.endswith("_grad")
    nptr = 3 if op == "max_pool2d_grad" else 2
    fn, kc = _kernel(module, name, nptr, target)
    out, n = fn.args[-2], fn.args[-1]
    G = _geometry(in_shape, out_hw, pool, stride, padding)
    sc, b = Scalar(kc), kc.b
    in_img, out_img = G["h"] * G["w"] * G["c"], G["oh"] * G["ow"] * G["c"]
    if grad:
        kc.memset_zero(out, b.mul(n, kc.i64(in_img)))

    def pixel(img, oy, ox):
        taps = _taps(kc, G, oy, ox)
        obase = kc.add(kc.mul(img, out_img), b.mul(b.add(b.mul(oy, kc.i64(G["ow"])), ox), kc.i64(G["c"])))
        ibase = kc.mul(img, in_img)
        if op.startswith("avg"):
            cnt = G["ph"] * G["pw"]
            if count_include_pad:
                inv = f32(1.0 / cnt)
            else:
                valid = taps[0][0]
                tot = b.uitofp(taps[0][0], F32)
                for ok, _ in taps[1:]:
                    tot = b.fadd(tot, b.uitofp(ok, F32))
                inv = b.fdiv(f32(1), tot)
                _ = valid

        def channel(ch, carried):
            at = lambda pix: kc.add(ibase, kc.add(kc.mul(pix, G["c"]), ch))  # noqa: E731
            o = kc.add(obase, ch)
            if op == "max_pool2d":
                m = f32(-3.4e38)
                for ok, pix in taps:
                    m = b.select(ok, sc.max(m, sc.load(fn.args[0], at(pix))), m)
                sc.store(m, out, o)
            elif op == "avg_pool2d":
                s = f32(0)
                for ok, pix in taps:
                    s = b.fadd(s, b.select(ok, sc.load(fn.args[0], at(pix)), f32(0)))
                sc.store(b.fmul(s, inv), out, o)
            elif op == "max_pool2d_grad":
                x, dy = fn.args[0], fn.args[1]
                best, arg = f32(-3.4e38), kc.i64(-1)
                for ok, pix in taps:       # first maximum in row-major order wins (strict >)
                    v = sc.load(x, at(pix))
                    better = b.and_(ok, b.or_(b.fcmp_ordered(">", v, best), b.icmp_signed("<", arg, kc.i64(0))))
                    best = b.select(better, v, best)
                    arg = b.select(better, at(pix), arg)
                ok_any = b.icmp_signed(">=", arg, kc.i64(0))
                dst = b.select(ok_any, arg, kc.i64(0))
                add = b.select(ok_any, sc.load(dy, o), f32(0))
                sc.store(b.fadd(sc.load(out, dst), add), out, dst)
            else:  # avg_pool2d_grad
                g = b.fmul(sc.load(fn.args[0], o), inv)
                for ok, pix in taps:
                    dst = at(pix)
                    sc.store(b.fadd(sc.load(out, dst), b.select(ok, g, f32(0))), out, dst)
            return []
        kc.loop(G["c"], [], channel, name="ch")

    kc.loop(n, [], lambda img, c: kc.loop(G["oh"], [], lambda oy, c2: kc.loop(
        G["ow"], [], lambda ox, c3: pixel(img, oy, ox) or []) or []) or [], name="img")
    return kc.finish()


_ = I64, ir
