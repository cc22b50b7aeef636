"""Loss ops (scalar mean over the batch, Keras semantics) and their gradients."""
from __future__ import annotations

from ..types import IRError, TensorType
from . import Op, emit, register

SCALAR = TensorType(())


class LossBase(Op):
    """loss(pred, target[, weight]) -> scalar: sum_i weight_i * loss_i / N over the N samples (Keras'
    "sum_over_batch_size" reduction; no weight = all ones, the mean). weight is (N,): sample_weight, or
    class_weight[label] looked up by the caller. Gradient ops take (pred, target, dloss[, weight]) -> dpred;
    the weight gets no gradient."""
    inputs = ("pred", "target", "weight?")
    attrs = {"from_logits": False}
    batch_mean = True

    def couples_batch(self, node):
        return any(v.type.batched for v in node.inputs)      # a mean over the batch
    n_fixed = 2                  # operands before the optional weight

    def normalize(self, types, attrs):
        p, t = types[:2]
        self.check_pred(p)
        self.check_target(p, t)
        if len(types) > self.n_fixed:
            w = types[self.n_fixed]
            if w.rank != 1 or p.rank < 1 or w.shape[0] != p.shape[0]:
                raise IRError(f"{self.name}: weight must be 1-D (batch,) per-sample weights, got {w} for {p}")
        return {k: bool(v) for k, v in attrs.items()}

    def check_pred(self, p):
        if p.rank != 2:
            raise IRError(f"{self.name}: predictions must be 2-D (batch, classes), got {p}")

    def check_target(self, p, t):
        if t.shape != p.shape:
            raise IRError(f"{self.name}: targets {t} must have the predictions' shape {p}")

    def infer(self, types, attrs):
        return [SCALAR]

    def flops(self, node, batch):
        return 4 * node.inputs[0].type.numel(batch)

    def grad(self, node, douts):
        p, t = node.inputs[:2]
        weight = node.inputs[2:]
        return [emit(self.name + "_grad", p, t, douts[0], *weight, **node.attrs), None] + [None] * len(weight)


class LossGradBase(LossBase):
    inputs = ("pred", "target", "dloss", "weight?")
    differentiable = False
    batch_mean = False      # batched output, scaled by 1 / batch size (couples_batch stays True)
    n_fixed = 3

    def normalize(self, types, attrs):
        if types[2].shape != ():
            raise IRError(f"{self.name}: dloss must be a scalar, got {types[2]}")
        return super().normalize(types, attrs)

    def infer(self, types, attrs):
        return [types[0]]


class SparseTarget:
    def check_target(self, p, t):
        if t.rank != 1 or (t.shape[0] != p.shape[0]):
            raise IRError(f"{self.name}: labels must be 1-D (batch,) integer class ids, got {t} for {p}")


class AnyShape:
    """Predictions of any rank >= 1 with the batch first (mse)."""
    def check_pred(self, p):
        if p.rank < 1:
            raise IRError(f"{self.name}: predictions must have a batch axis, got {p}")


@register
class SparseCategoricalCrossentropy(SparseTarget, LossBase):
    name = "sparse_categorical_crossentropy"


@register
class SparseCategoricalCrossentropyGrad(SparseTarget, LossGradBase):
    name = "sparse_categorical_crossentropy_grad"


@register
class CategoricalCrossentropy(LossBase):
    name = "categorical_crossentropy"


@register
class CategoricalCrossentropyGrad(LossGradBase):
    name = "categorical_crossentropy_grad"


@register
class BinaryCrossentropy(LossBase):
    """Keras binary_crossentropy: per element -(y log q + (1 - y) log(1 - q)), q = clip(p, 1e-7, 1 - 1e-7)
    (from_logits: max(z, 0) - z y + log(1 + exp(-|z|))); the sample's loss is the mean over its last axis."""
    name = "binary_crossentropy"


@register
class BinaryCrossentropyGrad(LossGradBase):
    name = "binary_crossentropy_grad"


@register
class MSE(AnyShape, LossBase):
    """Mean squared error: per sample the mean over its elements, then the (weighted) batch reduction."""
    name = "mse"
    attrs = {}


@register
class MSEGrad(AnyShape, LossGradBase):
    name = "mse_grad"
    attrs = {}
