"""The activation table: the ONE list of activations of graphcnn.

Each entry names an activation, its parameters with defaults, its NumPy implementation (the reference the
NumPy backend runs and tests compare against) and its gradient rule. Everything else reads this table:

- `ir/ops/elementwise.py` registers each activation (except `linear`) as a unary op with that name and
  its parameters as attributes, plus `<name>_grad(y, dy)` (every gradient here is a function of the
  activation's OUTPUT y, so a fused conv2d/dense keeps only its output for the backward pass);
- conv2d / dense fuse any entry (`activation` = the name, `activation_params` = its parameters as
  `((name, value), ...)` in table order), and `ir/passes/fuse_bias_activation.py` fuses every entry;
- the NumPy backend runs `forward` / `backward` (ir/ops/activation_math.py); the LLVM backend's builder emits IR for every name
  here (tests check both cover the whole table);
- the DSL's `activation=` arguments accept these names (plus `softmax`, which is not elementwise).

NaN and inf follow NumPy/IEEE: every activation maps NaN to NaN; gradients multiply dy by the local
slope, so a NaN dy stays NaN.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

from ..types import IRError
from . import activation_math as M

Params = tuple  # ((name, value), ...) in table order


@dataclass(frozen=True)
class ActivationSpec:
    """One activation: `params` are (name, default) pairs; `forward(x, out, **params)` and
    `backward(y, dy, out, **params)` (dx = dy * slope(y), y the forward OUTPUT) are NumPy float32
    implementations writing `out` (which may alias x / dy); `flops` per element (the cost model);
    `check(params, where)` validates parameter values beyond "finite float or None"."""
    name: str
    params: tuple
    forward: Callable
    backward: Callable | None
    flops: int = 1
    check: Callable | None = None

    @property
    def grad_op(self) -> str | None:
        """Name of the gradient op (None for linear: the gradient is dy itself)."""
        return None if self.name == "linear" else f"{self.name}_grad"

    def param_names(self) -> tuple:
        return tuple(k for k, _ in self.params)

    def normalize(self, given, where: str) -> Params:
        """Canonical parameters: a ((name, value), ...) tuple in table order with defaults filled in,
        from a dict or a sequence of pairs. IRError (naming `where`) for unknown names or bad values."""
        if given is None:
            given = {}
        if not isinstance(given, dict):
            try:
                given = dict((k, v) for k, v in given)
            except (TypeError, ValueError):
                raise IRError(f"{where}: parameters of activation {self.name!r} must be a dict or "
                              f"((name, value), ...), got {given!r}") from None
        unknown = sorted(set(given) - set(self.param_names()))
        if unknown:
            known = ", ".join(self.param_names()) or "none"
            raise IRError(f"{where}: activation {self.name!r} has no parameter(s) {unknown} (it takes: {known})")
        out = []
        for k, default in self.params:
            v = given.get(k, default)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                    raise IRError(f"{where}: {self.name} parameter {k} must be a finite number"
                                  f"{' or None' if default is None else ''}, got {v!r}")
                v = float(v)
            out.append((k, v))
        if self.check is not None:
            self.check(dict(out), where)
        return tuple(out)


# -- parameter checks beyond 'finite float or None' ------------------------------------------------

def _check_leaky(p, where):
    if p["alpha"] < 0:
        raise IRError(f"{where}: leaky_relu alpha (negative slope) must be >= 0, got {p['alpha']!r}")


def _check_clip(p, where):
    lo, hi = p["min_value"], p["max_value"]
    if lo is not None and hi is not None and lo > hi:
        raise IRError(f"{where}: clip min_value {lo!r} is larger than max_value {hi!r}")


TABLE: dict[str, ActivationSpec] = {spec.name: spec for spec in (
    ActivationSpec("linear", (), M.linear, None, flops=0),
    ActivationSpec("relu", (), M.relu, M.relu_grad),
    ActivationSpec("sigmoid", (), M.sigmoid, M.sigmoid_grad, flops=4),
    ActivationSpec("tanh", (), M.tanh, M.tanh_grad, flops=4),
    ActivationSpec("leaky_relu", (("alpha", 0.3),), M.leaky_relu, M.leaky_relu_grad, check=_check_leaky),
    ActivationSpec("clip", (("min_value", None), ("max_value", None)), M.clip, M.clip_grad, check=_check_clip),
)}

NAMES = tuple(TABLE)
if NAMES != M.ACTIVATION_NAMES:     # the two files must list the same activations
    raise ImportError(f"activation table {NAMES} and activation_math {M.ACTIVATION_NAMES} disagree")
GRAD_OPS = {spec.grad_op: spec for spec in TABLE.values() if spec.grad_op}


def get(name, where: str) -> ActivationSpec:
    """The table entry for `name` (None means linear); IRError naming `where` otherwise."""
    if name is None:
        name = "linear"
    spec = TABLE.get(name) if isinstance(name, str) else None
    if spec is None:
        raise IRError(f"{where}: unknown activation {name!r}; fusable activations: {', '.join(NAMES)}")
    return spec


def resolve(name, params, where: str) -> tuple[str, Params]:
    """(canonical name, canonical parameters) for an activation and its parameters."""
    spec = get(name, where)
    return spec.name, spec.normalize(params, where)
