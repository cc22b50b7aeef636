"""Memory-bound kernels of the LLVM backend, all from two emitters:

- `emit_map`: out[i] = f(inputs at i) over an output shape, with NumPy broadcasting (each input
  has its own strides; broadcast dims have stride 0). Elementwise ops, activations and their
  gradients, bias_add, scale, dropout (f also sees the flat index) and optimizer updates.
- `emit_accumulate`: out[broadcast(i)] += f(x at i) in a fixed order — sum_to, bias_add_grad,
  global average pooling; deterministic by construction.
Row-wise ops (softmax family, losses) loop over rows with small inner loops.

Scalar IR in counted loops over contiguous innermost dimensions: LLVM's O3 loop vectorizer turns the
inner loops into vector code. Every kernel: void name(ptr... , i64 n), n = dynamic batch size."""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from .matmul import F32, I32, I64, KernelContext, new_kernel_function

I1 = ir.IntType(1)


def _kernel(module, name, n_ptrs, target):
    fn = new_kernel_function(module, name, n_ptrs, target)
    return fn, KernelContext(module, fn, target)


def _dims(shape, n):
    """Concrete dims: None (the batch) becomes the runtime value n."""
    return [n if d is None else d for d in shape]


def _strides(shape, out_shape, n):
    """Element strides of an input broadcast to out_shape (0 on broadcast dims), as IntLike."""
    lead = len(out_shape) - len(shape)
    dims = _dims(shape, n)
    strides, acc = [], 1
    for d in reversed(dims):
        strides.append(acc)
        acc = _mulc(acc, d)
    strides = list(reversed(strides))
    out = [0] * lead
    for d_in, d_out, s in zip(shape, out_shape[lead:], strides):
        out.append(0 if (d_in == 1 and d_out != 1) else s)
    return out


def _mulc(a, b):
    return a * b if isinstance(a, int) and isinstance(b, int) else ("mul", a, b)


def f32(v):
    return ir.Constant(F32, float(v))


class Scalar:
    """Scalar float helpers on a KernelContext."""

    def __init__(self, kc):
        self.kc, self.b = kc, kc.b

    def load(self, ptr, idx):
        return self.b.load(self.kc.gep(ptr, idx), typ=F32)

    def store(self, v, ptr, idx):
        self.b.store(v, self.kc.gep(ptr, idx))

    def call(self, name, *args):
        fn = self.kc.declare(f"llvm.{name}.f32", F32, [F32] * len(args))
        return self.b.call(fn, list(args))

    def exp(self, x):
        return self.call("exp", x)

    def log(self, x):
        return self.call("log", x)

    def max(self, a, c):
        return self.call("maxnum", a, c)

    def gt0(self, x):
        return self.b.fcmp_ordered(">", x, f32(0))

    def sigmoid(self, x):
        # 1 / (1 + exp(-x)): exp(-x) = inf for very negative x gives exactly 0 (no NaN)
        return self.b.fdiv(f32(1), self.b.fadd(f32(1), self.exp(self.b.fsub(f32(0), x))))

    def tanh(self, x):
        # 1 - 2 / (exp(2x) + 1), and x itself for |x| < 1e-4 (no cancellation)
        b = self.b
        t = b.fsub(f32(1), b.fdiv(f32(2), b.fadd(self.exp(b.fmul(x, f32(2))), f32(1))))
        small = b.fcmp_ordered("<", self.call("fabs", x), f32(1e-4))
        return b.select(small, x, t)


def _resolve(kc, v):
    if isinstance(v, tuple):
        return kc.mul(_resolve(kc, v[1]), _resolve(kc, v[2]))
    return v


def _collapse(out_shape, shapes):
    """Merge adjacent dims that every operand treats alike (all full, or all broadcast for that operand),
    so same-shape maps become one flat loop the vectorizer handles well. -> (out_dims, in_shapes)."""
    r = len(out_shape)
    full = [tuple([1] * (r - len(sh)) + list(sh)) for sh in shapes]
    groups = []                      # [(modes, [dims])]
    for d in range(r):
        if out_shape[d] == 1:
            continue
        modes = tuple(f[d] != 1 or out_shape[d] == 1 for f in full)
        if groups and groups[-1][0] == modes and None not in groups[-1][1]:
            groups[-1][1].append(out_shape[d])
        else:
            groups.append((modes, [out_shape[d]]))

    def prod(ds):
        return None if None in ds else int(np.prod(ds))
    out_dims = tuple(prod(ds) for _, ds in groups)
    in_shapes = [tuple(prod(ds) if modes[i] else 1 for modes, ds in groups) for i in range(len(shapes))]
    return out_dims, in_shapes


def emit_map(kc, out_shape, ins, out, n, fn, collapse=True):
    """for every index i of out_shape: out[i] = fn(values of ins at i (broadcast), flat index i)."""
    if collapse:
        dims, shapes = _collapse(out_shape, [s for _, s in ins])
        out_shape, ins = dims, [(p, s) for (p, _), s in zip(ins, shapes)]
    sc = Scalar(kc)
    dims = _dims(out_shape, n)
    in_strides = [[_resolve(kc, s) for s in _strides(shape, out_shape, n)] for _, shape in ins]
    out_strides = [_resolve(kc, s) for s in _strides(out_shape, out_shape, n)]

    def level(d, offs, ooff):
        if d == len(dims):
            vals = [sc.load(p, o) for (p, _), o in zip(ins, offs)]
            sc.store(fn(sc, vals, ooff), out, ooff)
            return

        def body(i, carried):
            level(d + 1, [kc.add(o, kc.mul(i, s[d])) for o, s in zip(offs, in_strides)],
                  kc.add(ooff, kc.mul(i, out_strides[d])))
            return []
        kc.loop(dims[d], [], body, name=f"d{d}")
    level(0, [0] * len(ins), 0)


def emit_accumulate(kc, x_shape, x, out_shape, out, n, fn=None):
    """out (broadcastable to x_shape) = sum of fn(x) over the broadcast dims, summed in index order."""
    sc = Scalar(kc)
    total_out = _resolve(kc, _total(out_shape, n))
    kc.memset_zero(out, total_out)
    dims = _dims(x_shape, n)
    xs = [_resolve(kc, s) for s in _strides(x_shape, x_shape, n)]
    os_ = [_resolve(kc, s) for s in _strides(out_shape, x_shape, n)]

    def level(d, xo, oo):
        if d == len(dims):
            v = sc.load(x, xo)
            sc.store(kc.b.fadd(sc.load(out, oo), fn(sc, v) if fn else v), out, oo)
            return

        def body(i, carried):
            level(d + 1, kc.add(xo, kc.mul(i, xs[d])), kc.add(oo, kc.mul(i, os_[d])))
            return []
        kc.loop(dims[d], [], body, name=f"r{d}")
    level(0, 0, 0)


def _total(shape, n):
    t = 1
    for d in shape:
        t = _mulc(t, n if d is None else d)
    return t


# -- elementwise ---------------------------------------------------------------------------------------

UNARY = {
    "relu": lambda sc, v: sc.max(v[0], f32(0)),
    "sigmoid": lambda sc, v: sc.sigmoid(v[0]),
    "tanh": lambda sc, v: sc.tanh(v[0]),
    "neg": lambda sc, v: sc.b.fsub(f32(0), v[0]),
    "relu_grad": lambda sc, v: sc.b.select(sc.gt0(v[0]), v[1], f32(0)),
    "sigmoid_grad": lambda sc, v: sc.b.fmul(v[1], sc.b.fmul(v[0], sc.b.fsub(f32(1), v[0]))),
    "tanh_grad": lambda sc, v: sc.b.fmul(v[1], sc.b.fsub(f32(1), sc.b.fmul(v[0], v[0]))),
    "add": lambda sc, v: sc.b.fadd(v[0], v[1]),
    "sub": lambda sc, v: sc.b.fsub(v[0], v[1]),
    "mul": lambda sc, v: sc.b.fmul(v[0], v[1]),
    "bias_add": lambda sc, v: sc.b.fadd(v[0], v[1]),
}


def build_map(module, name, *, op, in_shapes, out_shape, target, factor=None):
    """void name(ptr in..., ptr out, i64 n) for the pointwise ops in UNARY (and scale)."""
    fn, kc = _kernel(module, name, len(in_shapes) + 1, target)
    ptrs, out, n = fn.args[:len(in_shapes)], fn.args[len(in_shapes)], fn.args[-1]
    if op == "scale":
        f = lambda sc, v, i: sc.b.fmul(v[0], f32(factor))  # noqa: E731
    else:
        rule = UNARY[op]
        f = lambda sc, v, i: rule(sc, v)  # noqa: E731
    emit_map(kc, out_shape, list(zip(ptrs, in_shapes)), out, n, f)
    return kc.finish()


def build_sum_to(module, name, *, x_shape, out_shape, target, scale=None):
    """void name(ptr x, ptr out, i64 n): out = sum of x over broadcast dims (times `scale`)."""
    fn, kc = _kernel(module, name, 2, target)
    x, out, n = fn.args
    lead = len(x_shape) - len(out_shape)
    full = tuple([1] * lead + list(out_shape))
    emit_accumulate(kc, x_shape, x, full, out, n,
                    (lambda sc, v: sc.b.fmul(v, f32(scale))) if scale is not None else None)
    return kc.finish()


def build_global_avg_pool2d_grad(module, name, *, in_shape, target):
    """void name(ptr dy (n, C), ptr out (n, H, W, C), i64 n)."""
    h, w, c = in_shape
    fn, kc = _kernel(module, name, 2, target)
    dy, out, n = fn.args
    emit_map(kc, (None, h, w, c), [(dy, (None, 1, 1, c))], out, n,
             lambda sc, v, i: sc.b.fmul(v[0], f32(1.0 / (h * w))))
    return kc.finish()


def build_transpose(module, name, *, in_shape, perm, target):
    """void name(ptr x, ptr out, i64 n): out = transpose(x, perm) (batch stays first)."""
    fn, kc = _kernel(module, name, 2, target)
    x, out, n = fn.args
    in_strides = [_resolve(kc, s) for s in _strides(in_shape, in_shape, n)]
    out_shape = tuple(in_shape[p] for p in perm)
    dims = _dims(out_shape, n)
    out_strides = [_resolve(kc, s) for s in _strides(out_shape, out_shape, n)]
    sc = Scalar(kc)

    def level(d, xo, oo):
        if d == len(dims):
            sc.store(sc.load(x, xo), out, oo)
            return
        kc.loop(dims[d], [], lambda i, c: level(d + 1, kc.add(xo, kc.mul(i, in_strides[perm[d]])),
                                                     kc.add(oo, kc.mul(i, out_strides[d]))) or [])
    level(0, 0, 0)
    return kc.finish()


# -- dropout: the counter-based hash of backends/numpy/kernels.dropout_mask --------------------------

def _mix32(b, x):
    c = lambda v: ir.Constant(I32, v)  # noqa: E731
    x = b.xor(x, b.lshr(x, c(16)))
    x = b.mul(x, c(0x7FEB352D))
    x = b.xor(x, b.lshr(x, c(15)))
    x = b.mul(x, c(0x846CA68B))
    return b.xor(x, b.lshr(x, c(16)))


def build_dropout(module, name, *, shape, rate, seed, target, has_step=True):
    """void name(ptr x, [ptr step,] ptr out, ptr base, i64 n): out = x * keep / (1 - rate), keep = hash >= rate * 2^32.
    `base` carries an integer (inttoptr): the flat index of element 0 in the whole batch, so a batch split
    across threads draws exactly the mask of the unsplit batch."""
    fn, kc = _kernel(module, name, 4 if has_step else 3, target)
    x = fn.args[0]
    out, base, n = fn.args[-3], fn.args[-2], fn.args[-1]
    b = kc.b
    base = b.ptrtoint(base, I64)
    step = b.fptoui(b.load(fn.args[1], typ=F32), I32) if has_step else ir.Constant(I32, 0)
    key = _mix32(b, b.add(ir.Constant(I32, (int(seed) * 0x9E3779B9) & 0xFFFFFFFF), step))
    threshold = ir.Constant(I64, int(rate * 2 ** 32))
    inv = f32(1.0 / (1.0 - rate))

    def f(sc, v, i):
        h = _mix32(b, b.xor(b.trunc(b.add(kc.i64(i), base), I32), key))
        keep = b.icmp_unsigned(">=", b.zext(h, I64), threshold)
        return b.select(keep, b.fmul(v[0], inv), f32(0))
    emit_map(kc, shape, [(x, shape)], out, n, f)
    return kc.finish()


# -- row-wise: softmax family and losses ------------------------------------------------------------

def _rows(shape, axis, n):
    """(outer, K, inner) of a tensor reduced along `axis`."""
    dims = _dims(shape, n)
    outer = 1
    for d in dims[:axis]:
        outer = _mulc(outer, d)
    inner = 1
    for d in dims[axis + 1:]:
        inner = _mulc(inner, d)
    return outer, dims[axis], inner


def build_softmax(module, name, *, op, shape, axis, target):
    """softmax | log_softmax (x, out) and softmax_grad | log_softmax_grad (y, dy, out) along `axis`."""
    grad = op.endswith("_grad")
    fn, kc = _kernel(module, name, 3 if grad else 2, target)
    n = fn.args[-1]
    out = fn.args[-2]
    outer, k, inner = (_resolve(kc, v) if isinstance(v, tuple) else v for v in _rows(shape, axis, n))
    sc, b = Scalar(kc), kc.b

    def row(o, i):
        base = kc.add(kc.mul(o, k * inner if isinstance(inner, int) else kc.mul(k, inner)), i)
        at = lambda j: kc.add(base, kc.mul(j, inner))  # noqa: E731
        if not grad:
            x = fn.args[0]
            m = kc.loop(k, [f32(-3.0e38)], lambda j, c: [sc.max(c[0], sc.load(x, at(j)))])[0]
            s = kc.loop(k, [f32(0)], lambda j, c: [b.fadd(c[0], sc.exp(b.fsub(sc.load(x, at(j)), m)))])[0]
            if op == "softmax":
                inv = b.fdiv(f32(1), s)
                kc.loop(k, [], lambda j, c: sc.store(b.fmul(sc.exp(b.fsub(sc.load(x, at(j)), m)), inv), out, at(j)) or [])
            else:
                ls = b.fadd(m, sc.log(s))
                kc.loop(k, [], lambda j, c: sc.store(b.fsub(sc.load(x, at(j)), ls), out, at(j)) or [])
        else:
            y, dy = fn.args[0], fn.args[1]
            if op == "softmax_grad":
                dot = kc.loop(k, [f32(0)], lambda j, c: [b.fadd(c[0], b.fmul(sc.load(y, at(j)), sc.load(dy, at(j))))])[0]
                kc.loop(k, [], lambda j, c: sc.store(b.fmul(sc.load(y, at(j)), b.fsub(sc.load(dy, at(j)), dot)),
                                                      out, at(j)) or [])
            else:
                tot = kc.loop(k, [f32(0)], lambda j, c: [b.fadd(c[0], sc.load(dy, at(j)))])[0]
                kc.loop(k, [], lambda j, c: sc.store(b.fsub(sc.load(dy, at(j)), b.fmul(sc.exp(sc.load(y, at(j))), tot)),
                                                      out, at(j)) or [])
    kc.loop(outer, [], lambda o, c: kc.loop(inner, [], lambda i, c2: row(o, i) or []) or [])
    return kc.finish()


EPS = 1e-7


def build_loss(module, name, *, op, k, from_logits, target):
    """Losses over (n, k) predictions -> scalar mean; `<loss>_grad` variants -> (n, k).
    Sparse labels arrive as float32 class ids; they are clamped into [0, k-1] so a bad label can never
    address memory outside its row (callers validate labels before the call)."""
    grad = op.endswith("_grad")
    base = op[:-5] if grad else op
    fn, kc = _kernel(module, name, 4 if grad else 3, target)
    p, t = fn.args[0], fn.args[1]
    out, n = fn.args[-2], fn.args[-1]
    sc, b = Scalar(kc), kc.b
    nf = b.sitofp(n, F32)
    scale = b.fdiv(b.load(fn.args[2], typ=F32), nf) if grad else None
    lo, hi = f32(EPS), f32(1 - EPS)

    def clipq(v):
        return sc.call("minnum", sc.max(v, lo), hi)

    def inside(v):
        return b.and_(b.fcmp_ordered(">", v, lo), b.fcmp_ordered("<", v, hi))

    def label(r):
        lab = b.fptosi(sc.load(t, r), I64)
        lab = b.select(b.icmp_signed("<", lab, kc.i64(0)), kc.i64(0), lab)
        return b.select(b.icmp_signed(">", lab, kc.i64(k - 1)), kc.i64(k - 1), lab)

    def row(r, carried):
        at = lambda j: kc.add(kc.mul(r, k), j)  # noqa: E731
        acc = carried[0] if carried else None
        if base == "mse":
            if grad:
                kc.loop(k, [], lambda j, c: sc.store(b.fmul(b.fsub(sc.load(p, at(j)), sc.load(t, at(j))),
                                                            b.fdiv(b.fmul(scale, f32(2)), f32(k))), out, at(j)) or [])
                return []
            s = kc.loop(k, [f32(0)], lambda j, c: [b.fadd(c[0], b.fmul(d := b.fsub(sc.load(p, at(j)), sc.load(t, at(j))), d))])[0]
            return [b.fadd(acc, b.fdiv(s, f32(k)))]
        sparse = base.startswith("sparse")
        tv = (lambda j: b.uitofp(b.icmp_signed("==", j, label(r)), F32)) if sparse else (lambda j: sc.load(t, at(j)))
        if from_logits:
            m = kc.loop(k, [f32(-3.0e38)], lambda j, c: [sc.max(c[0], sc.load(p, at(j)))])[0]
            s = kc.loop(k, [f32(0)], lambda j, c: [b.fadd(c[0], sc.exp(b.fsub(sc.load(p, at(j)), m)))])[0]
            lse = b.fadd(m, sc.log(s))
            tsum = kc.loop(k, [f32(0)], lambda j, c: [b.fadd(c[0], tv(j))])[0]
            if grad:   # softmax * sum(t) - t
                inv = b.fdiv(f32(1), s)
                kc.loop(k, [], lambda j, c: sc.store(b.fmul(b.fsub(b.fmul(b.fmul(sc.exp(b.fsub(sc.load(p, at(j)), m)), inv), tsum),
                                                                    tv(j)), scale), out, at(j)) or [])
                return []
            dot = kc.loop(k, [f32(0)], lambda j, c: [b.fadd(c[0], b.fmul(tv(j), b.fsub(sc.load(p, at(j)), lse)))])[0]
            return [b.fsub(acc, dot)]
        qs = kc.loop(k, [f32(0)], lambda j, c: [b.fadd(c[0], clipq(sc.load(p, at(j))))])[0]
        tsum = kc.loop(k, [f32(0)], lambda j, c: [b.fadd(c[0], tv(j))])[0]
        if grad:   # d/dp_j = (sum t / sum q - t_j / q_j) * inside(p_j)
            def g(j, c):
                pj = sc.load(p, at(j))
                v = b.fsub(b.fdiv(tsum, qs), b.fdiv(tv(j), clipq(pj)))
                sc.store(b.select(inside(pj), b.fmul(v, scale), f32(0)), out, at(j))
                return []
            kc.loop(k, [], g)
            return []
        lq = sc.log(qs)
        dot = kc.loop(k, [f32(0)], lambda j, c: [b.fadd(c[0], b.fmul(tv(j), b.fsub(sc.log(clipq(sc.load(p, at(j)))), lq)))])[0]
        return [b.fsub(acc, dot)]

    if grad:
        kc.loop(n, [], row)
    else:
        total = kc.loop(n, [f32(0)], row)[0]
        b.store(b.fdiv(total, nf), out)
    return kc.finish()


# -- optimizer updates (in place on the state arrays) ----------------------------------------------

def build_adam(module, name, *, size, lr, beta_1, beta_2, epsilon, target):
    """void name(ptr w, ptr g, ptr m, ptr v, ptr t, ptr unused, i64 n): Keras Adam, t read at run time."""
    fn, kc = _kernel(module, name, 6, target)
    w, g, m, v, tp = fn.args[:5]
    sc, b = Scalar(kc), kc.b
    t = b.load(tp, typ=F32)
    pw = lambda base: sc.call("pow", f32(base), t)  # noqa: E731
    alpha = b.fdiv(b.fmul(f32(lr), sc.call("sqrt", b.fsub(f32(1), pw(beta_2)))), b.fsub(f32(1), pw(beta_1)))

    def body(i, c):
        gi, mi, vi = sc.load(g, i), sc.load(m, i), sc.load(v, i)
        mi = b.fadd(mi, b.fmul(b.fsub(gi, mi), f32(1 - beta_1)))
        vi = b.fadd(vi, b.fmul(b.fsub(b.fmul(gi, gi), vi), f32(1 - beta_2)))
        sc.store(mi, m, i)
        sc.store(vi, v, i)
        step = b.fdiv(b.fmul(alpha, mi), b.fadd(sc.call("sqrt", vi), f32(epsilon)))
        sc.store(b.fsub(sc.load(w, i), step), w, i)
        return []
    kc.loop(size, [], body)
    return kc.finish()


def build_sgd(module, name, *, size, lr, momentum, nesterov, has_velocity, target):
    """void name(ptr w, ptr g, [ptr velocity,] ptr unused, i64 n): Keras SGD (momentum, Nesterov)."""
    fn, kc = _kernel(module, name, 4 if has_velocity else 3, target)
    w, g = fn.args[:2]
    sc, b = Scalar(kc), kc.b

    def body(i, c):
        gi = sc.load(g, i)
        if not has_velocity or momentum == 0.0:
            sc.store(b.fsub(sc.load(w, i), b.fmul(f32(lr), gi)), w, i)
            return []
        vel = fn.args[2]
        vi = b.fsub(b.fmul(f32(momentum), sc.load(vel, i)), b.fmul(f32(lr), gi))
        sc.store(vi, vel, i)
        upd = b.fsub(b.fmul(f32(momentum), vi), b.fmul(f32(lr), gi)) if nesterov else vi
        sc.store(b.fadd(sc.load(w, i), upd), w, i)
        return []
    kc.loop(size, [], body)
    return kc.finish()
