"""Optimizer update kernels of the LLVM backend: Keras SGD (momentum, Nesterov) and Keras 3 Adam, in place
on their state arrays, with the float32 operation order of backends/numpy/kernels.py.

Signatures (the state arrays have `size` float32 elements, a compile-time constant; the trailing `i64 n` is
accepted for the uniform kernel ABI and ignored):
    sgd_update(ptr w, ptr g, ptr velocity, i64 n)     has_velocity=True
    sgd_update(ptr w, ptr g, i64 n)                   has_velocity=False (momentum must be 0)
    adam_update(ptr w, ptr g, ptr m, ptr v, ptr t, i64 n)
`t` points to one float32 holding the step number AFTER increment (1 on the first step); t < 1 is the
caller's error (the bias correction divides by 1 - beta_1**t = 0 there).
"""
from __future__ import annotations

from llvmlite import ir

from .builder import F32, F64, I64, KernelBuilder


def _check_size(kernel: str, size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{kernel}: size must be a non-negative int (elements per state array), got {size!r}")
    return size


def _check_number(kernel: str, what: str, value, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{kernel}: {what} must be a number, got {value!r}")
    v = float(value)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi))):
        lo_s = "(" if lo_open else "["
        hi_s = ")" if hi_open else "]"
        raise ValueError(f"{kernel}: {what} must be in {lo_s}{lo}, {hi}{hi_s}, got {value!r}")
    return v


def build_sgd_update(module: ir.Module, name: str, *, size: int, lr: float, momentum: float = 0.0,
                     nesterov: bool = False, has_velocity: bool = True, target) -> ir.Function:
    """In place, Keras SGD: step = lr * g; velocity = momentum * velocity - step; w += velocity
    (nesterov: w += momentum * velocity - step). Without a velocity array: w -= step (momentum must be 0)."""
    kernel = "sgd_update"
    size = _check_size(kernel, size)
    lr = _check_number(kernel, "lr", lr)
    momentum = _check_number(kernel, "momentum", momentum, 0.0, None)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{kernel}: nesterov must be a bool, got {nesterov!r}")
    if not isinstance(has_velocity, bool):
        raise TypeError(f"{kernel}: has_velocity must be a bool, got {has_velocity!r}")
    if not has_velocity and momentum != 0.0:
        raise ValueError(f"{kernel}: momentum={momentum} needs a velocity array (has_velocity=True)")
    names = ("w", "g", "velocity") if has_velocity else ("w", "g")
    kb = KernelBuilder(module, name, len(names), target, arg_names=names)
    b = kb.b
    w, g = kb.args[:2]

    def body(s, carried):
        step = b.fmul(s.load(g), s.const(lr))
        if not has_velocity:
            s.store(b.fsub(s.load(w), step), w)
            return []
        vel = kb.args[2]
        v = b.fsub(b.fmul(s.load(vel), s.const(momentum)), step)
        s.store(v, vel)
        delta = b.fsub(b.fmul(v, s.const(momentum)), step) if nesterov else v
        s.store(b.fadd(s.load(w), delta), w)
        return []

    kb.strips(size, body)
    return kb.finish()


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


def build_adam_update(module: ir.Module, name: str, *, size: int, lr: float, beta_1: float = 0.9,
                      beta_2: float = 0.999, epsilon: float = 1e-7, target) -> ir.Function:
    """In place, Keras 3 Adam with t = *t_ptr (step after increment):
    alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) (float64, then float32);
    m += (g - m) * (1 - beta_1); v += (g*g - v) * (1 - beta_2); w -= alpha * m / (sqrt(v) + epsilon)."""
    kernel = "adam_update"
    size = _check_size(kernel, size)
    lr = _check_number(kernel, "lr", lr)
    beta_1 = _check_number(kernel, "beta_1", beta_1, 0.0, 1.0, hi_open=True)
    beta_2 = _check_number(kernel, "beta_2", beta_2, 0.0, 1.0, hi_open=True)
    epsilon = _check_number(kernel, "epsilon", epsilon, 0.0, None)
    kb = KernelBuilder(module, name, 5, target, arg_names=("w", "g", "m", "v", "t"))
    w, g, m, v, t_ptr = kb.args
    b = kb.b
    t = b.fptosi(kb.load(t_ptr), I64)
    t = b.select(b.icmp_signed("<", t, ir.Constant(I64, 0)), ir.Constant(I64, 0), t)
    one = ir.Constant(F64, 1.0)
    bias_2 = b.fsub(one, _pow_int(kb, beta_2, t))
    bias_1 = b.fsub(one, _pow_int(kb, beta_1, t))
    sqrt64 = kb.declare("llvm.sqrt.f64", F64, [F64])
    alpha = b.fptrunc(b.fdiv(b.fmul(ir.Constant(F64, lr), b.call(sqrt64, [bias_2])), bias_1), F32)

    def body(s, carried):
        gv, mv, vv = s.load(g), s.load(m), s.load(v)
        mv = b.fadd(mv, b.fmul(b.fsub(gv, mv), s.const(1 - beta_1)))
        vv = b.fadd(vv, b.fmul(b.fsub(b.fmul(gv, gv), vv), s.const(1 - beta_2)))
        s.store(mv, m)
        s.store(vv, v)
        step = b.fmul(b.fdiv(mv, b.fadd(kb.sqrt(vv), s.const(epsilon))), s.broadcast(alpha))
        s.store(b.fsub(s.load(w), step), w)
        return []

    kb.strips(size, body)
    return kb.finish()
