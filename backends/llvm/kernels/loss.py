"""Loss kernels of the LLVM backend and their gradients (Keras semantics, as backends/numpy/kernels.py).

Forward kernels write one float32, sum_i weight_i * loss_i / n (Keras' "sum_over_batch_size"; without a
weight operand the mean), to `out`; per-row losses are summed in float64 in row order (deterministic) and
divided by n. Gradient kernels write d loss / d p * dloss, with the scale float32(dloss / max(1, n)) computed
in float64 like the NumPy kernel, times weight_i on row i.

has_weight=True adds the per-sample weight operand `ptr weight` (n float32) just before `out`.

Signatures (p (n, K) float32; n = runtime batch size):
    sparse_categorical_crossentropy(ptr p, ptr labels, ptr out, i64 n)
    sparse_categorical_crossentropy_grad(ptr p, ptr labels, ptr dloss, ptr out, i64 n)
    categorical_crossentropy(ptr p, ptr y, ptr out, i64 n)          y (n, K) one-hot or soft targets
    categorical_crossentropy_grad(ptr p, ptr y, ptr dloss, ptr out, i64 n)
    binary_crossentropy(ptr p, ptr y, ptr out, i64 n)               per sample: mean over the K elements
    binary_crossentropy_grad(ptr p, ptr y, ptr dloss, ptr out, i64 n)
    mse(ptr p, ptr y, ptr out, i64 n)                               mean over ALL elements
    mse_grad(ptr p, ptr y, ptr dloss, ptr out, i64 n)

Sparse labels are float32 holding integer class ids (the graph stores every tensor as float32). The caller
validates them; the kernel only guarantees memory safety: a label is clamped into [0, K-1] (NaN -> K-1)
before it is used as an index, so a bad label gives a wrong loss, never an out-of-bounds access.
With n == 0 the forward kernels write NaN (0/0, like numpy.mean of nothing) and gradients write nothing.
"""
from __future__ import annotations

from llvmlite import ir

from .builder import F32, F64, I64, REASSOC, KernelBuilder, Strip
from .elementwise import check_shape, numel

# Keras' epsilon for probabilities: q = clip(p, EPS, 1 - EPS), both rounded to float32.
PROB_EPSILON = 1e-7


def _check_classes(kernel: str, num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{kernel}: num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _check_bool(kernel: str, what: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{kernel}: {what} must be a bool, got {value!r}")
    return value


class _Rows:
    """Helpers for kernels that walk the n rows of a (n, K) matrix."""

    def __init__(self, kb: KernelBuilder, k: int):
        self.kb, self.b, self.k = kb, kb.b, k

    def reduce(self, init: float, combine, lane_reduce, value) -> ir.Value:
        total, = self.kb.strips(self.k, lambda s, acc: [combine(acc[0], value(s))], inits=[self.kb.const(init)],
                                lane_reduce=[lane_reduce])
        return total

    def fsum(self, value) -> ir.Value:
        return self.reduce(0.0, lambda a, v: self.b.fadd(a, v, flags=REASSOC), self.kb.hsum, value)

    def fmax(self, value) -> ir.Value:
        b = self.b
        return self.reduce(float("-inf"), lambda a, v: b.select(b.fcmp_ordered(">", v, a), v, a), self.kb.hmax, value)

    def each(self, body) -> None:
        self.kb.strips(self.k, lambda s, acc: body(s) or [])

    def clip(self, s: Strip, p: ir.Value) -> ir.Value:
        """clip(p, 1e-7, 1 - 1e-7) in float32 (NaN stays NaN, like np.clip)."""
        b = self.b
        lo, hi = s.const(PROB_EPSILON), s.const(1 - PROB_EPSILON)
        p = b.select(b.fcmp_ordered("<", p, lo), lo, p)
        return b.select(b.fcmp_ordered(">", p, hi), hi, p)

    def inside(self, s: Strip, p: ir.Value) -> ir.Value:
        """1.0 where 1e-7 < p < 1 - 1e-7 (the clip passes gradient), else 0.0."""
        b = self.b
        ok = b.and_(b.fcmp_ordered(">", p, s.const(PROB_EPSILON)), b.fcmp_ordered("<", p, s.const(1 - PROB_EPSILON)))
        return b.select(ok, s.const(1.0), s.const(0.0))

    def label(self, labels: ir.Value, row: ir.Value) -> ir.Value:
        """The row's class id as i64, clamped into [0, K-1] (NaN -> K-1) so it is always a safe index."""
        b, kb = self.b, self.kb
        v = kb.load(labels, row)
        v = kb.maxnum(kb.minnum(v, kb.const(self.k - 1)), kb.const(0.0))
        return b.fptosi(v, I64)


def _mean_over_batch(kb: KernelBuilder, total: ir.Value, count: ir.Value, out: ir.Value) -> None:
    """out[0] = float32(total / count), total a float64 sum."""
    b = kb.b
    kb.store(b.fptrunc(b.fdiv(total, b.sitofp(kb.i64(count), F64)), F32), out)


def _grad_scale(kb: KernelBuilder, dloss: ir.Value, count) -> ir.Value:
    """float32(dloss / max(1, count)) computed in float64, like the NumPy kernel."""
    b = kb.b
    c = kb.i64(count)
    c = b.select(b.icmp_signed("<", c, kb.i64(1)), kb.i64(1), c)
    return b.fptrunc(b.fdiv(b.fpext(kb.load(dloss), F64), b.sitofp(c, F64)), F32)


def _row_scale(kb: KernelBuilder, scale: ir.Value, weight, row) -> ir.Value:
    """The gradient scale of one row: scale, times weight[row] when there is a weight operand."""
    return scale if weight is None else kb.b.fmul(kb.load(weight, row), scale)


def _row_loop(kb: KernelBuilder, body, accumulate: bool, weight=None):
    """for i in range(n): body(i) -> per-row loss (float32), summed in float64 (times weight[i] in float64
    when there is a weight operand) when accumulate."""
    b = kb.b
    with kb.for_range(kb.n, name="row") as lr:
        acc = lr.carry(ir.Constant(F64, 0.0), name="total") if accumulate else None
        v = body(lr.index)
        if accumulate:
            v = b.fpext(v, F64)
            if weight is not None:
                v = b.fmul(v, b.fpext(kb.load(weight, lr.index), F64))
            lr.next(acc, b.fadd(acc, v))
    return lr.result(acc) if accumulate else None


def _new_loss_kernel(module, name, target, names, has_weight) -> tuple:
    """(KernelBuilder, {operand name: pointer}, weight pointer or None) for a loss kernel with operands
    `names` (the last is `out`) and, when has_weight, `weight` just before out."""
    names = list(names)
    if _check_bool(name, "has_weight", has_weight):
        names.insert(len(names) - 1, "weight")
    kb = KernelBuilder(module, name, len(names), target, arg_names=names)
    args = dict(zip(names, kb.args))
    return kb, args, args.get("weight")


def _softmax_parts(rows: _Rows, p_row) -> tuple[ir.Value, ir.Value]:
    """(max, sum(exp(p - max))) of one row."""
    b, kb = rows.b, rows.kb
    peak = rows.fmax(lambda s: s.load(p_row))
    total = rows.fsum(lambda s: kb.exp(b.fsub(s.load(p_row), s.broadcast(peak))))
    return peak, total


# ------------------------------------------------------------------------------------------------------
# sparse categorical crossentropy

def build_sparse_categorical_crossentropy(module: ir.Module, name: str, *, num_classes: int, from_logits=False,
                                          has_weight=False, target) -> ir.Function:
    """`void name(ptr p, ptr labels[, ptr weight], ptr out, i64 n)`: out = weighted mean of
    logsumexp(p_i) - p_i[y_i] (from_logits) or log(sum_k q_ik) - log(q_i[y_i]), q = clip(p, 1e-7, 1 - 1e-7).
    labels: float32 class ids."""
    kernel = "sparse_categorical_crossentropy"
    k = _check_classes(kernel, num_classes)
    from_logits = _check_bool(kernel, "from_logits", from_logits)
    kb, a, weight = _new_loss_kernel(module, name, target, ("p", "labels", "out"), has_weight)
    p, labels, out = a["p"], a["labels"], a["out"]
    rows, b = _Rows(kb, k), kb.b

    def row(i):
        p_row = kb.gep(p, kb.mul(i, k))
        y = rows.label(labels, i)
        if from_logits:
            peak, total = _softmax_parts(rows, p_row)
            return b.fsub(b.fadd(kb.log(total), peak), kb.load(p_row, y))
        total = rows.fsum(lambda s: rows.clip(s, s.load(p_row)))
        q_y = rows.clip(Strip(kb, y, None), kb.load(p_row, y))
        return b.fsub(kb.log(total), kb.log(q_y))

    _mean_over_batch(kb, _row_loop(kb, row, True, weight), kb.n, out)
    return kb.finish()


def build_sparse_categorical_crossentropy_grad(module: ir.Module, name: str, *, num_classes: int, from_logits=False,
                                               has_weight=False, target) -> ir.Function:
    """`void name(ptr p, ptr labels, ptr dloss[, ptr weight], ptr out, i64 n)`: out (n, K) = d loss / d p * dloss.
    from_logits: (softmax(p) - onehot(y)) * scale; probabilities: (1/sum_k q_k - [k == y]/q_y) where
    1e-7 < p < 1 - 1e-7, else 0, times scale; scale = dloss / n (* weight_i)."""
    kernel = "sparse_categorical_crossentropy_grad"
    k = _check_classes(kernel, num_classes)
    from_logits = _check_bool(kernel, "from_logits", from_logits)
    kb, a, weight = _new_loss_kernel(module, name, target, ("p", "labels", "dloss", "out"),
                                     has_weight)
    p, labels, out = a["p"], a["labels"], a["out"]
    rows, b = _Rows(kb, k), kb.b
    scale = _grad_scale(kb, a["dloss"], kb.n)

    def row(i):
        p_row, o_row = kb.gep(p, kb.mul(i, k)), kb.gep(out, kb.mul(i, k))
        y = rows.label(labels, i)
        rs = _row_scale(kb, scale, weight, i)
        if from_logits:
            peak, total = _softmax_parts(rows, p_row)
            rows.each(lambda s: s.store(b.fdiv(kb.exp(b.fsub(s.load(p_row), s.broadcast(peak))), s.broadcast(total)),
                                        o_row))
            kb.store(b.fsub(kb.load(o_row, y), kb.const(1.0)), o_row, y)
            rows.each(lambda s: s.store(b.fmul(s.load(o_row), s.broadcast(rs)), o_row))
            return
        total = rows.fsum(lambda s: rows.clip(s, s.load(p_row)))
        inv_total = b.fdiv(kb.const(1.0), total)
        rows.each(lambda s: s.store(s.broadcast(inv_total), o_row))
        scalar = Strip(kb, y, None)
        q_y = rows.clip(scalar, kb.load(p_row, y))
        kb.store(b.fsub(kb.load(o_row, y), b.fdiv(kb.const(1.0), q_y)), o_row, y)
        rows.each(lambda s: s.store(
            b.fmul(b.fmul(s.load(o_row), rows.inside(s, s.load(p_row))), s.broadcast(rs)), o_row))
        return

    _row_loop(kb, row, False)
    return kb.finish()


# ------------------------------------------------------------------------------------------------------
# categorical crossentropy (dense, possibly soft targets)

def build_categorical_crossentropy(module: ir.Module, name: str, *, num_classes: int, from_logits=False,
                                   has_weight=False, target) -> ir.Function:
    """`void name(ptr p, ptr y[, ptr weight], ptr out, i64 n)`: out = weighted mean of -sum_k y_ik log q_ik,
    q = softmax(p) (from_logits) or clip(p, 1e-7, 1 - 1e-7) normalized to sum 1."""
    kernel = "categorical_crossentropy"
    k = _check_classes(kernel, num_classes)
    from_logits = _check_bool(kernel, "from_logits", from_logits)
    kb, a, weight = _new_loss_kernel(module, name, target, ("p", "y", "out"), has_weight)
    p, yt, out = a["p"], a["y"], a["out"]
    rows, b = _Rows(kb, k), kb.b

    def row(i):
        p_row, y_row = kb.gep(p, kb.mul(i, k)), kb.gep(yt, kb.mul(i, k))
        if from_logits:
            peak, total = _softmax_parts(rows, p_row)
            lse = kb.log(total)

            def log_q(s):
                return b.fsub(b.fsub(s.load(p_row), s.broadcast(peak)), s.broadcast(lse))
        else:
            total = rows.fsum(lambda s: rows.clip(s, s.load(p_row)))
            log_total = kb.log(total)

            def log_q(s):
                return b.fsub(kb.log(rows.clip(s, s.load(p_row))), s.broadcast(log_total))
        cross = rows.fsum(lambda s: b.fmul(log_q(s), s.load(y_row)))
        return b.fneg(cross)

    _mean_over_batch(kb, _row_loop(kb, row, True, weight), kb.n, out)
    return kb.finish()


def build_categorical_crossentropy_grad(module: ir.Module, name: str, *, num_classes: int, from_logits=False,
                                        has_weight=False, target) -> ir.Function:
    """`void name(ptr p, ptr y, ptr dloss[, ptr weight], ptr out, i64 n)`: out = d loss / d p * dloss.
    from_logits: softmax(p) * sum_k y_k - y; probabilities: (sum_k y_k / sum_j q_j - y / q) where
    1e-7 < p < 1 - 1e-7, else 0; both times scale = dloss / n (* weight_i)."""
    kernel = "categorical_crossentropy_grad"
    k = _check_classes(kernel, num_classes)
    from_logits = _check_bool(kernel, "from_logits", from_logits)
    kb, a, weight = _new_loss_kernel(module, name, target, ("p", "y", "dloss", "out"),
                                     has_weight)
    p, yt, out = a["p"], a["y"], a["out"]
    rows, b = _Rows(kb, k), kb.b
    scale = _grad_scale(kb, a["dloss"], kb.n)

    def row(i):
        p_row, y_row, o_row = (kb.gep(x, kb.mul(i, k)) for x in (p, yt, out))
        rs = _row_scale(kb, scale, weight, i)
        y_total = rows.fsum(lambda s: s.load(y_row))
        if from_logits:
            peak, total = _softmax_parts(rows, p_row)

            def grad(s):
                soft = b.fdiv(kb.exp(b.fsub(s.load(p_row), s.broadcast(peak))), s.broadcast(total))
                return b.fsub(b.fmul(soft, s.broadcast(y_total)), s.load(y_row))
        else:
            total = rows.fsum(lambda s: rows.clip(s, s.load(p_row)))
            spread = b.fdiv(y_total, total)

            def grad(s):
                pv = s.load(p_row)
                g = b.fsub(s.broadcast(spread), b.fdiv(s.load(y_row), rows.clip(s, pv)))
                return b.fmul(g, rows.inside(s, pv))
        rows.each(lambda s: s.store(b.fmul(grad(s), s.broadcast(rs)), o_row))

    _row_loop(kb, row, False)
    return kb.finish()


# ------------------------------------------------------------------------------------------------------
# binary crossentropy (element-wise, per sample the mean over the last axis)

def _log1p_small(kb: KernelBuilder, e: ir.Value) -> ir.Value:
    """log(1 + e) for e in [0, 1], accurate also for tiny e: log(u) * e / (u - 1), u = 1 + e (Goldberg's
    trick: the rounding of u cancels), and e itself where u rounds to 1."""
    b = kb.b
    u = b.fadd(e, kb.const(1.0, like=e))
    one = b.fcmp_ordered("==", u, kb.const(1.0, like=e))
    return b.select(one, e, b.fmul(kb.log(u), b.fdiv(e, b.fsub(u, kb.const(1.0, like=e)))))


def build_binary_crossentropy(module: ir.Module, name: str, *, num_classes: int, from_logits=False,
                              has_weight=False, target) -> ir.Function:
    """`void name(ptr p, ptr y[, ptr weight], ptr out, i64 n)`: out = weighted mean over samples of
    mean_k -(y log q + (1 - y) log(1 - q)), q = clip(p, 1e-7, 1 - 1e-7); from_logits: per element
    max(z, 0) - z y + log(1 + exp(-|z|)). num_classes = K, the last axis' length."""
    kernel = "binary_crossentropy"
    k = _check_classes(kernel, num_classes)
    from_logits = _check_bool(kernel, "from_logits", from_logits)
    kb, a, weight = _new_loss_kernel(module, name, target, ("p", "y", "out"), has_weight)
    p, yt, out = a["p"], a["y"], a["out"]
    rows, b = _Rows(kb, k), kb.b

    def element(s, p_row, y_row):
        z, y = s.load(p_row), s.load(y_row)
        if from_logits:
            softplus = _log1p_small(kb, kb.exp(b.fneg(kb.fabs(z))))
            return b.fadd(b.fsub(kb.relu(z), b.fmul(z, y)), softplus)
        q = rows.clip(s, z)
        both = b.fadd(b.fmul(y, kb.log(q)), b.fmul(b.fsub(s.const(1.0), y), kb.log(b.fsub(s.const(1.0), q))))
        return b.fneg(both)

    def row(i):
        p_row, y_row = kb.gep(p, kb.mul(i, k)), kb.gep(yt, kb.mul(i, k))
        return b.fdiv(rows.fsum(lambda s: element(s, p_row, y_row)), kb.const(float(k)))

    _mean_over_batch(kb, _row_loop(kb, row, True, weight), kb.n, out)
    return kb.finish()


def build_binary_crossentropy_grad(module: ir.Module, name: str, *, num_classes: int, from_logits=False,
                                   has_weight=False, target) -> ir.Function:
    """`void name(ptr p, ptr y, ptr dloss[, ptr weight], ptr out, i64 n)`: out = (sigmoid(p) - y) (from_logits)
    or (1 - y) / (1 - q) - y / q where 1e-7 < p < 1 - 1e-7, else 0; times float32(dloss / (n K)) (* weight_i)."""
    kernel = "binary_crossentropy_grad"
    k = _check_classes(kernel, num_classes)
    from_logits = _check_bool(kernel, "from_logits", from_logits)
    kb, a, weight = _new_loss_kernel(module, name, target, ("p", "y", "dloss", "out"),
                                     has_weight)
    p, yt, out = a["p"], a["y"], a["out"]
    rows, b = _Rows(kb, k), kb.b
    scale = _grad_scale(kb, a["dloss"], kb.mul(kb.n, k))

    def grad(s, p_row, y_row):
        z, y = s.load(p_row), s.load(y_row)
        if from_logits:
            return b.fsub(kb.sigmoid(z), y)
        q = rows.clip(s, z)
        g = b.fsub(b.fdiv(b.fsub(s.const(1.0), y), b.fsub(s.const(1.0), q)), b.fdiv(y, q))
        return b.fmul(g, rows.inside(s, z))

    def row(i):
        p_row, y_row, o_row = (kb.gep(x, kb.mul(i, k)) for x in (p, yt, out))
        rs = _row_scale(kb, scale, weight, i)
        rows.each(lambda s: s.store(b.fmul(grad(s, p_row, y_row), s.broadcast(rs)), o_row))

    _row_loop(kb, row, False)
    return kb.finish()


# ------------------------------------------------------------------------------------------------------
# mean squared error

def _mse_rows(kb: KernelBuilder, shape, has_weight: bool):
    """(rows, elements per row): the batch rows when the shape is batched or weighted, else one row."""
    if shape and (shape[0] is None or has_weight):
        return (kb.n if shape[0] is None else shape[0]), numel(kb, shape[1:])
    return kb.i64(1), numel(kb, shape)


def build_mse(module: ir.Module, name: str, *, shape, has_weight=False, target) -> ir.Function:
    """`void name(ptr p, ptr y[, ptr weight], ptr out, i64 n)`: out = sum_i weight_i sum_j (p - y)_ij^2 / size
    (the mean over ALL elements without a weight); shape is p's (batch None first, or fully static)."""
    shape = check_shape("mse", "shape", shape)
    has_weight = _check_bool("mse", "has_weight", has_weight)
    kb, a, weight = _new_loss_kernel(module, name, target, ("p", "y", "out"), has_weight)
    p, yt, out = a["p"], a["y"], a["out"]
    b = kb.b
    rows, per_row = _mse_rows(kb, shape, has_weight)
    with kb.for_range(rows, name="row") as lr:
        acc = lr.carry(ir.Constant(F64, 0.0), name="total")
        base = kb.mul(lr.index, per_row)

        def sq(s, carried):
            d = b.fsub(s.load(p, base), s.load(yt, base))
            return [b.fadd(carried[0], b.fmul(d, d), flags=REASSOC)]

        row_sum, = kb.strips(per_row, sq, inits=[kb.const(0.0)], lane_reduce=[kb.hsum])
        row_sum = b.fpext(row_sum, F64)
        if weight is not None:
            row_sum = b.fmul(row_sum, b.fpext(kb.load(weight, lr.index), F64))
        lr.next(acc, b.fadd(acc, row_sum))
    _mean_over_batch(kb, lr.result(acc), numel(kb, shape), out)
    return kb.finish()


def build_mse_grad(module: ir.Module, name: str, *, shape, has_weight=False, target) -> ir.Function:
    """`void name(ptr p, ptr y, ptr dloss[, ptr weight], ptr out, i64 n)`: out = (p - y) * (float32(dloss / size)
    * 2) (* weight_i on sample i), size = number of elements of p."""
    shape = check_shape("mse_grad", "shape", shape)
    has_weight = _check_bool("mse_grad", "has_weight", has_weight)
    kb, a, weight = _new_loss_kernel(module, name, target, ("p", "y", "dloss", "out"), has_weight)
    p, yt, out = a["p"], a["y"], a["out"]
    b = kb.b
    size = numel(kb, shape)
    scale = b.fmul(_grad_scale(kb, a["dloss"], size), kb.const(2.0))
    if weight is None:
        kb.strips(size, lambda s, acc: s.store(b.fmul(b.fsub(s.load(p), s.load(yt)), s.broadcast(scale)), out) or [])
        return kb.finish()
    rows, per_row = _mse_rows(kb, shape, True)
    with kb.for_range(rows, name="row") as lr:
        base = kb.mul(lr.index, per_row)
        rs = _row_scale(kb, scale, weight, lr.index)
        kb.strips(per_row, lambda s, acc: s.store(
            b.fmul(b.fsub(s.load(p, base), s.load(yt, base)), s.broadcast(rs)), out, base) or [])
    return kb.finish()
