"""Optimizer update ops. Pure in the IR (they return new state); the training graph's `updates`
map writes the new values back into the params, which the memory planner does in place.

Every update op reads (w, g, lr, [scalars], slots...) and applies, in Keras 3's order:
  1. clipnorm  (per variable): g = g * clipnorm / max(||g||_2, clipnorm)           (0 = off)
  2. weight_decay (decoupled, before the update): w = w - w * weight_decay * lr       (0 = off)
  3. the optimizer's own rule (SGD, Adam, RMSprop).
`lr` is a scalar f32 operand (the training graph's `lr` input, or a constant), so a learning-rate
schedule changes it per step without recompiling.

`check_setting` is THE validation of optimizer settings: op attributes (so both backends see the same
checked values), `ir.training.optimizer_config` and `graphcnn.optimizers` all call it."""
from __future__ import annotations

import math

from ..types import IRError
from . import Op, register

# setting -> (low, high, low excluded, high excluded); None = unbounded on that side
RANGES = {
    "lr": (0.0, None, True, False),
    "momentum": (0.0, 1.0, False, True),
    "beta_1": (0.0, 1.0, False, True),
    "beta_2": (0.0, 1.0, False, True),
    "rho": (0.0, 1.0, False, True),
    "epsilon": (0.0, None, True, False),
    "weight_decay": (0.0, None, False, False),
    "clipnorm": (0.0, None, False, False),
}
FLAGS = ("nesterov", "centered")


def check_setting(owner: str, name: str, value, label: str | None = None):
    """Validate one optimizer setting; return it as float (or bool for FLAGS).

    owner names the optimizer (or op) and label the argument as the user spelled it (default: name)
    in the IRError: finite numbers only, inside RANGES[name]."""
    label = label or name
    if name in FLAGS:
        if not isinstance(value, bool) and value not in (0, 1):
            raise IRError(f"{owner}: {label} must be True or False, got {value!r}")
        return bool(value)
    if name not in RANGES:
        raise IRError(f"{owner}: unknown setting {label!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise IRError(f"{owner}: {label} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise IRError(f"{owner}: {label} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise IRError(f"{owner}: {label} must be finite, got {v!r}")
    lo, hi, lo_open, hi_open = RANGES[name]
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi))):
        left, right = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
        interval = f"{left}{lo}, {'inf' if hi is None else hi}{right}"
        raise IRError(f"{owner}: {label} must be in {interval}, got {v!r}")
    return v


class UpdateBase(Op):
    """Operands: `w, g, lr`, then `scalars` (e.g. Adam's step t), then the state slots named by
    `slot_names(attrs)`. writes_inputs maps output k to the operand it overwrites (w, then the slots)."""
    differentiable = False
    scalars: tuple = ()
    common_attrs = {"weight_decay": 0.0, "clipnorm": 0.0}

    def slot_names(self, attrs) -> tuple:
        """Names of the per-weight state slots this op keeps for these (normalized) attributes."""
        raise NotImplementedError

    def operand_names(self, attrs) -> tuple:
        """Names of the node's operands, in order (the NumPy kernels' keyword names)."""
        return ("w", "g", "lr") + self.scalars + tuple(self.slot_names(attrs))

    def couples_batch(self, node):
        return any(v.type.batched for v in node.inputs)      # state is shared by every sample

    def normalize(self, types, attrs):
        a = {k: check_setting(self.name, k, v) for k, v in attrs.items()}
        names = self.operand_names(a)
        if len(types) != len(names):
            raise IRError(f"{self.name}: with these settings expects operands ({', '.join(names)}), "
                          f"got {len(types)}")
        w = types[0]
        for name, t in zip(names[1:], types[1:]):
            if name == "lr" or name in self.scalars:
                if t.shape != ():
                    raise IRError(f"{self.name}: {name} must be a scalar, got {t}")
            elif t != w:
                raise IRError(f"{self.name}: {name} {t} must match the weight {w}")
        return a

    def infer(self, types, attrs):
        return [types[0]] * (1 + len(self.slot_names(attrs)))

    def flops(self, node, batch):
        a = node.attrs
        extra = 3 * bool(a["clipnorm"]) + 2 * bool(a["weight_decay"])
        return (self.flops_per_elem + extra) * node.inputs[0].type.numel(batch)


@register
class SGDUpdate(UpdateBase):
    """(w, g, lr[, velocity]) -> (w'[, velocity']). Keras SGD: velocity = momentum*velocity - lr*g;
    w += velocity (nesterov: w += momentum*velocity - lr*g); without momentum w -= lr*g."""
    name = "sgd_update"
    inputs = ("w", "g", "lr", "velocity?")
    attrs = {"momentum": 0.0, "nesterov": False, **UpdateBase.common_attrs}
    flops_per_elem = 4
    writes_inputs = (0, 3)

    def slot_names(self, attrs):
        return ("velocity",) if attrs["momentum"] else ()


@register
class AdamUpdate(UpdateBase):
    """(w, g, lr, t, m, v) -> (w', m', v'). Keras 3 Adam; t is the step number after increment.
    AdamW is this op with weight_decay > 0 (Keras' AdamW is Adam plus the base class' decoupled decay)."""
    name = "adam_update"
    inputs = ("w", "g", "lr", "t", "m", "v")
    scalars = ("t",)
    attrs = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, **UpdateBase.common_attrs}
    flops_per_elem = 12
    writes_inputs = (0, 4, 5)

    def slot_names(self, attrs):
        return ("m", "v")


@register
class RMSpropUpdate(UpdateBase):
    """(w, g, lr, velocity[, momentum_buffer][, average_gradient]) -> updated (w, slots...).
    Keras 3 RMSprop: velocity = rho*velocity + (1-rho)*g^2; centered: average_gradient = rho*avg + (1-rho)*g,
    denominator = velocity - avg^2 + epsilon, else velocity + epsilon; increment = lr*g / sqrt(denominator);
    momentum > 0: buffer = momentum*buffer + increment, w -= buffer; else w -= increment.
    The slot operands present follow slot_names (the `inputs` names only give the count)."""
    name = "rmsprop_update"
    inputs = ("w", "g", "lr", "velocity", "momentum_buffer?", "average_gradient?")
    attrs = {"rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False, **UpdateBase.common_attrs}
    flops_per_elem = 10
    writes_inputs = (0, 3, 4, 5)

    def slot_names(self, attrs):
        return ("velocity",) + (("momentum_buffer",) if attrs["momentum"] else ()) + \
            (("average_gradient",) if attrs["centered"] else ())
