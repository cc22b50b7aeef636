"""Batch normalization, channels-last: statistics per channel (the last axis) over every other axis.

- `batch_norm(x, gamma, beta, mean, var, epsilon)`: the inference form with given (moving) statistics,
  y = (x - mean) * (gamma / sqrt(var + epsilon)) + beta. Per sample, so it does not couple the batch.
  Its gradient is built from elementwise ops (+ `rsqrt`, `sum_to`): it is rarely differentiated
  (frozen BN), and the pieces already have kernels everywhere.
- `batch_norm_train(x, gamma, beta, epsilon) -> (y, batch_mean, batch_var)`: the training form, with
  the biased batch variance (as Keras). It couples the batch. batch_mean / batch_var are outputs for the
  moving-statistics update and are not differentiated through (as Keras' moving averages).
  Its gradient is the dedicated `batch_norm_train_grad` op (two passes over x and dy).

Both kernels compute scale = gamma / sqrt(var + epsilon) in float32 and y = (x - mean) * scale + beta
(no fused multiply-add), so the NumPy and LLVM backends agree to the last bit given the same statistics.
The batch statistics are accumulated in float64.
"""
from __future__ import annotations

import math

import numpy as np

from ..types import IRError, TensorType
from . import Op, emit, register


def check_epsilon(eps, op: str) -> float:
    """epsilon must be a finite positive number (it keeps sqrt(var + epsilon) away from 0)."""
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise IRError(f"{op}: epsilon must be a number, got {eps!r}") from None
    if not math.isfinite(e) or e <= 0:
        raise IRError(f"{op}: epsilon must be finite and > 0, got {eps!r}")
    return e


def _channels(x: TensorType, op: str) -> int:
    if x.dtype != "f32":
        raise IRError(f"{op}: x must be f32, got {x}")
    if x.rank < 2 or x.shape[-1] is None:
        raise IRError(f"{op}: x must have rank >= 2 with the channels last (statistics over all other axes), "
                      f"got {x}")
    return x.shape[-1]


def _check_vectors(types, names, c: int, op: str) -> None:
    for t, name in zip(types, names):
        if t.shape != (c,) or t.dtype != "f32":
            raise IRError(f"{op}: {name} must be f32[{c}] (one value per channel of x), got {t}")


@register
class BatchNorm(Op):
    """y = (x - mean) * gamma / sqrt(var + epsilon) + beta, per channel (last axis)."""
    name = "batch_norm"
    inputs = ("x", "gamma", "beta", "mean", "var")
    attrs = {"epsilon": 1e-3}
    inplace = 0

    def normalize(self, types, attrs):
        c = _channels(types[0], self.name)
        _check_vectors(types[1:], self.inputs[1:], c, self.name)
        return {"epsilon": check_epsilon(attrs["epsilon"], self.name)}

    def infer(self, types, attrs):
        return [types[0]]

    def couples_batch(self, node) -> bool:
        return False

    def flops(self, node, batch):
        return 3 * node.outputs[0].type.numel(batch)

    def grad(self, node, douts):
        x, gamma, _beta, mean, var = node.inputs
        dy = douts[0]
        g = x.graph
        c = (x.shape[-1],)
        eps = g.const(g.fresh_name("bn_eps"), np.float32(node.attrs["epsilon"]))
        inv = emit("rsqrt", emit("add", var, eps))
        scale = emit("mul", gamma, inv)
        dx = emit("mul", dy, scale)
        centered_dot = emit("sum_to", emit("mul", dy, emit("sub", x, mean)), shape=c)
        dgamma = emit("mul", centered_dot, inv)
        dbeta = emit("sum_to", dy, shape=c)
        dmean = emit("neg", emit("sum_to", dx, shape=c))
        # d/dvar of scale = gamma * (var + eps)^-1/2 is -1/2 * gamma * inv^3
        dvar = emit("mul", emit("mul", centered_dot, scale), emit("scale", emit("mul", inv, inv), factor=-0.5))
        return [dx, dgamma, dbeta, dmean, dvar]


@register
class BatchNormTrain(Op):
    """(y, batch_mean, batch_var): normalization with the batch's own statistics (biased variance)."""
    name = "batch_norm_train"
    inputs = ("x", "gamma", "beta")
    attrs = {"epsilon": 1e-3}
    inplace = 0

    def normalize(self, types, attrs):
        c = _channels(types[0], self.name)
        _check_vectors(types[1:], self.inputs[1:], c, self.name)
        return {"epsilon": check_epsilon(attrs["epsilon"], self.name)}

    def infer(self, types, attrs):
        c = types[0].shape[-1]
        return [types[0], TensorType((c,)), TensorType((c,))]

    def couples_batch(self, node) -> bool:
        return node.inputs[0].type.batched

    def flops(self, node, batch):
        return 6 * node.inputs[0].type.numel(batch)

    def bytes(self, node, batch):
        # two passes over x for the statistics, one more to normalize
        return 3 * node.inputs[0].type.nbytes(batch) + sum(v.type.nbytes(batch) for v in node.outputs)

    def grad(self, node, douts):
        x, gamma, _beta = node.inputs
        y, mean, var = node.outputs
        dx, dgamma, dbeta = emit("batch_norm_train_grad", x, douts[0], gamma, mean, var,
                                 epsilon=node.attrs["epsilon"])
        return [dx, dgamma, dbeta]


@register
class BatchNormTrainGrad(Op):
    """(dx, dgamma, dbeta) of batch_norm_train, the statistics being functions of x:
    xhat = (x - mean) / sqrt(var + eps); dbeta = sum(dy); dgamma = sum(dy * xhat);
    dx = gamma / sqrt(var + eps) * (dy - dbeta / M - xhat * dgamma / M), M = elements per channel."""
    name = "batch_norm_train_grad"
    inputs = ("x", "dy", "gamma", "mean", "var")
    attrs = {"epsilon": 1e-3}
    inplace = 1
    differentiable = False

    def normalize(self, types, attrs):
        c = _channels(types[0], self.name)
        if types[1] != types[0]:
            raise IRError(f"{self.name}: dy {types[1]} must have x's type {types[0]}")
        _check_vectors(types[2:], self.inputs[2:], c, self.name)
        return {"epsilon": check_epsilon(attrs["epsilon"], self.name)}

    def infer(self, types, attrs):
        c = types[0].shape[-1]
        return [types[0], TensorType((c,)), TensorType((c,))]

    def couples_batch(self, node) -> bool:
        return node.inputs[0].type.batched

    def flops(self, node, batch):
        return 8 * node.inputs[0].type.numel(batch)

    def bytes(self, node, batch):
        return 4 * node.inputs[0].type.nbytes(batch) + node.outputs[0].type.nbytes(batch)


@register
class BatchNormScale(Op):
    """scale = gamma / sqrt(var + epsilon), per channel: the factor batch_norm multiplies by, computed
    with the same float32 steps as its kernels. fold_batch_norm scales conv/dense weights with it."""
    name = "batch_norm_scale"
    inputs = ("gamma", "var")
    attrs = {"epsilon": 1e-3}
    differentiable = False

    def normalize(self, types, attrs):
        if types[0].rank != 1 or types[0].batched or types[0].dtype != "f32":
            raise IRError(f"{self.name}: gamma must be a 1-D f32 vector, got {types[0]}")
        _check_vectors(types[1:], ("var",), types[0].shape[0], self.name)
        return {"epsilon": check_epsilon(attrs["epsilon"], self.name)}

    def infer(self, types, attrs):
        return [types[0]]
