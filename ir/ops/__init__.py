"""The op registry: one class per op holding its attribute validation, shape rule, gradient rule and
cost, side by side. Backends implement ops by name; `get_op` is the single lookup.

Op families live in sibling modules (nn: conv/pool/dense, elementwise, loss, optim); importing this
package registers them all.
"""
from __future__ import annotations

from ..types import IRError, TensorType
from . import activations

REGISTRY: dict[str, "Op"] = {}
ACTIVATIONS = activations.NAMES       # the activation table's names (ir/ops/activations.py)


def register(cls):
    """Class decorator: instantiate the op and add it to the registry under cls.name."""
    inst = cls()
    if inst.name in REGISTRY:
        raise IRError(f"op {inst.name!r} registered twice")
    REGISTRY[inst.name] = inst
    return cls


def get_op(name: str) -> "Op":
    try:
        return REGISTRY[name]
    except KeyError:
        raise IRError(f"unknown op {name!r}") from None


def _canon(x):
    """Attributes are stored canonically (tuples, plain ints/floats/str) so text/JSON round-trip."""
    if isinstance(x, (list, tuple)):
        return tuple(_canon(i) for i in x)
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return x.item()
    return x


class Op:
    """Base class. Subclasses set name/inputs/attrs and override infer (and grad, flops, normalize)."""
    name = ""
    inputs: tuple = ()          # input names; a trailing '?' marks an optional input
    attrs: dict = {}            # attribute name -> default (REQUIRED for no default)
    inplace: int | None = None  # index of an input whose buffer the output may reuse (elementwise)
    view = False                # output is the input reinterpreted (reshape): no buffer, no copy
    writes_inputs: tuple = ()   # output k IS input writes_inputs[k], updated in place (optimizers)
    differentiable = True
    batch_mean = False          # output is the batch mean of per-sample terms (a loss): see batch_coupling
    identity_in_inference = False  # training-only randomness (dropout, augmentation): drop_dropout removes it

    def check(self, ins, attrs: dict) -> dict:
        """Validate input count and attributes; return canonical, normalized attributes."""
        req = [i for i in self.inputs if not i.endswith("?")]
        if not (len(req) <= len(ins) <= len(self.inputs)):
            raise IRError(f"{self.name}: expects inputs ({', '.join(self.inputs)}), got {len(ins)}")
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRError(f"{self.name}: unknown attribute(s) {sorted(unknown)}; "
                          f"known: {sorted(self.attrs)}")
        full = {}
        for k, default in self.attrs.items():
            if k in attrs:
                full[k] = attrs[k]
            elif default is REQUIRED:
                raise IRError(f"{self.name}: missing required attribute {k!r}")
            else:
                full[k] = default
        full = self.normalize([v.type for v in ins], full)
        return {k: _canon(v) for k, v in full.items()}

    def normalize(self, types, attrs):
        return attrs

    def infer(self, types, attrs) -> list[TensorType]:
        raise NotImplementedError

    def inplace_inputs(self) -> tuple:
        """Indices of the inputs whose buffer output 0 may reuse (the memory planner takes the first
        that dies here with the same size): `inplace`, or more for commutative-safe ops like add."""
        return () if self.inplace is None else (self.inplace,)

    def infer_types(self, ins, attrs):
        return self.infer([v.type for v in ins], attrs)

    def grad(self, node, douts):
        """Return one gradient Value (or None) per input, given output gradients (None = zero)."""
        if not self.differentiable:
            return [None] * len(node.inputs)
        raise IRError(f"op {self.name!r} has no gradient rule")

    def couples_batch(self, node) -> bool:
        """True when one sample's output depends on other samples of the batch (a reduction over the
        batch axis, a batch statistic, a mean over the batch or a division by its size). Default False:
        the op maps each sample on its own. ir/passes/batch_coupling.py reads this to decide whether a
        batch may be split across threads; an op that drops the batch axis is treated as coupling
        whatever it answers here."""
        return False

    def flops(self, node, batch: int) -> int:
        """Floating-point operations for one call at this batch size (default: one per output element)."""
        return sum(v.type.numel(batch) for v in node.outputs)

    def bytes(self, node, batch: int) -> int:
        """Bytes read and written (a lower bound: each input and output touched once)."""
        return sum(v.type.nbytes(batch) for v in node.inputs + node.outputs)


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()


def view_ops() -> frozenset:
    """Ops whose output aliases their input (backends emit no copy)."""
    return frozenset(n for n, o in REGISTRY.items() if o.view)


def in_place_update_ops() -> dict:
    """op -> tuple: output k overwrites input tuple[k] (optimizer state updates)."""
    return {n: o.writes_inputs for n, o in REGISTRY.items() if o.writes_inputs}


def emit(op: str, *inputs, **attrs):
    """Add an `op` node to the inputs' graph; return its output value (or a tuple of them)."""
    vals = [v for v in inputs if v is not None]
    if not vals:
        raise IRError(f"{op}: needs at least one input value")
    graph = vals[0].graph
    outs = graph.add_node(op, vals, attrs)
    return outs[0] if len(outs) == 1 else tuple(outs)


def pair(x, what: str, op: str) -> tuple:
    """1 -> (1, 1); (a, b) -> (a, b); anything else is an error naming op and attribute."""
    if isinstance(x, (int,)) and not isinstance(x, bool):
        x = (x, x)
    try:
        a, b = x
        a, b = int(a), int(b)
    except (TypeError, ValueError):
        raise IRError(f"{op}: {what} must be an int or a pair of ints, got {x!r}") from None
    if a < 1 or b < 1:
        raise IRError(f"{op}: {what} must be >= 1, got {x!r}")
    return (a, b)


def check_activation(act, params, op) -> tuple:
    """(name, canonical parameters) of a fused activation, validated against the activation table."""
    return activations.resolve(act, params, op)


from . import elementwise, nn, norm, loss, optim, augment, quant  # noqa: E402,F401  (registers the ops)
