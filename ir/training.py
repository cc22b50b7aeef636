"""Training graph = forward + loss + backward + optimizer update, one graph, so one call of the
compiled function runs one whole training step."""
from __future__ import annotations

import numpy as np

from .autodiff import append_backward
from .passes.dce import eliminate_dead_code
from .graph import Graph
from .ops import emit
from .types import IRError

STEP = "step"   # f32 scalar param: number of completed steps (dropout counter, Adam's t - 1)
OPTIMIZERS = {"sgd": {"lr": 0.01, "momentum": 0.0, "nesterov": False},
              "adam": {"lr": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}}


def optimizer_slots(name: str, config: dict) -> tuple:
    """Names of the per-weight state slots an optimizer keeps."""
    if name == "adam":
        return ("m", "v")
    return ("velocity",) if config.get("momentum", 0.0) else ()


def make_training_graph(forward: Graph, loss: str, optimizer: str = "adam", config: dict | None = None,
                        trainable: list[str] | None = None) -> Graph:
    """Extend a copy of `forward` (which computes scalar value `loss`) with gradients of every
    trainable param and the optimizer's in-place updates. New params: `step` (if absent) and the
    optimizer slots `<weight>/<slot>`, zero-initialised by the caller."""
    if optimizer not in OPTIMIZERS:
        raise IRError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    cfg = dict(OPTIMIZERS[optimizer])
    unknown = set(config or {}) - set(cfg)
    if unknown:
        raise IRError(f"optimizer {optimizer}: unknown setting(s) {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(config or {})
    g = forward.copy()
    step = g.value(STEP) if g.has_value(STEP) else g.param(STEP, ())
    weights = [p for p in g.params if p.name != STEP and (trainable is None or p.name in trainable)]
    grads = append_backward(g, g.value(loss), weights)
    t1 = emit("add", step, g.const(g.fresh_name("one"), np.float32(1.0)))
    for w in weights:
        slots = [g.param(f"{w.name}/{s}", w.shape) for s in optimizer_slots(optimizer, cfg)]
        if optimizer == "adam":
            outs = emit("adam_update", w, grads[w.name], *slots, t1, **cfg)
        else:
            outs = emit("sgd_update", w, grads[w.name], *slots, **cfg)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for target, new in zip([w] + slots, outs):
            g.set_update(target, new)
    g.set_update(step, t1)
    return eliminate_dead_code(g)
