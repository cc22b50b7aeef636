"""Lower an ir.Graph to the Python source of one NumPy function.

The generated function reads inputs by argument, params from `P` and constants from `C`, gets every
intermediate buffer from `buf(key, shape)` (np.empty, or a view into the planned memory arena), and
calls the kernels in backends/numpy/kernels.py with `out=` buffers. One emitter per op; most ops use
the generic `K.<op>(inputs..., out, **attrs)` form.

No user text reaches the source unquoted: variables come from a name table (`v<index>_<ascii>`, see
py_name), names and attribute values appear only as Python literals made by py_literal (repr of str,
int, bool, None, which is always a literal; `float('nan')` for non-finite floats), and comments show
names through ascii(), which has no line breaks.
"""
from __future__ import annotations

import math

from ir.graph import Graph, Node
from ir.ops import REGISTRY, get_op, in_place_update_ops, view_ops
from ir.ops.loss import LossBase
from ir.types import ascii_identifier

from . import kernels as K

# attributes the kernels do not take (they are implied by the output buffer's shape)
SHAPE_ONLY_ATTRS = {"input_shape", "kernel_hw", "kernel_shape", "shape"}
# ops whose output is a view of their input (no buffer, no copy)
VIEW_OPS = view_ops()
# optimizer kernels write their state inputs in place and stand for their outputs
INPLACE_UPDATE_OPS = in_place_update_ops()
LOSS_OPS = frozenset(n for n, o in REGISTRY.items() if isinstance(o, LossBase))


def py_name(name: str, taken: set) -> str:
    """A fresh Python variable for an IR value name: `v<k>_<ascii part>`, unique by its index `k` (so
    names that Python would read as one after NFKC normalisation, like 'x' and 'ｘ', stay two)."""
    var = f"v{len(taken)}_{ascii_identifier(name, 32)}"
    taken.add(var)
    return var


def py_literal(value) -> str:
    """Python source that evaluates to `value` (an attribute: None, bool, int, float, str, or tuples,
    lists and str-keyed dicts of them). repr() of the exact built-in types is a literal; non-finite
    floats, which repr() would print as the bare names nan/inf, become float('nan') etc."""
    t = type(value)
    if value is None or t in (bool, int, str):
        return t.__repr__(value)
    if t is float:
        if math.isfinite(value):
            return float.__repr__(value)
        return "float('nan')" if math.isnan(value) else "float('inf')" if value > 0 else "-float('inf')"
    if t in (tuple, list):
        items = ", ".join(py_literal(v) for v in value)
        return f"({items}{',' if len(value) == 1 else ''})" if t is tuple else f"[{items}]"
    if t is dict:
        return "{" + ", ".join(f"{py_literal(k)}: {py_literal(v)}" for k, v in value.items()) + "}"
    if t.__module__ == "numpy" and getattr(value, "ndim", None) == 0:   # a NumPy scalar an op left as is
        item = value.item()
        if type(item) in (bool, int, float):
            return py_literal(item)
    raise ValueError(f"numpy backend: cannot emit an attribute value of type {t.__name__}: {value!r:.60}")


def _comment(name: str) -> str:
    """`name` for a # comment: ASCII with backslash escapes, never a line break."""
    return ascii(name)[1:-1]


def standalone_kernel_source() -> str:
    """The NumPy kernels as one self-contained source text (imports only math and numpy), as pasted into
    standalone modules: backends/numpy/kernels.py with its one package import, the activation table's
    NumPy math (ir/ops/activation_math.py), replaced by that file's text."""
    from ir.ops import activation_math

    from . import kernels
    with open(kernels.__file__) as f:
        source = f.read()
    with open(activation_math.__file__) as f:
        math_source = f.read()
    if kernels.ACTIVATION_MATH_IMPORT not in source:
        raise RuntimeError("backends/numpy/kernels.py lost its activation_math import line")
    return source.replace(kernels.ACTIVATION_MATH_IMPORT, math_source, 1)


def _shape_expr(v) -> str:
    dims = ["N" if d is None else str(d) for d in v.shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _kw(attrs) -> str:
    # keys are the op registry's attribute names (Op.check refuses any other), values literals
    return ", ".join(f"{k}={py_literal(v)}" for k, v in sorted(attrs.items()) if k not in SHAPE_ONLY_ATTRS)


def emit_generic(node: Node, ins, outs, optional_none=0):
    args = ", ".join(list(ins) + ["None"] * optional_none + list(outs))      # every output buffer
    kw = _kw(node.attrs)
    return [f"K.{node.op}({args}{', ' + kw if kw else ''})"]


def emit_view(node, ins, outs):
    return [f"{outs[0]} = {ins[0]}.reshape({_shape_expr(node.outputs[0])})"]


def emit_with_bias(node, ins, outs):            # conv2d / dense: bias is optional
    if len(ins) > 3:                            # conv2d's residual operand: by keyword
        line, = emit_generic(node, ins[:3], outs)
        return [line[:-1] + f", residual={ins[3]})"]
    return emit_generic(node, ins, outs, optional_none=3 - len(ins))


def emit_dropout(node, ins, outs):
    step = f"int({ins[1]})" if len(ins) > 1 else "0"
    kw = _kw(node.attrs)
    return [f"K.{node.op}({ins[0]}, {outs[0]}, step={step}, {kw})"]


def emit_neg(node, ins, outs):
    return [f"np.negative({ins[0]}, out={outs[0]})"]


def emit_scale(node, ins, outs):
    return [f"np.multiply({ins[0]}, {py_literal(node.attrs['factor'])}, out={outs[0]})"]


def emit_update(node, ins, outs):
    """Optimizer kernels take their operands by name (the op's operand_names: slots vary with the
    settings) and update them in place; the outputs are those same arrays."""
    names = get_op(node.op).operand_names(node.attrs)
    args = ", ".join(f"{n}={v}" for n, v in zip(names, ins))
    kw = _kw(node.attrs)
    lines = [f"K.{node.op}({args}{', ' + kw if kw else ''})"]
    for o, i in zip(outs, INPLACE_UPDATE_OPS[node.op]):
        lines.append(f"{o} = {ins[i]}")
    return lines


def emit_slice(node, ins, outs):
    return [f"K.slice_axis({ins[0]}, {outs[0]}, {_kw(node.attrs)})"]


def emit_loss(node, ins, outs):
    """Loss kernels take the optional per-sample weight by keyword (after `out`)."""
    n_fixed = get_op(node.op).n_fixed
    kw = _kw(node.attrs)
    weight = f", weight={ins[n_fixed]}" if len(ins) > n_fixed else ""
    return [f"K.{node.op}({', '.join(ins[:n_fixed] + [outs[0]])}{weight}{', ' + kw if kw else ''})"]


EMITTERS = {
    "slice": emit_slice,
    "reshape": emit_view, "flatten": emit_view,
    "conv2d": emit_with_bias, "conv2d_max_pool": emit_with_bias, "dense": emit_with_bias, "depthwise_conv2d": emit_with_bias,
    "conv2d_q": emit_with_bias, "dense_q": emit_with_bias,
    "dropout": emit_dropout, "dropout_grad": emit_dropout,
    # augmentation: the same (x, out, step=) call form as dropout
    "random_flip": emit_dropout, "random_translation": emit_dropout, "random_translation_grad": emit_dropout,
    "neg": emit_neg, "scale": emit_scale,
    **{op: emit_update for op in INPLACE_UPDATE_OPS},
    **{op: emit_loss for op in LOSS_OPS},
}


class MissingKernelError(NotImplementedError):
    """The NumPy backend has no kernel for an op (raised when generating code, not at the first call)."""


def has_kernel(op: str) -> bool:
    """True when this backend can run `op`: a special emitter here or a same-named kernel in kernels.py."""
    return op in EMITTERS or callable(getattr(K, op, None))


def generate_source(g: Graph, fn_name: str | None = None) -> tuple[str, str, dict]:
    """Return (source, function name, value name -> python variable) for graph g."""
    taken = set()           # generated variables; none can clash with np, K, P, C, buf, N or gc_*
    fn_name = "gc_" + ascii_identifier(fn_name or g.name, 32)
    var = {}
    for v in g.inputs:
        var[v.name] = py_name(v.name, taken)
    for v in g.params:
        var[v.name] = f"P[{py_literal(v.name)}]"
    for v in g.const_values:
        var[v.name] = f"C[{py_literal(v.name)}]"
    last_use = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            last_use[v.name] = i
    batch_src = next((v for v in g.inputs if v.type.batched), None)
    args = ", ".join([var[v.name] for v in g.inputs] + ["P", "C", "buf"])
    lines = [f"def {fn_name}({args}):",
             "    " + py_literal(f"Generated by graphcnn from graph {g.name!r}: {len(g.nodes)} nodes.")]
    if batch_src is not None:
        lines.append(f"    N = {var[batch_src.name]}.shape[0]")
    for i, n in enumerate(g.nodes):
        if not has_kernel(n.op):
            raise MissingKernelError(f"NumPy backend: no kernel for op {n.op!r} (node %{n.name})")
        if n.op in INPLACE_UPDATE_OPS:
            for _, idx in zip(n.outputs, INPLACE_UPDATE_OPS[n.op]):
                src = n.inputs[idx]
                if last_use.get(src.name, -1) > i or src.kind != "param":
                    raise ValueError(f"numpy backend: {n.op} -> %{n.name} updates %{src.name} in place, "
                                     f"but it is not a param dead after the update")
        ins = [var[v.name] for v in n.inputs]
        outs = [py_name(v.name, taken) for v in n.outputs]
        for v, o in zip(n.outputs, outs):
            var[v.name] = o
        lines.append(f"    # {n.op}: {', '.join('%' + _comment(v.name) for v in n.inputs)} -> "
                     f"{', '.join('%' + _comment(v.name) + ': ' + str(v.type) for v in n.outputs)}")
        if n.op not in VIEW_OPS and n.op not in INPLACE_UPDATE_OPS:
            for v, o in zip(n.outputs, outs):
                lines.append(f"    {o} = buf({py_literal(v.name)}, {_shape_expr(v)})")
        for line in EMITTERS.get(n.op, emit_generic)(n, ins, outs):
            lines.append("    " + line)
    for k, v in g.updates.items():
        if var[v.name] != var[k]:
            lines.append(f"    np.copyto({var[k]}, {var[v.name]})")
    rets = [var[v.name] for v in g.outputs]
    lines.append(f"    return ({', '.join(rets)}{',' if len(rets) == 1 else ''})")
    return "\n".join(lines) + "\n", fn_name, var
