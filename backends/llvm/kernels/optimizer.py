"""Optimizer update kernels of the LLVM backend: Keras SGD (momentum, Nesterov), Keras 3 Adam (AdamW =
weight_decay) and RMSprop, in place on their state arrays, with the float32 operation order of
backends/numpy/kernels.py.

Every kernel's operands are the IR op's (ir/ops/optim.py `operand_names`): `w, g, lr`, op scalars, then
the state slots; `lr` (and Adam's `t`) point to one float32, so the learning rate may change every call.
Signatures (state arrays have `size` float32 elements, a compile-time constant; the trailing `i64 n` is the
uniform kernel ABI's batch size, ignored):
    sgd_update(ptr w, ptr g, ptr lr[, ptr velocity], i64 n)                  velocity iff momentum > 0
    adam_update(ptr w, ptr g, ptr lr, ptr t, ptr m, ptr v, i64 n)
    rmsprop_update(ptr w, ptr g, ptr lr, ptr velocity[, ptr momentum_buffer][, ptr average_gradient], i64 n)
`t` holds the step number AFTER increment (1 on the first step); t < 1 is the caller's error (the bias
correction divides by 1 - beta_1**t = 0 there).

Before its own rule every kernel applies Keras 3's base-optimizer steps (`_UpdateKernel`): clipnorm
(g = (g * clipnorm) / max(||g||, clipnorm), ||g|| summed in float64 in a first pass) and decoupled weight
decay (w = w - (w * weight_decay) * lr). Settings are validated once, by ir.ops.optim.check_setting.
"""
from __future__ import annotations

from llvmlite import ir

from ir.ops import get_op
from ir.ops.optim import check_setting

from .builder import F32, F64, I64, KernelBuilder


def _check_size(kernel: str, size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{kernel}: size must be a non-negative int (elements per state array), got {size!r}")
    return size


class _UpdateKernel:
    """One optimizer kernel being built: validated settings, named operands, the per-call scalars and the
    clipnorm factor; `run(body)` emits the strip loop, calling body(s, g, w) with the strip's clipped
    gradient and decayed weight (body stores w and the slots)."""

    def __init__(self, module, name, op, target, size, settings):
        self.kernel = op
        self.size = _check_size(op, size)
        opdef = get_op(op)
        unknown = set(settings) - set(opdef.attrs)
        if unknown:
            raise ValueError(f"{op}: unknown setting(s) {sorted(unknown)}")
        self.cfg = {k: check_setting(op, k, settings.get(k, d)) for k, d in opdef.attrs.items()}
        names = opdef.operand_names(self.cfg)
        self.kb = kb = KernelBuilder(module, name, len(names), target, arg_names=names)
        self.b = kb.b
        self.arg = dict(zip(names, kb.args))
        self.lr = kb.load(self.arg["lr"])
        self.clip_denominator = self._clip_denominator() if self.cfg["clipnorm"] else None

    def _clip_denominator(self) -> ir.Value:
        """max(||g||, clipnorm) as float32, ||g|| = sqrt of a float64 sum of squares in element order.
        A NaN norm compares False and gives clipnorm (the NumPy kernel does the same)."""
        kb, b, g = self.kb, self.b, self.arg["g"]
        with kb.for_range(self.size, name="norm") as lp:
            acc = lp.carry(ir.Constant(F64, 0.0), name="sumsq")
            x = b.fpext(kb.load(g, lp.index), F64)
            lp.next(acc, b.fadd(acc, b.fmul(x, x)))
        sqrt64 = kb.declare("llvm.sqrt.f64", F64, [F64])
        norm = b.fptrunc(b.call(sqrt64, [lp.result(acc)]), F32)
        clip = kb.const(self.cfg["clipnorm"])
        return b.select(b.fcmp_ordered(">", norm, clip), norm, clip)

    def run(self, body) -> ir.Function:
        b, cfg = self.b, self.cfg

        def strip(s, carried):
            g = s.load(self.arg["g"])
            if self.clip_denominator is not None:
                g = b.fdiv(b.fmul(g, s.const(cfg["clipnorm"])), s.broadcast(self.clip_denominator))
            w = s.load(self.arg["w"])
            if cfg["weight_decay"]:
                w = b.fsub(w, b.fmul(b.fmul(w, s.const(cfg["weight_decay"])), s.broadcast(self.lr)))
            body(s, g, w)
            return []

        self.kb.strips(self.size, strip)
        return self.kb.finish()


def build_sgd_update(module: ir.Module, name: str, *, size: int, target, **settings) -> ir.Function:
    """In place, Keras SGD: step = lr * g; velocity = momentum * velocity - step; w += velocity
    (nesterov: w += momentum * velocity - step). momentum == 0: no velocity operand, w -= step.
    settings: momentum, nesterov, weight_decay, clipnorm (ir/ops/optim.py defaults)."""
    k = _UpdateKernel(module, name, "sgd_update", target, size, settings)
    b, momentum, w_ptr = k.b, k.cfg["momentum"], k.arg["w"]

    def body(s, g, w):
        step = b.fmul(g, s.broadcast(k.lr))
        if not momentum:
            s.store(b.fsub(w, step), w_ptr)
            return
        vel = k.arg["velocity"]
        v = b.fsub(b.fmul(s.load(vel), s.const(momentum)), step)
        s.store(v, vel)
        delta = b.fsub(b.fmul(v, s.const(momentum)), step) if k.cfg["nesterov"] else v
        s.store(b.fadd(w, delta), w_ptr)

    return k.run(body)


def _pow_int(kb: KernelBuilder, base: float, exponent: ir.Value) -> ir.Value:
    """base ** exponent in float64 for an i64 exponent >= 0, by square-and-multiply over its 63 bits
    (no libm `pow`, so the object links without -lm)."""
    b = kb.b
    with kb.for_range(63, name="pow") as lp:
        result = lp.carry(ir.Constant(F64, 1.0), name="result")
        square = lp.carry(ir.Constant(F64, base), name="square")
        bit = b.and_(b.lshr(exponent, lp.index), ir.Constant(I64, 1))
        lp.next(result, b.select(b.icmp_unsigned("!=", bit, ir.Constant(I64, 0)), b.fmul(result, square), result))
        lp.next(square, b.fmul(square, square))
    return lp.result(result)


def build_adam_update(module: ir.Module, name: str, *, size: int, target, **settings) -> ir.Function:
    """In place, Keras 3 Adam with t = *t_ptr (step after increment), lr = *lr_ptr:
    alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) (float64, then float32);
    m += (g - m) * (1 - beta_1); v += (g*g - v) * (1 - beta_2); w -= alpha * m / (sqrt(v) + epsilon).
    settings: beta_1, beta_2, epsilon, weight_decay (AdamW), clipnorm."""
    k = _UpdateKernel(module, name, "adam_update", target, size, settings)
    kb, b, cfg = k.kb, k.b, k.cfg
    m, v = k.arg["m"], k.arg["v"]
    t = b.fptosi(kb.load(k.arg["t"]), I64)
    t = b.select(b.icmp_signed("<", t, ir.Constant(I64, 0)), ir.Constant(I64, 0), t)
    one = ir.Constant(F64, 1.0)
    bias_2 = b.fsub(one, _pow_int(kb, cfg["beta_2"], t))
    bias_1 = b.fsub(one, _pow_int(kb, cfg["beta_1"], t))
    sqrt64 = kb.declare("llvm.sqrt.f64", F64, [F64])
    alpha = b.fptrunc(b.fdiv(b.fmul(b.fpext(k.lr, F64), b.call(sqrt64, [bias_2])), bias_1), F32)

    def body(s, gv, w):
        mv, vv = s.load(m), s.load(v)
        mv = b.fadd(mv, b.fmul(b.fsub(gv, mv), s.const(1 - cfg["beta_1"])))
        vv = b.fadd(vv, b.fmul(b.fsub(b.fmul(gv, gv), vv), s.const(1 - cfg["beta_2"])))
        s.store(mv, m)
        s.store(vv, v)
        step = b.fmul(b.fdiv(mv, b.fadd(kb.sqrt(vv), s.const(cfg["epsilon"]))), s.broadcast(alpha))
        s.store(b.fsub(w, step), k.arg["w"])

    return k.run(body)


def build_rmsprop_update(module: ir.Module, name: str, *, size: int, target, **settings) -> ir.Function:
    """In place, Keras 3 RMSprop: velocity = rho*velocity + (1-rho)*g*g; denominator = velocity + epsilon
    (centered: avg = rho*avg + (1-rho)*g, denominator = (velocity - avg*avg) + epsilon);
    increment = (lr*g) / sqrt(denominator); momentum > 0: buffer = momentum*buffer + increment, w -= buffer;
    else w -= increment. settings: rho, momentum, epsilon, centered, weight_decay, clipnorm."""
    k = _UpdateKernel(module, name, "rmsprop_update", target, size, settings)
    kb, b, cfg = k.kb, k.b, k.cfg
    rho = cfg["rho"]

    def body(s, g, w):
        vel = k.arg["velocity"]
        v = b.fadd(b.fmul(s.load(vel), s.const(rho)), b.fmul(b.fmul(g, g), s.const(1 - rho)))
        s.store(v, vel)
        if cfg["centered"]:
            avg_ptr = k.arg["average_gradient"]
            avg = b.fadd(b.fmul(s.load(avg_ptr), s.const(rho)), b.fmul(g, s.const(1 - rho)))
            s.store(avg, avg_ptr)
            denominator = b.fadd(b.fsub(v, b.fmul(avg, avg)), s.const(cfg["epsilon"]))
        else:
            denominator = b.fadd(v, s.const(cfg["epsilon"]))
        increment = b.fdiv(b.fmul(g, s.broadcast(k.lr)), kb.sqrt(denominator))
        if cfg["momentum"]:
            buf_ptr = k.arg["momentum_buffer"]
            buf = b.fadd(b.fmul(s.load(buf_ptr), s.const(cfg["momentum"])), increment)
            s.store(buf, buf_ptr)
            increment = buf
        s.store(b.fsub(w, increment), k.arg["w"])

    return k.run(body)
