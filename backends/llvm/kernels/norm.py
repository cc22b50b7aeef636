"""Batch-normalization kernels of the LLVM backend (channels last), with the semantics of
backends/numpy/kernels.py: per-channel factors are computed once into a stack buffer, then every row of C
channels runs in vector strips. Statistics are accumulated in float64 (in a stack buffer of C doubles,
one row at a time, in row order: deterministic); the normalization is (x - mean) * scale + beta with
three roundings and no fused multiply-add, so it matches the NumPy backend bit for bit given the same
statistics.

Signatures (n = runtime batch size; `shape` is the compile-time shape, None first for the batch):
    batch_norm(ptr x, ptr gamma, ptr beta, ptr mean, ptr var, ptr out, i64 n)
    batch_norm_train(ptr x, ptr gamma, ptr beta, ptr out, ptr batch_mean, ptr batch_var, i64 n)
    batch_norm_train_grad(ptr x, ptr dy, ptr gamma, ptr mean, ptr var, ptr dx, ptr dgamma, ptr dbeta, i64 n)
    batch_norm_scale(ptr gamma, ptr var, ptr out, i64 n)
    rsqrt(ptr x, ptr out, i64 n)
"""
from __future__ import annotations

import math

from llvmlite import ir

from .builder import F32, F64, KernelBuilder, Strip
from .elementwise import check_shape, emit_map, numel


def _check(kernel: str, shape, epsilon) -> tuple:
    shape = check_shape(kernel, "shape", shape)
    if len(shape) < 2 or shape[-1] is None:
        raise ValueError(f"{kernel}: shape must have rank >= 2 with a static channel axis last, got {shape!r}")
    if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"{kernel}: epsilon must be a finite number > 0, got {epsilon!r}")
    return shape, shape[-1]


class ChannelKernel:
    """A KernelBuilder plus the per-channel loops of the batch-norm family."""

    def __init__(self, kb: KernelBuilder, shape):
        self.kb, self.c = kb, shape[-1]
        self.rows = numel(kb, shape[:-1])
        # accumulators are read and written as whole vectors, also by the masked partial strip at the end
        # of the channels: pad them to a whole number of vectors so those lanes stay inside the buffer
        self.c_padded = -(-self.c // kb.lanes) * kb.lanes

    def scratch(self, ty=F32) -> ir.Value:
        """A buffer of C values of type ty (f32 or f64), padded to whole vectors, carved from the kernel's
        scratch argument (as every kernel's buffers: never the stack, whose size the caller cannot know)."""
        return self.kb.scratch(self.c_padded * (2 if ty == F64 else 1))

    def channels(self, body) -> None:
        """body(strip) over the C channels once."""
        self.kb.strips(self.c, lambda s, acc: body(s) or [])

    def rows_of_channels(self, body) -> None:
        """body(strip, row_offset) for every row of C channels (row_offset = row * C)."""
        kb = self.kb
        with kb.for_range(self.rows, name="row") as lr:
            base = kb.mul(lr.index, self.c)
            kb.strips(self.c, lambda s, acc: body(s, base) or [])

    def count(self) -> ir.Value:
        """max(rows, 1) as a double: the elements per channel (a batch of 0 divides by 1)."""
        kb = self.kb
        rows = kb.i64(self.rows)
        rows = kb.b.select(kb.b.icmp_signed("<", rows, kb.i64(1)), kb.i64(1), rows)
        return kb.b.sitofp(rows, F64)

    # float64 accumulators --------------------------------------------------------------------------
    def load64(self, s: Strip, acc: ir.Value) -> ir.Value:
        ty = ir.VectorType(F64, s.lanes) if s.lanes else F64
        return self.kb.b.load(self.kb.gep(acc, s.index, F64), typ=ty, align=8)

    def store64(self, s: Strip, value: ir.Value, acc: ir.Value) -> None:
        self.kb.b.store(value, self.kb.gep(acc, s.index, F64), align=8)

    def widen(self, s: Strip, v: ir.Value) -> ir.Value:
        return self.kb.b.fpext(v, ir.VectorType(F64, s.lanes) if s.lanes else F64)

    def narrow(self, s: Strip, v: ir.Value) -> ir.Value:
        return self.kb.b.fptrunc(v, s.float_type)

    def accumulate(self, acc: ir.Value, value) -> None:
        """acc[c] += value(strip, row_offset) (a float64 value) over all rows, after zeroing acc."""
        self.kb.memset_zero(acc, 2 * self.c_padded)
        self.rows_of_channels(lambda s, base: self.store64(s, self.kb.b.fadd(self.load64(s, acc), value(s, base)), acc))

    def mean_of(self, s: Strip, acc: ir.Value, count: ir.Value) -> ir.Value:
        """float32(acc / count) for the strip's channels."""
        return self.narrow(s, self.kb.b.fdiv(self.load64(s, acc), _splat(self.kb, s, count)))

    def scale(self, s: Strip, gamma, var, epsilon) -> ir.Value:
        """gamma / sqrt(var + epsilon), float32 steps (as the NumPy kernels)."""
        b = self.kb.b
        return b.fdiv(s.load(gamma), self.kb.sqrt(b.fadd(var, s.const(epsilon))))


def _splat(kb: KernelBuilder, s: Strip, scalar: ir.Value) -> ir.Value:
    """A scalar of any type (here: the float64 count) in the strip's shape."""
    return kb.splat(scalar, s.lanes) if s.lanes else scalar


def _normalize(kb: KernelBuilder, x, mean, scale, beta):
    """(x - mean) * scale + beta with three roundings."""
    b = kb.b
    return b.fadd(b.fmul(b.fsub(x, mean), scale), beta)


def build_batch_norm(module: ir.Module, name: str, *, shape, epsilon: float, target) -> ir.Function:
    """`void name(ptr x, ptr gamma, ptr beta, ptr mean, ptr var, ptr out, i64 n)`: inference batch norm with
    given statistics. out may be x."""
    shape, _ = _check("batch_norm", shape, epsilon)
    kb = KernelBuilder(module, name, 6, target, arg_names=("x", "gamma", "beta", "mean", "var", "out"),
                       scratch_arg=True)
    x, gamma, beta, mean, var, out = kb.args
    ck = ChannelKernel(kb, shape)
    scale = ck.scratch()
    ck.channels(lambda s: s.store(ck.scale(s, gamma, s.load(var), epsilon), scale))
    ck.rows_of_channels(lambda s, base: s.store(
        _normalize(kb, s.load(x, base), s.load(mean), s.load(scale), s.load(beta)), out, base))
    return kb.finish()


def build_batch_norm_train(module: ir.Module, name: str, *, shape, epsilon: float, target) -> ir.Function:
    """`void name(ptr x, ptr gamma, ptr beta, ptr out, ptr batch_mean, ptr batch_var, i64 n)`: batch norm with
    the batch's statistics: mean = sum(x) / M, var = sum((x - mean)^2) / M (biased; sums in float64, the
    deviations x - mean rounded to float32 first). out may be x."""
    shape, _ = _check("batch_norm_train", shape, epsilon)
    kb = KernelBuilder(module, name, 6, target, arg_names=("x", "gamma", "beta", "out", "batch_mean", "batch_var"),
                       scratch_arg=True)
    x, gamma, beta, out, mean, var = kb.args
    ck = ChannelKernel(kb, shape)
    acc, scale = ck.scratch(F64), ck.scratch()
    count = ck.count()
    ck.accumulate(acc, lambda s, base: ck.widen(s, s.load(x, base)))
    ck.channels(lambda s: s.store(ck.mean_of(s, acc, count), mean))

    def square(s, base):
        d = ck.widen(s, kb.b.fsub(s.load(x, base), s.load(mean)))
        return kb.b.fmul(d, d)

    ck.accumulate(acc, square)

    def finish_channel(s):
        v = ck.mean_of(s, acc, count)
        s.store(v, var)
        s.store(ck.scale(s, gamma, v, epsilon), scale)

    ck.channels(finish_channel)
    ck.rows_of_channels(lambda s, base: s.store(
        _normalize(kb, s.load(x, base), s.load(mean), s.load(scale), s.load(beta)), out, base))
    return kb.finish()


def build_batch_norm_train_grad(module: ir.Module, name: str, *, shape, epsilon: float, target) -> ir.Function:
    """`void name(ptr x, ptr dy, ptr gamma, ptr mean, ptr var, ptr dx, ptr dgamma, ptr dbeta, i64 n)`:
    inv = 1 / sqrt(var + eps); dbeta = sum(dy); dgamma = sum(dy * (x - mean)) * inv;
    dx = gamma * inv * ((dy - dbeta / M) - (x - mean) * (sum(dy * (x - mean)) / M * inv * inv)).
    Sums in float64. dx may be dy."""
    shape, _ = _check("batch_norm_train_grad", shape, epsilon)
    kb = KernelBuilder(module, name, 8, target,
                       arg_names=("x", "dy", "gamma", "mean", "var", "dx", "dgamma", "dbeta"), scratch_arg=True)
    x, dy, gamma, mean, var, dx, dgamma, dbeta = kb.args
    b = kb.b
    ck = ChannelKernel(kb, shape)
    sum_dy, sum_dyc = ck.scratch(F64), ck.scratch(F64)
    mean_dy, mean_dyc, factor = ck.scratch(), ck.scratch(), ck.scratch()
    count = ck.count()
    ck.accumulate(sum_dy, lambda s, base: ck.widen(s, s.load(dy, base)))
    ck.accumulate(sum_dyc, lambda s, base: b.fmul(ck.widen(s, s.load(dy, base)),
                                                  ck.widen(s, b.fsub(s.load(x, base), s.load(mean)))))

    def per_channel(s):
        inv = b.fdiv(s.const(1.0), kb.sqrt(b.fadd(s.load(var), s.const(epsilon))))
        s.store(ck.narrow(s, ck.load64(s, sum_dy)), dbeta)
        s.store(b.fmul(ck.narrow(s, ck.load64(s, sum_dyc)), inv), dgamma)
        s.store(ck.mean_of(s, sum_dy, count), mean_dy)
        s.store(b.fmul(b.fmul(ck.mean_of(s, sum_dyc, count), inv), inv), mean_dyc)
        s.store(b.fmul(s.load(gamma), inv), factor)

    ck.channels(per_channel)

    def row(s, base):
        t = b.fsub(s.load(dy, base), s.load(mean_dy))
        t = b.fsub(t, b.fmul(b.fsub(s.load(x, base), s.load(mean)), s.load(mean_dyc)))
        s.store(b.fmul(t, s.load(factor)), dx, base)

    ck.rows_of_channels(row)
    return kb.finish()


def build_batch_norm_scale(module: ir.Module, name: str, *, channels: int, epsilon: float, target) -> ir.Function:
    """`void name(ptr gamma, ptr var, ptr out, i64 n)`: out = gamma / sqrt(var + epsilon), C channels."""
    _check("batch_norm_scale", (1, channels), epsilon)
    kb = KernelBuilder(module, name, 3, target, arg_names=("gamma", "var", "out"))
    gamma, var, out = kb.args
    ck = ChannelKernel(kb, (1, channels))
    ck.channels(lambda s: s.store(ck.scale(s, gamma, s.load(var), epsilon), out))
    return kb.finish()


def build_rsqrt(module: ir.Module, name: str, *, shape, target) -> ir.Function:
    """`void name(ptr x, ptr out, i64 n)`: out = 1 / sqrt(x) (sqrt, then a division). out may be x."""
    shape = check_shape("rsqrt", "shape", shape)
    kb = KernelBuilder(module, name, 2, target, arg_names=("x", "out"))
    x, out = kb.args
    emit_map(kb, shape, [out], [(x, shape)], lambda s, v, base: [kb.b.fdiv(s.const(1.0), kb.sqrt(v[0]))])
    return kb.finish()
