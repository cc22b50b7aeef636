"""Optimizer update ops. Pure in the IR (they return new state); the training graph's `updates`
map writes the new values back into the params, which the memory planner does in place."""
from __future__ import annotations

from ..types import IRError
from . import REQUIRED, Op, register


class UpdateBase(Op):
    differentiable = False

    def normalize(self, types, attrs):
        w = types[0]
        for name, t in zip(self.inputs[1:], types[1:]):
            if name == "t":
                if t.shape != ():
                    raise IRError(f"{self.name}: step counter must be a scalar, got {t}")
            elif t != w:
                raise IRError(f"{self.name}: {name} {t} must match the weight {w}")
        return {k: (bool(v) if isinstance(v, bool) else float(v)) for k, v in attrs.items()}

    def flops(self, node, batch):
        return self.flops_per_elem * node.inputs[0].type.numel(batch)


@register
class SGDUpdate(UpdateBase):
    """(w, g[, velocity]) -> (w'[, velocity']). Keras SGD with momentum / Nesterov."""
    name = "sgd_update"
    inputs = ("w", "g", "velocity?")
    attrs = {"lr": REQUIRED, "momentum": 0.0, "nesterov": False}
    flops_per_elem = 4
    writes_inputs = (0, 2)

    def normalize(self, types, attrs):
        a = super().normalize(types, attrs)
        if a["momentum"] != 0.0 and len(types) < 3:
            raise IRError("sgd_update: momentum != 0 needs a velocity input")
        a["nesterov"] = bool(attrs["nesterov"])
        return a

    def infer(self, types, attrs):
        return [types[0]] * (len(types) - 1)


@register
class AdamUpdate(UpdateBase):
    """(w, g, m, v, t) -> (w', m', v'). Keras 3 Adam; t is the step number after increment."""
    name = "adam_update"
    inputs = ("w", "g", "m", "v", "t")
    attrs = {"lr": REQUIRED, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
    flops_per_elem = 12
    writes_inputs = (0, 2, 3)

    def infer(self, types, attrs):
        return [types[0]] * 3
